"""Data-parallel learners on 1, 2 and 4 simulated CPU devices: correctness and per-device trace memory.

One command: ``uv run python benchmarks/sharding.py`` (``--quick``: tiny sizes, for the smoke test;
``--devices 1 2 4 8`` to choose the device counts). For a GRU with a linear readout and D_RTRL
and ES_D_RTRL, each (devices, scaling, method) runs in a fresh process whose ``XLA_FLAGS``
(``--xla_force_host_platform_device_count=n``) give it ``n`` host devices. There the learner is
compiled, placed with ``etp_algorithms._sharding.shard(learner, mesh, 'data')`` and driven over a
sequence by ``learner.etrace_grad`` (one compiled program); the same learner unsharded, from the
same seed, gives the reference gradient. Recorded:

- ``rel_err``: the largest relative difference between the sharded and the unsharded gradients;
- ``trace/device``: the bytes of the traces on each device (``trace_bytes_per_device``), and
  ``trace total`` (the learner's whole trace);
- ``XLA temp/device``: ``memory_analysis()`` of the compiled sharded program (per device);
- ``collectives``: the collective instructions of that program (count per kind);
- ``ms/seq``: the median time of a sequence. The simulated devices share this machine's cores,
  so this is **not** a scaling measurement (only a real multi-device machine gives one).

Scalings: ``strong`` keeps the global batch (each device holds ``B/n`` samples), ``weak`` keeps the
per-device batch (the global batch grows with ``n``). Output: a table on stdout and
``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

SIZES = {
    "quick": {"batch": 8, "n_in": 4, "hidden": 16, "steps": 6, "repeats": 2},
    "full": {"batch": 32, "n_in": 32, "hidden": 128, "steps": 20, "repeats": 5},
}
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """In a process with ``spec['devices']`` host devices: one configuration's numbers."""
    import brainstate
    import jax
    import jax.numpy as jnp
    import numpy as np

    import etp_nn
    from etp_algorithms import compile as etp_compile
    from etp_algorithms import shard, shard_batch, trace_bytes_per_device

    batch = spec["batch"]
    n_in, hidden, steps = spec["n_in"], spec["hidden"], spec["steps"]

    class Net(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = etp_nn.GRUCell(n_in, hidden)
            self.out = etp_nn.Linear(hidden, 2)

        def update(self, x: Any) -> Any:
            return self.out(self.rnn(x))

    def build() -> Any:
        options = {"decay_or_rank": 0.9} if spec["method"] == "es_d_rtrl" else {}
        brainstate.random.seed(1)  # the same parameters for the sharded learner and its reference
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return etp_compile(Net(), spec["method"], jnp.zeros((batch, n_in)), batch_size=batch, seed=1, **options)

    rng = np.random.default_rng(0)
    xs_np = rng.normal(size=(steps, batch, n_in)).astype(np.float32)
    ys_np = rng.normal(size=(steps, batch, 2)).astype(np.float32)

    def loss_of(learner: Any) -> Any:
        def step_loss(x: Any, y: Any) -> Any:
            return jnp.mean((learner(x) - y) ** 2)

        return step_loss

    reference = build()
    want = reference.etrace_grad(jnp.asarray(xs_np), jnp.asarray(ys_np), step_fn=loss_of(reference))

    learner = build()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    shard(learner, mesh, "data")
    xs, ys = shard_batch(xs_np, mesh, "data"), shard_batch(ys_np, mesh, "data")
    step_loss = loss_of(learner)

    @brainstate.transform.jit
    def sequence(xs: Any, ys: Any) -> Any:
        brainstate.nn.reset_all_states(
            learner.model, batch_size=batch
        )  # a new sequence: zero hidden states and traces,
        learner.reset_state()  # made inside the program, where the partitioner keeps them split
        return learner.etrace_grad(xs, ys, step_fn=step_loss)

    got = sequence(xs, ys)
    # the first call is also the warm-up
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        jax.block_until_ready(sequence(xs, ys))
        times.append(time.perf_counter() - start)
    compiled = sequence.lower(xs, ys).compile()
    kinds: dict[str, int] = {}
    for line in compiled.as_text().splitlines():
        match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = .+? ([a-z\-]+)\(", line)
        if match and match.group(1).removesuffix("-start") in COLLECTIVES:
            kinds[match.group(1)] = kinds.get(match.group(1), 0) + 1
    memory = compiled.memory_analysis()
    rel = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(1e-30, float(np.max(np.abs(np.asarray(b))))))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )
    per_device = trace_bytes_per_device(learner)
    return {
        **spec,
        "rel_err": rel,
        "trace_total": learner.trace_bytes(),
        "trace_per_device": max(per_device.values()),
        "trace_devices": len(per_device),
        "trace_specs": sorted({str(tuple(leaf.sharding.spec)) for leaf in jax.tree.leaves(learner.etrace.value)}),
        "xla_temp_per_device": int(getattr(memory, "temp_size_in_bytes", -1)),
        "xla_args_per_device": int(getattr(memory, "argument_size_in_bytes", -1)),
        "collectives": kinds,
        "ms_per_sequence": 1e3 * sorted(times)[len(times) // 2],
    }


def run_devices(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The configurations of one device count, in one fresh process with that many host devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={specs[0]['devices']}")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(specs)], capture_output=True, text=True, env=env, timeout=1800
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or len(lines) != len(specs):
        raise RuntimeError(f"configurations {specs} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(line[len("RESULT ") :]) for line in lines]


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'method':<10} {'scaling':<7} {'dev':>3} {'B':>4} {'B/dev':>5} {'rel_err':>9} {'trace total':>12} "
        f"{'trace/device':>12} {'XLA temp/dev':>12} {'ms/seq*':>8}  collectives"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items())) or "none"
        lines.append(
            f"{r['method']:<10} {r['scaling']:<7} {r['devices']:>3} {r['batch']:>4} {r['batch'] // r['devices']:>5} "
            f"{r['rel_err']:>9.1e} {r['trace_total']:>12,} {r['trace_per_device']:>12,} "
            f"{r['xla_temp_per_device']:>12,} {r['ms_per_sequence']:>8.1f}  {kinds}"
        )
    lines.append("* simulated devices share the host's cores: times are not a scaling measurement.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sharding")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        for spec in json.loads(args.worker):
            print("RESULT " + json.dumps(measure(spec)), flush=True)
        return
    size = SIZES["quick" if args.quick else "full"]
    found = []
    for n in args.devices:
        specs = [
            {
                **size,
                "method": method,
                "scaling": scaling,
                "devices": n,
                "batch": size["batch"] if scaling == "strong" else size["batch"] // max(args.devices) * n,
            }
            for method in ("d_rtrl", "es_d_rtrl")
            for scaling in ("strong", "weak")
        ]
        found.extend(run_devices(specs))
        print(f"  done: {n} device(s)", flush=True)
    order = {"d_rtrl": 0, "es_d_rtrl": 1, "strong": 0, "weak": 1}
    rows = sorted(found, key=lambda r: (order[r["method"]], order[r["scaling"]], r["devices"]))
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"sizes": size, "rows": rows}, indent=1))
    worst = max(r["rel_err"] for r in rows)
    print(f"largest relative gradient difference, sharded vs unsharded (float32): {worst:.1e}")
    if worst > 1e-5:
        raise SystemExit("the sharded gradients differ from the unsharded ones")


if __name__ == "__main__":
    main()
