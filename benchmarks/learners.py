"""Step time and trace memory of every registered learner, beside BPTT and D_RTRL (issues 16, 17).

One command: ``uv run python benchmarks/learners.py`` (``--quick`` for a smoke run). The learners
are those of ``etp_algorithms.registered_learners()`` in the running installation (one row per
learner class: an alias such as ``pp_prop`` is listed under its first name), built with the
options of :data:`OPTIONS`. Each configuration runs in a fresh worker process
(``_learner_worker.py``): one jitted program runs ``steps`` time steps in a ``scan``, the online
learners summing each step's gradient through the learner, BPTT differentiating the whole loop
(``_workloads.make_program``); ms per step = median of the repeats after two warm-up calls, divided
by the steps. Trace memory = ``learner.trace_bytes()`` (and RTRL's influence / SnAp's dense
influence computed every step before masking); XLA temporary memory from the compiled program's
``memory_analysis()``. A learner whose constructor, compile or run fails, or that refuses the
workload (RTRL above ``max_influence_bytes``), gets a row with the message's first line.

Workloads: GRU (B=32, I=64, H in {64, 256}) and recurrent LIF (B=32, I=128, H in {256, 512}),
``_workloads.GRUNet`` / ``RecurrentLIFNet``. Output: one table per workload on stdout and
``results.json`` under ``--out`` (default ``results/learners``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE = "d_rtrl"

#: Constructor options per registered name (the rest take their defaults).
OPTIONS: dict[str, dict[str, Any]] = {
    "es_d_rtrl": {"decay_or_rank": 0.9},
    "snap": {"n": 2},
    "uoro": {"projection_key": 0},
    "kf_rtrl": {"projection_key": 0},
    "rflo": {"feedback_key": 0},
}
#: Learners whose step costs seconds (dense influence propagation): fewer steps per program.
STEPS: dict[str, int] = {"rtrl": 5, "snap": 5}


def _configs(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "workloads": [("gru", 4, 8, 8), ("lif", 4, 8, 8)],
            "steps": 5,
            "repeats": 2,
            "budget_s": 10.0,
            "timeout_s": 120.0,
        }
    return {
        "workloads": [("gru", 32, 64, 64), ("gru", 32, 64, 256), ("lif", 32, 128, 256), ("lif", 32, 128, 512)],
        "steps": 50,
        "repeats": 5,
        "budget_s": 60.0,
        "timeout_s": 900.0,
    }


def run_worker(spec: dict[str, Any], timeout: float, python: str = sys.executable) -> dict[str, Any]:
    """``spec`` in a fresh ``_learner_worker.py`` process of ``python`` (default: this interpreter; the
    peer's for ``peer_learners.py``): its result, or a row saying why there is none."""
    env = dict(os.environ, PYTHONPATH=str(HERE), JAX_PLATFORMS="cpu")
    try:
        proc = subprocess.run(
            [python, str(HERE / "_learner_worker.py"), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=HERE,  # not the repository root: the peer must not see the project's sources
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return {"status": f"worker exited with code {proc.returncode}: {' '.join(tail)}"}


def learner_names(registered: dict[str, str]) -> tuple[list[str], dict[str, list[str]]]:
    """One name per learner class (the class's own lower-cased name when registered, else the first
    in sorted order), D_RTRL first; and ``name -> its aliases``."""
    by_class: dict[str, list[str]] = {}
    for name in sorted(registered):
        by_class.setdefault(registered[name], []).append(name)
    chosen = {}
    for cls, names in by_class.items():
        main = cls.lower() if cls.lower() in names else names[0]
        chosen[main] = [n for n in names if n != main]
    order = sorted(chosen, key=lambda n: (n != BASELINE, n))
    return order, chosen


def measure(
    quick: bool, only: list[str] | None = None, models: list[str] | None = None, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    cfg = _configs(quick)
    chosen_options = {**OPTIONS, **(options or {})}
    registry = run_worker({"kind": "registry"}, cfg["timeout_s"])
    if "learners" not in registry:
        raise RuntimeError(f"learners.py: could not list the registered learners: {registry.get('status')}")
    names, aliases = learner_names(registry["learners"])
    if only:
        names = [n for n in names if n in only or n == BASELINE]
    rows = []
    for model, batch, n_in, hidden in cfg["workloads"]:
        if models and model not in models:
            continue
        for method in ["bptt", *names]:
            steps = cfg["steps"] if quick else STEPS.get(method, cfg["steps"])
            spec = {
                "kind": "step",
                "model": model,
                "batch": batch,
                "n_in": n_in,
                "hidden": hidden,
                "method": method,
                "options": chosen_options.get(method, {}),
                "steps": steps,
                "repeats": cfg["repeats"],
                "budget_s": cfg["budget_s"],
            }
            print(f"  {model} H={hidden} {method}", file=sys.stderr, flush=True)
            row = {k: v for k, v in spec.items() if k not in ("kind", "budget_s")}
            row["class"] = registry["learners"].get(method, "BPTT")
            rows.append({**row, **run_worker(spec, cfg["timeout_s"])})
    for row in rows:
        base = next(
            (r for r in rows if r["method"] == BASELINE and (r["model"], r["hidden"]) == (row["model"], row["hidden"])),
            None,
        )
        if base and "ms_per_step" in base and "ms_per_step" in row:
            row["ratio_to_d_rtrl"] = row["ms_per_step"] / base["ms_per_step"]
    from importlib.metadata import version

    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "stack": {"python": platform.python_version(), **{n: version(n) for n in ("jax", "jaxlib", "brainstate")}},
        "quick": quick,
        "config": {k: v for k, v in cfg.items() if k != "workloads"},
        "learners": {name: registry["learners"][name] for name in names},
        "aliases": {name: aliases[name] for name in names},
        "options": {name: chosen_options.get(name, {}) for name in names},
        "rows": rows,
    }


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def table(results: dict[str, Any], model: str, hidden: int) -> list[str]:
    """The lines of one workload's table (Markdown)."""
    rows = [r for r in results["rows"] if (r["model"], r["hidden"]) == (model, hidden)]
    first = rows[0]
    lines = [
        f"\n{model} B={first['batch']} I={first['n_in']} H={hidden}\n",
        "| learner | ms/step | / D_RTRL | trace MiB | XLA temp MiB | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ms = f"{r['ms_per_step']:.3f}" if "ms_per_step" in r else "-"
        ratio = f"{r['ratio_to_d_rtrl']:.2f}" if "ratio_to_d_rtrl" in r else "-"
        trace = _mb(r.get("trace_bytes"))
        dense = r.get("dense_influence_bytes")
        if dense is not None:
            trace += f" (dense {_mb(dense)})"
        status = r.get("status", "?")
        cfg = results["config"]
        if status == "ok" and (r["steps"] != cfg["steps"] or r.get("repeats") != cfg["repeats"]):
            status += f" ({r['steps']} steps, {r.get('repeats')} repeats)"
        lines.append(
            f"| {r['method']} | {ms} | {ratio} | {trace} | {_mb(r.get('temp_size_in_bytes'))} | {status.replace('|', '/')} |"
        )
    return lines


def print_tables(results: dict[str, Any]) -> None:
    seen = []
    for r in results["rows"]:
        if (r["model"], r["hidden"]) not in seen:
            seen.append((r["model"], r["hidden"]))
    for model, hidden in seen:
        print("\n".join(table(results, model, hidden)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 5 steps, 2 repeats: a smoke run")
    parser.add_argument("--learners", nargs="*", help="only these registered names (and D_RTRL, BPTT)")
    parser.add_argument("--models", nargs="*", choices=("gru", "lif"), help="only these workloads")
    parser.add_argument("--options", type=json.loads, default={}, help='JSON {"name": {option: value}} over OPTIONS')
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "learners")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = measure(args.quick, args.learners, args.models, args.options)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"\nwrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
