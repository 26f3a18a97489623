"""``etrace_grad`` over a whole sequence against the hand-written loop and the released braintrace.

One command: ``uv run python benchmarks/etrace_grad.py`` (``--quick`` for a smoke run,
``--no-peer`` to skip the peer). For the GRU (B=32, I=64, H=256) and the recurrent LIF network
(B=32, I=128, H=256) of ``_workloads.py``, with D_RTRL and ES_D_RTRL built by
``braintrace.compile``, it measures ms per sequence of T=100 steps (median of the repeats after
two warm-up calls) of the summed online gradients of the steps' losses, computed by:

- ``etrace_grad``: ``learner.etrace_grad(xs, ys, step_fn=..., weights=params, reduction='sum')``
  inside ``brainstate.transform.jit``, ours and the peer's (the same call in both libraries);
- ``etrace_grad_direct`` (ours): the same call without an outer jit (ours compiles and caches
  one program per call signature itself);
- ``hand_loop`` (ours): a ``scan`` over the steps calling the learner and taking each step's
  gradient through it, summed, under ``braintrace.jit_in_place`` (the loop every user wrote
  before the driver; ``performance.py``'s step time measures the same loop);
- ``etrace_grad_chunked``: ``etrace_grad(..., chunk_size=10)`` on a learner built with
  ``vjp_method='multi-step'``, ours and the peer's (the peer's chunked trace): windows of 10
  steps, exact reverse mode inside a window, traces carried between windows.

Every configuration runs in a fresh worker process (``_worker.py``), ours and the peer's
interleaved. Also recorded: XLA's ``memory_analysis()`` of each compiled program (the hand loop's
under ``brainstate.transform.jit``: ``jit_in_place`` has no ``compile``), and, in a separate
process per library, the relative difference between the gradients of ``etrace_grad`` and of
the hand loop from the same initial model (so that the timed programs do equal work). The peer
is ``performance.py``'s (0.2.8 on Python >= 3.12, 0.2.6 on 3.11, in its own environment); a
peer without ``etrace_grad`` is reported as ``n/a``.
Output: a table on stdout and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import performance as perf

METHODS = ("d_rtrl", "es_d_rtrl")
# the window of etrace_grad_chunked (T=100 and --quick's T=10 are multiples of it, as the peer requires)
CHUNK = 10
# (library, program, jit) in the order they run for each (model, method): ours and the peer alternate
PROGRAMS = (
    ("etp", "etrace_grad", "brainstate"),
    ("peer", "etrace_grad", "brainstate"),
    ("etp", "hand_loop", "in_place"),
    ("etp", "etrace_grad_direct", "none"),
    ("etp", "etrace_grad_chunked", "brainstate"),
    ("peer", "etrace_grad_chunked", "brainstate"),
)
# the gradients of etrace_grad and of the hand loop must agree to this (float32)
AGREEMENT = 1e-4


def _configs(quick: bool) -> dict[str, Any]:
    if quick:
        return {"models": [("gru", 4, 8, 16), ("lif", 4, 8, 16)], "steps": 10, "repeats": 2}
    return {"models": [("gru", 32, 64, 256), ("lif", 32, 128, 256)], "steps": 100, "repeats": 7}


def measure(quick: bool, peer: str | None) -> dict[str, Any]:
    cfg = _configs(quick)
    pythons = {"etp": sys.executable, "peer": peer}
    jobs: list[tuple[str, dict[str, Any]]] = []
    labels: list[tuple[str, dict[str, Any]]] = []
    for model in cfg["models"]:
        for method in METHODS:
            row = {"model": model[0], "batch": model[1], "n_in": model[2], "hidden": model[3], "method": method}
            for lib, python in pythons.items():
                if python is not None:
                    jobs.append((python, perf._spec("sequence_grad_check", model, method=method, steps=cfg["steps"])))
                    labels.append(("check", {**row, "library": lib}))
            for lib, program, jit in PROGRAMS:
                python = pythons[lib]
                if python is None:
                    continue
                spec = perf._spec(
                    "sequence_grad", model, method=method, steps=cfg["steps"], repeats=cfg["repeats"], jit=jit
                )
                if program == "etrace_grad_chunked":
                    spec = {**spec, "chunk_size": CHUNK, "vjp_method": "multi-step"}
                    program = "etrace_grad"
                    label = "etrace_grad_chunked"
                else:
                    label = program
                jobs.append((python, {**spec, "program": program}))
                chunk = {"chunk_size": CHUNK} if label == "etrace_grad_chunked" else {}
                labels.append(("time", {**row, "library": lib, "program": label, "jit": jit, **chunk}))
    measured = perf._run_jobs(jobs, batch=quick)
    rows = [{**row, **m} for (kind, row), m in zip(labels, measured, strict=True) if kind == "time"]
    checks = [{**row, **m} for (kind, row), m in zip(labels, measured, strict=True) if kind == "check"]
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "stack": {**perf.our_stack(), "peer": f"braintrace=={perf.peer_version()}" if peer else None},
        "quick": quick,
        "steps": cfg["steps"],
        "repeats": cfg["repeats"],
        "rows": rows,
        "grad_check": checks,
    }


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if a and b and "ms_per_sequence" in a and "ms_per_sequence" in b:
        return f"{a['ms_per_sequence'] / b['ms_per_sequence']:.2f}"
    return "-"


def _cell(row: dict[str, Any] | None, field: str = "ms_per_sequence", scale: float = 1.0) -> str:
    if row is None:
        return "-"
    if "unavailable" in row:
        return "n/a"
    if "error" in row:
        return "error"
    value = row.get(field) if "." not in field else row.get("memory", {}).get(field.split(".")[1])
    return "-" if value is None else f"{value * scale:.2f}"


def print_tables(results: dict[str, Any]) -> None:
    rows = results["rows"]
    print(f"\nms per sequence of T={results['steps']} steps (median of {results['repeats']})")
    print(
        f"{'':<22}{'etrace_grad':>12}{'hand loop':>11}{'ours/hand':>10}{'direct':>9}"
        f"{'peer etg':>10}{'ours/peer':>10}{'chunked':>9}{'peer ch.':>9}{'ours/peer':>10}"
        "   XLA MB: etg / hand / peer"
    )
    for model, hidden, method in sorted({(r["model"], r["hidden"], r["method"]) for r in rows}):
        config = {"model": model, "hidden": hidden, "method": method}
        ours, hand, direct, peer, chunked, peer_chunked = (
            perf._lookup(rows, **config, library=library, program=program)
            for library, program in (
                ("etp", "etrace_grad"),
                ("etp", "hand_loop"),
                ("etp", "etrace_grad_direct"),
                ("peer", "etrace_grad"),
                ("etp", "etrace_grad_chunked"),
                ("peer", "etrace_grad_chunked"),
            )
        )
        memory = " / ".join(_cell(r, "memory.xla_total_bytes", 1e-6) for r in (ours, hand, peer))
        print(
            f"{model} H={hidden} {method:<11}{_cell(ours):>12}{_cell(hand):>11}{_ratio(ours, hand):>10}"
            f"{_cell(direct):>9}{_cell(peer):>10}{_ratio(ours, peer):>10}"
            f"{_cell(chunked):>9}{_cell(peer_chunked):>9}{_ratio(chunked, peer_chunked):>10}   {memory}"
        )
    for row in rows:
        if "error" in row:
            print(f"  error: {row['library']} {row['model']} {row['method']} {row['program']}: {row['error']}")
    print(f"\netrace_grad vs hand loop, largest relative gradient difference (target < {AGREEMENT:g})")
    for check in results["grad_check"]:
        label = f"{check['library']:<5} {check['model']} H={check['hidden']} {check['method']:<10}"
        if "max_rel_error" in check:
            print(f"  {label}{check['max_rel_error']:.2e}")
        else:
            print(f"  {label}{'n/a' if 'unavailable' in check else 'error: ' + str(check.get('error'))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole pipeline")
    parser.add_argument("--no-peer", action="store_true", help="do not measure the released braintrace")
    parser.add_argument(
        "--peer-env",
        type=Path,
        default=perf.ROOT / "results" / f"peer-venv-{perf.peer_version()}",
        help="the peer's virtual environment (shared with performance.py)",
    )
    parser.add_argument("--out", type=Path, default=perf.ROOT / "results" / "etrace_grad")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    peer = None if args.no_peer else perf._peer_python(args.peer_env)
    results = measure(args.quick, peer)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"wrote {args.out / 'results.json'}")
    ours_failed = [r for r in results["rows"] + results["grad_check"] if "error" in r and r["library"] == "etp"]
    disagree = [c for c in results["grad_check"] if c["library"] == "etp" and c.get("max_rel_error", 0) >= AGREEMENT]
    return 1 if ours_failed or disagree else 0


if __name__ == "__main__":
    sys.exit(main())
