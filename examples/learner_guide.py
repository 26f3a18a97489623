"""Write the learner guide (``docs/learner_guide.md``) from the JSON of the real-data and memory-task examples.

One command after the examples' default runs::

    uv run python examples/digits_rnn.py && uv run python examples/digits_rnn.py --mode pixels
    uv run python examples/digits_snn.py && uv run python examples/copy_task.py
    # the learners too slow for the default size (RTRL, SnAp), beside BPTT and D_RTRL, at H=16:
    uv run python examples/digits_rnn.py --hidden 16 --learners BPTT,D_RTRL,RTRL,SnAp-2
    uv run python examples/copy_task.py --hidden 16 --delays 20 --learners BPTT,D_RTRL,RTRL,SnAp-2
    uv run python examples/learner_guide.py --readme README.md  # reads results/, writes docs/learner_guide.md
                                                                 # and the README's headline rows

The page holds one table, one row per learner: held-out accuracy on each task (a dash where the
learner was not run on it), eligibility-trace memory and time per step on each network, and what
the learner computes exactly; a second table with the learners whose steps are too slow for the
default size (RTRL's full influence matrix, SnAp's dense propagation) at a smaller network; then a
short decision guide derived from the numbers (which learner comes closest to BPTT on each task, at
what memory).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

TASKS = [
    ("digits_rnn_rows.json", None, "digits, rows (GRU, T=8)"),
    ("digits_rnn_pixels.json", None, "digits, pixels (GRU, T=64)"),
    ("digits_snn.json", None, "spiking digits (ALIF)"),
    ("copy_task.json", "longest", "delayed recall (GRU)"),
]
README_START = "<!-- learner-guide headline: written by examples/learner_guide.py --readme README.md -->"
README_END = "<!-- end of learner-guide headline -->"
#: The smaller networks on which the expensive learners run (their own table).
SMALL_TASKS = [
    ("digits_rnn_rows_h16.json", None, "digits, rows (GRU H=16, T=8)"),
    ("copy_task_h16.json", "longest", "delayed recall (GRU H=16)"),
]


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _load(
    results: Path, tasks: list[tuple[str, str | None, str]] = TASKS
) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """``(task label, meta, results)`` of each example whose JSON exists (the copy task at its longest delay)."""
    found = []
    for filename, pick, label in tasks:
        path = results / filename
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        rows = data["results"]
        if pick == "longest":
            longest = max(rows, key=int)
            rows, label = rows[longest], f"{label}, delay {longest}"
        found.append((label, data["meta"], rows))
    return found


def _small_table(results: Path) -> list[str]:
    """The expensive learners' section: accuracy, trace memory and ms per step on the smaller networks."""
    tasks = _load(results, SMALL_TASKS)
    if not tasks:
        return []
    names: list[str] = []
    for _, _, rows in tasks:
        names += [r["name"] for r in rows if r["name"] not in names]
    by = {(label, r["name"]): r for label, _, rows in tasks for r in rows}
    labels = [label for label, _, _ in tasks]
    head = ["learner", *labels, "trace memory (same)", "ms per step (same)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        runs = [by.get((t, name)) for t in labels]
        cells = [name, *(f"{r['test_acc']:.1%}" if r else "-" for r in runs)]
        cells.append(" / ".join(_fmt_bytes(r["trace_bytes"]) if r else "-" for r in runs))
        cells.append(" / ".join(f"{r['ms_per_step']:.3f}" if r else "-" for r in runs))
        lines.append("| " + " | ".join(cells) + " |")
    metas = "; ".join(
        f"{label}: {meta.get('epochs')} epochs, batch {meta.get('batch')}, hidden {meta.get('hidden')}"
        for label, meta, _ in tasks
    )
    return [
        "## The expensive learners, on smaller networks",
        "",
        "RTRL propagates the full influence matrix (memory O(B·H·θ), forward-mode work O(θ) per step)",
        "and SnAp-2 computes a dense influence before masking it, so their default-size runs take",
        "hours here; on a GRU of 16 units they run beside BPTT and D_RTRL with everything else the same.",
        "",
        *lines,
        "",
        f"Same machine and settings as above ({metas}).",
        "",
    ]


def _main_table(
    tasks: list[tuple[str, dict[str, Any], list[dict[str, Any]]]], only: set[str] | None = None
) -> list[str]:
    """One row per learner of ``tasks`` (or of those in ``only``): accuracies, trace memory, ms per step, exactness."""
    names: list[str] = []
    exact: dict[str, str] = {}
    for _, _, rows in tasks:
        for r in rows:
            if r["name"] not in names and (only is None or r["name"] in only):
                names.append(r["name"])
            exact.setdefault(r["name"], r.get("exact", ""))
    by = {(label, r["name"]): r for label, _, rows in tasks for r in rows}
    labels = [label for label, _, _ in tasks]
    head = ["learner", *labels, "trace memory (GRU, digits rows / ALIF)", "ms per step (same)", "exact"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mem_tasks = [t for t in labels if t.startswith("digits, rows") or t.startswith("spiking")]
    for name in names:
        accs = [f"{by[(t, name)]['test_acc']:.1%}" if (t, name) in by else "-" for t in labels]
        mem = " / ".join(_fmt_bytes(by[(t, name)]["trace_bytes"]) if (t, name) in by else "-" for t in mem_tasks)
        ms = " / ".join(f"{by[(t, name)]['ms_per_step']:.3f}" if (t, name) in by else "-" for t in mem_tasks)
        lines.append("| " + " | ".join([name, *accs, mem, ms, exact.get(name, "")]) + " |")
    return lines


def _best_online(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max((r for r in rows if r["name"] != "BPTT"), key=lambda r: r["test_acc"], default=None)


def headline(results: Path) -> list[str]:
    """The README's quote of the guide: BPTT, D_RTRL, ES_D_RTRL and each task's best online learner."""
    tasks = _load(results)
    if not tasks:
        raise SystemExit(f"no example results in {results}/: run the examples first (see this script's docstring)")
    only = {"BPTT", "D_RTRL", "ES_D_RTRL"} | {b["name"] for _, _, rows in tasks if (b := _best_online(rows))}
    return _main_table(tasks, only)


def update_readme(readme: Path, results: Path) -> None:
    """Replace the block between the README's learner-guide markers with :func:`headline`'s table."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} block to hold the guide's headline rows")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text("\n".join([head + README_START, *headline(results), README_END]) + tail)


def render(results: Path, machine: str) -> str:
    tasks = _load(results)
    if not tasks:
        raise SystemExit(f"no example results in {results}/: run the examples first (see this script's docstring)")
    lines = _main_table(tasks)

    guide = []
    for label, _, rows in tasks:
        online = [r for r in rows if r["name"] != "BPTT"]
        bptt = next((r for r in rows if r["name"] == "BPTT"), None)
        best = _best_online(rows)
        if best is None:
            continue
        smallest = min((r for r in online if r["trace_bytes"]), key=lambda r: r["trace_bytes"], default=None)
        gap = f", {100 * (best['test_acc'] - bptt['test_acc']):+.1f} points from BPTT" if bptt else ""
        text = f"- **{label}**: the best online learner is {best['name']} ({best['test_acc']:.1%}{gap}"
        text += f", traces {_fmt_bytes(best['trace_bytes'])})"
        if smallest is not None and smallest["name"] != best["name"]:
            text += (
                f"; the smallest traces are {smallest['name']}'s ({_fmt_bytes(smallest['trace_bytes'])}, "
                f"{smallest['test_acc']:.1%})"
            )
        guide.append(text + ".")
    metas = "; ".join(
        f"{label}: {meta.get('epochs')} epochs, batch {meta.get('batch')}, hidden {meta.get('hidden')}"
        for label, meta, _ in tasks
    )
    return "\n".join(
        [
            "# Learner guide: every learner on one table",
            "",
            "Held-out accuracy of each learner on real data (scikit-learn's 8x8 handwritten digits, read as a",
            "sequence by a GRU or as spike trains by a recurrent ALIF network) and on a memory task (delayed",
            "recall), all trained from the same initial weights, on the same mini-batches, with the same",
            "optimizer; the trace memory and time per step of each online learner; what each computes exactly.",
            "The examples `examples/digits_rnn.py`, `examples/digits_snn.py` and `examples/copy_task.py` produce",
            "the numbers; `examples/learner_guide.py` writes this page from their JSON.",
            "",
            *lines,
            "",
            f"Measured on {machine}, float32, one seed ({metas}). A dash: the learner was not run on that task",
            "(a learner this installation does not have, or one outside the task's family). Every learner shares",
            "one optimizer setting (learning rate, clipping, epochs), tuned for none of them: one task and one",
            "seed rank nothing; the examples' `--seed` and `--lr` reproduce or vary a row.",
            "",
            *_small_table(results),
            "## Which learner to pick",
            "",
            *guide,
            "- Memory: BPTT's grows with the sequence length; every online learner's is fixed, the sizes above.",
            "- Exactness: where a row says the gradient is exact, the online gradient equals BPTT's (tested);",
            "  elsewhere it is an approximation, and the accuracy gap above is what it costs on these tasks.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path("docs/learner_guide.md"))
    parser.add_argument("--machine", default=f"{platform.machine()} CPU, {platform.system()}")
    parser.add_argument(
        "--readme", type=Path, default=None, help="also quote the headline rows in this README's learner-guide block"
    )
    args = parser.parse_args(argv)
    args.out.write_text(render(args.results, args.machine))
    print(f"wrote {args.out}")
    if args.readme is not None:
        update_readme(args.readme, args.results)
        print(f"updated the learner-guide headline of {args.readme}")


if __name__ == "__main__":
    main()
