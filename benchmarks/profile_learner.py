"""Where one learner's step spends its time: XLA's kernels, timed by ``jax.profiler`` (issue 22).

Usage (ours; the peer's with its environment's interpreter and ``--library peer``)::

    uv run python benchmarks/profile_learner.py --model gru --hidden 256 --method es_d_rtrl
    results/peer-venv-0.2.8/bin/python benchmarks/profile_learner.py --library peer --method es_d_rtrl
    uv run python benchmarks/profile_learner.py --method snap --batch 4 --hidden 32 --hlo snap.hlo

The program is ``peer_learners.py``'s (``_workloads.make_program``: a ``scan`` over ``--steps``
steps, every step's gradient through the learner, summed), built by ``_learner_worker._build``, so
this file imports only ``braintrace``, ``brainstate`` and ``jax`` and runs in either environment.
After warm-up calls it traces ``--calls`` calls and prints each kernel's time per step (the sum of
its durations over the traced calls / steps) and how often it runs per step, the largest first.
XLA's CPU runtime runs independent kernels side by side on the cores, so the kernels' times can
add up to more than the step's wall time; the wall time per step is printed beside them.
``--hlo PATH`` also writes the optimised HLO of the compiled program (the loop body is the
``while``'s ``body`` computation).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _learner_worker as worker
import _workloads as work
import jax

#: Profiler events that are not XLA kernels: the runtime's own spans and Python frames.
_NOT_KERNELS = ("ThunkExecutor", "PjitFunction", "CommonPjRt", "SlinkyThreadPool", "while")


def kernel_times(trace: dict[str, Any], per: int) -> list[tuple[str, float, float]]:
    """``(kernel, microseconds per step, calls per step)`` of a Chrome trace's complete events, largest first.

    ``per`` is the number of steps the traced calls ran; Python frames (names starting with ``$``) and the
    runtime's spans (:data:`_NOT_KERNELS`) are left out.
    """
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for event in trace.get("traceEvents", []):
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith("$") or name.startswith(_NOT_KERNELS):
            continue
        total[name] += float(event.get("dur", 0.0))
        count[name] += 1
    return [(name, t / per, count[name] / per) for name, t in total.most_common()]


def profile(spec: dict[str, Any], calls: int, hlo: Path | None = None) -> dict[str, Any]:
    """Trace ``calls`` calls of the learner's program; its kernels' times and the wall time per step."""
    net, learner, result = worker._build(spec)
    if "status" in result:
        return result
    program, args, _ = work.make_program(
        spec["method"], net, spec["batch"], spec["n_in"], spec["steps"], online_inputs=False, learner=learner
    )
    if hlo is not None:
        hlo.write_text(program.lower(*args).compile().as_text())
    for _ in range(2):  # compile; the peer's program compiles again on its second call
        worker._block(program(*args))
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(calls):
            worker._block(program(*args))
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        path = sorted(Path(folder).rglob("*.trace.json.gz"))[-1]
        with gzip.open(path, "rt") as stream:
            trace = json.load(stream)
    steps = calls * spec["steps"]
    return {**result, "wall_us_per_step": 1e6 * wall / steps, "kernels": kernel_times(trace, steps), "status": "ok"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=("etp", "peer"), default="etp")
    parser.add_argument("--model", choices=("gru", "lif"), default="gru")
    parser.add_argument("--method", default="es_d_rtrl", help="a registered learner name (peer: of PEER_CLASSES)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n-in", type=int, help="input size (default: 64 for the GRU, 128 for LIF)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--calls", type=int, default=3, help="traced calls of the program")
    parser.add_argument("--options", type=json.loads, help="constructor options as JSON (default: PEER_OPTIONS')")
    parser.add_argument("--top", type=int, default=25, help="kernels printed")
    parser.add_argument("--hlo", type=Path, help="write the compiled program's HLO here")
    args = parser.parse_args(argv)
    options = worker.PEER_OPTIONS.get(args.method, {}) if args.options is None else args.options
    spec = {
        "library": args.library,
        "model": args.model,
        "method": args.method,
        "batch": args.batch,
        "n_in": args.n_in or (64 if args.model == "gru" else 128),
        "hidden": args.hidden,
        "steps": args.steps,
        "options": options,
    }
    result = profile(spec, args.calls, args.hlo)
    if result["status"] != "ok":
        print(result["status"])
        return 1
    print(
        f"{args.library} {args.model} B={args.batch} H={args.hidden} {args.method}: "
        f"{result['wall_us_per_step']:.1f} us per step (wall)"
    )
    for name, us, per_step in result["kernels"][: args.top]:
        print(f"{us:10.1f} us/step  x{per_step:4.1f}  {name}")
    return 0


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    sys.exit(main())
