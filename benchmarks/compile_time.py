"""Compile time of the ETP compiler: ``compile_etrace_graph`` on a 4-layer GRU of 256 units.

Run: ``uv run python benchmarks/compile_time.py [--layers 4] [--hidden 256] [--repeats 5]``.
Prints the median over repeats (a fresh model each time, so nothing is cached)
and writes ``results/compile_time.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import brainstate
import jax
import jax.numpy as jnp

import braintrace


class StackedGRU(brainstate.nn.Module):
    def __init__(self, n_in: int, n_hidden: int, n_layers: int, n_out: int) -> None:
        super().__init__()
        sizes = [n_in] + [n_hidden] * n_layers
        self.layers = [braintrace.nn.GRUCell(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        self.readout = braintrace.nn.Linear(n_hidden, n_out)

    def update(self, x: Any) -> Any:
        for layer in self.layers:
            x = layer(x)
        return self.readout(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    x = jnp.zeros((args.batch, 64))
    times = []
    for _ in range(args.repeats):
        model = StackedGRU(64, args.hidden, args.layers, 10)
        brainstate.nn.init_all_states(model, batch_size=args.batch)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = braintrace.compile_etrace_graph(model, x)
        times.append(time.perf_counter() - start)
        print(f"  run {len(times)}: {times[-1]:.3f} s")
    result = {
        "benchmark": "compile_etrace_graph",
        "model": f"{args.layers}-layer GRU, H={args.hidden}, B={args.batch}, I=64",
        "first_s": times[0],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": args.repeats,
        "hidden_groups": len(graph.hidden_groups),
        "relations": len(graph.hidden_param_op_relations),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }
    out = Path("results")
    out.mkdir(exist_ok=True)
    (out / "compile_time.json").write_text(json.dumps(result, indent=2))
    print(
        f"compile_etrace_graph, {result['model']}: first {result['first_s']:.3f} s, median {result['median_s']:.3f} s "
        f"(min {result['min_s']:.3f} s over {args.repeats}); {result['hidden_groups']} groups, "
        f"{result['relations']} relations"
    )


if __name__ == "__main__":
    main()
