"""Delayed recall: remember a cued symbol over a delay of distractors, the case where diagonal traces fail.

The task (generated here): one of ``--symbols`` symbols (one-hot) is shown at the first step
with a "cue" channel on; during the ``delay`` steps that follow a random distractor symbol is
shown at every step (no cue); then a "go" channel switches on for one step, at which the network
must output the cued symbol. Unlike evidence accumulation (``train_online.py``), solving it
needs the hidden state to keep an input's identity through the recurrent weights, so what an
online learner keeps of :math:`\\partial h^t/\\partial h^{t-1}` matters: BPTT and exact RTRL
keep all of it; ``D_RTRL`` keeps the diagonal with the ETP outputs held fixed; ``ES_D_RTRL``,
``RFLO`` less; ``SnAp``, ``UORO`` and ``KF_RTRL`` approximate it in other ways.

The network, ``GRUCell(symbols + 2, H)`` + ``Linear(H, symbols)``, is trained by every learner from
the same initial weights on the same mini-batches with the same optimizer (``_online_training.py``)
at each delay of ``--delays`` (``RTRL`` and ``SnAp-2`` with ``--learners``: their cost per step grows with
the parameter count); the table gives the held-out accuracy per delay (chance is
1/symbols), the trace memory and the time per step.

Run: ``uv run python examples/copy_task.py [--delays 5,10,20] [--quick] [--out results]``; writes
``results/copy_task.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import brainstate
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _online_training import (
    BPTT,
    LearnerSpec,
    Result,
    Split,
    available,
    common_arguments,
    fmt_bytes,
    select,
    train,
)

import braintrace

HIDDEN = 32
LEARNERS = [
    BPTT,
    LearnerSpec("D_RTRL", "d_rtrl", exact="no (diagonal of dh/dh, ETP outputs fixed)"),
    LearnerSpec("ES_D_RTRL", "es_d_rtrl", {"decay_or_rank": 0.9}, exact="no (low-rank, decayed)"),
    LearnerSpec("RTRL", "rtrl", exact="the gradient", default=False),
    LearnerSpec("SnAp-2", "snap", {"n": 2}, exact="no (2-step sparsity)", default=False),
    LearnerSpec("UORO", "uoro", exact="unbiased rank-1 estimate"),
    LearnerSpec("KF_RTRL", "kf_rtrl", exact="unbiased Kronecker estimate"),
    LearnerSpec("RFLO", "rflo", exact="no (leak-only trace, random feedback)"),
]


class Net(brainstate.nn.Module):
    def __init__(self, n_in: int, n_hidden: int, n_out: int) -> None:
        super().__init__()
        self.rnn = braintrace.nn.GRUCell(n_in, n_hidden)
        self.readout = braintrace.nn.Linear(n_hidden, n_out)

    def update(self, x: jax.Array) -> jax.Array:
        return self.readout(self.rnn(x))


def recall_data(symbols: int, delay: int, n: int, seed: int) -> Split:
    """Inputs ``(delay + 2, n, symbols + 2)``: the cued symbol at step 0, distractor symbols, "go" at the end.

    Channels: the ``symbols`` one-hot symbol channels, a "cue" channel (on at step 0 only, with the symbol to
    remember), a "go" channel (on at the last step). During the delay a random distractor symbol is shown at
    every step (without the cue), so the network must keep the cued one and ignore the others.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, symbols, size=n).astype(np.int32)
    steps = delay + 2
    xs = np.zeros((steps, n, symbols + 2), np.float32)
    xs[0, np.arange(n), labels] = 1.0
    xs[0, :, symbols] = 1.0  # cue
    distractors = rng.integers(0, symbols, size=(delay, n))
    for t in range(delay):
        xs[1 + t, np.arange(n), distractors[t]] = 1.0
    xs[-1, :, symbols + 1] = 1.0  # go
    cut = int(0.8 * n)
    return Split(xs[:, :cut], labels[:cut], xs[:, cut:], labels[cut:], n_classes=symbols)


def main(argv: list[str] | None = None) -> dict[int, list[Result]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "copy_task")
    parser.add_argument("--delays", default="5,10,20", help="comma-separated delays (distractor steps)")
    parser.add_argument("--symbols", type=int, default=4)
    parser.add_argument(
        "--hidden",
        type=int,
        default=HIDDEN,
        help=f"GRU units (default {HIDDEN}; another size is "
        "written as copy_task_h<size>.json, beside the default run's)",
    )
    parser.add_argument("--samples", type=int, default=2560, help="sequences per delay (80%% train)")
    parser.set_defaults(epochs=15, readout_steps=1)
    args = parser.parse_args(argv)
    args.readout_steps = 1
    delays = [int(d) for d in args.delays.split(",") if d.strip()]
    name = "copy_task" + ("" if args.hidden == HIDDEN else f"_h{args.hidden}")
    if args.quick:
        delays, args.hidden, args.batch, args.epochs, args.samples = [1, 3], 8, 16, 2, 160
    wanted = [s.strip() for s in args.learners.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {s.name for s in LEARNERS})
    if unknown:
        raise SystemExit(f"unknown learner(s) {unknown}; choose from {[s.name for s in LEARNERS]}")
    specs, notes = available(select(LEARNERS, wanted, args.quick))
    for note in notes:
        print(note)
    print(
        f"delayed recall of 1 of {args.symbols} symbols after {delays} distractor steps; GRU H={args.hidden}, "
        f"batch {args.batch}, {args.epochs} epochs, {args.samples} sequences per delay, float32"
    )
    n_in = args.symbols + 2
    by_delay: dict[int, list[Result]] = {}
    for delay in delays:
        data = recall_data(args.symbols, delay, args.samples, args.seed + delay)
        print(f"\ndelay {delay}:")
        by_delay[delay] = [train(s, lambda: Net(n_in, args.hidden, args.symbols), data, args) for s in specs]

    head = ("learner", *(f"acc d={d}" for d in delays), "trace memory", "ms/step", "exact")
    rows = []
    for i, spec in enumerate(specs):
        per = [by_delay[d][i] for d in delays]
        rows.append(
            (
                spec.name,
                *(f"{r.test_acc:.1%}" for r in per),
                fmt_bytes(per[-1].trace_bytes),
                f"{per[-1].ms_per_step:.3f}",
                spec.exact,
            )
        )
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print(f"(chance: {1 / args.symbols:.0%}; trace memory and ms/step at the longest delay)")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"task": "delayed recall", "symbols": args.symbols, "delays": delays, "hidden": args.hidden, "model": "GRU"}
    meta.update(epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed, quick=args.quick)
    payload = {"meta": meta, "results": {str(d): [asdict(r) for r in rs] for d, rs in by_delay.items()}}
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    _plot(by_delay, specs, args.out / f"{name}.png", args.symbols)
    print(f"\nresults: {args.out / f'{name}.json'}, {args.out / f'{name}.png'}")
    return by_delay


def _plot(by_delay: dict[int, list[Result]], specs: list[LearnerSpec], path: Path, symbols: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delays = sorted(by_delay)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, spec in enumerate(specs):
        ax.plot(delays, [by_delay[d][i].test_acc for d in delays], marker="o", label=spec.name)
    ax.axhline(1 / symbols, color="gray", linestyle=":", label="chance")
    ax.set(
        xlabel="delay (distractor steps)", ylabel="held-out accuracy", title="Delayed recall: online learners vs BPTT"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
