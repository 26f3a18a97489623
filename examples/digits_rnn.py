"""Handwritten digits read as a sequence by a GRU, learned online by every RNN learner and by BPTT.

The data are the 8x8 handwritten digits that scikit-learn ships inside the package (1,797 images,
``sklearn.datasets.load_digits``: no download), split 80/20 into train and test with a fixed seed.
Two readings of an image:

* ``--mode rows`` (default): 8 steps of 8 pixels, a row per step;
* ``--mode pixels``: 64 steps of 1 pixel, a small "sequential MNIST" that needs a long memory.

The network, ``GRUCell(I, H)`` + ``Linear(H, 10)``, classifies from the mean of its outputs over
the last ``--readout-steps`` steps. Every learner trains it from the same initial weights on the
same mini-batches with the same optimizer (see ``_online_training.py``): BPTT through the whole
sequence, and online ``D_RTRL``, ``ES_D_RTRL`` and the other RNN learners of the library
(``UORO``, ``KF_RTRL``, ``RFLO``; ``RTRL`` and ``SnAp-2`` with ``--learners RTRL,SnAp-2``: their
step costs one forward-mode pass per parameter, over an hour at the default sizes on 2 cores) where
this installation has them. A default run takes a few minutes on 2 cores.

Run: ``uv run python examples/digits_rnn.py [--mode pixels] [--quick] [--out results]``; the table is
printed, ``results/digits_rnn_<mode>.json`` and ``.png`` are written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import brainstate
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _online_training import BPTT, LearnerSpec, Split, common_arguments, run

import braintrace

HIDDEN = 32
LEARNERS = [
    BPTT,
    LearnerSpec("D_RTRL", "d_rtrl", exact="leaky integrators; diagonal of dh/dh otherwise"),
    LearnerSpec("ES_D_RTRL", "es_d_rtrl", {"decay_or_rank": 0.9}, exact="no (low-rank, decayed)"),
    LearnerSpec("RTRL", "rtrl", exact="the gradient (memory O(B*N*theta))", default=False),
    LearnerSpec("SnAp-2", "snap", {"n": 2}, exact="no (2-step sparsity)", default=False),
    LearnerSpec("UORO", "uoro", exact="unbiased rank-1 estimate"),
    LearnerSpec("KF_RTRL", "kf_rtrl", exact="unbiased Kronecker estimate"),
    LearnerSpec("RFLO", "rflo", exact="no (leak-only trace, random feedback)"),
]


class Net(brainstate.nn.Module):
    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.rnn = braintrace.nn.GRUCell(n_in, n_hidden)
        self.readout = braintrace.nn.Linear(n_hidden, 10)

    def update(self, x: jax.Array) -> jax.Array:
        return self.readout(self.rnn(x))


def digits(mode: str, seed: int, limit: int | None = None) -> Split:
    """The digits as time-major sequences: ``(8, N, 8)`` row by row or ``(64, N, 1)`` pixel by pixel, in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # (N, 8, 8), pixel values 0..16
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    if limit is not None:
        order = order[:limit]
    images, labels = images[order], labels[order]
    seq = images if mode == "rows" else images.reshape(len(labels), 64, 1)
    xs = np.transpose(seq, (1, 0, 2))  # time-major (T, N, I)
    cut = int(0.8 * len(labels))
    return Split(xs[:, :cut], labels[:cut], xs[:, cut:], labels[cut:], n_classes=10)


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "digits_rnn")
    parser.add_argument("--mode", choices=("rows", "pixels"), default="rows")
    parser.add_argument(
        "--hidden",
        type=int,
        default=HIDDEN,
        help=f"GRU units (default {HIDDEN}; another size is written as <name>_h<size>.json, beside the default run's)",
    )
    parser.add_argument("--readout-steps", type=int, default=None, help="default: 2 (rows) or 8 (pixels)")
    parser.set_defaults(epochs=30)
    args = parser.parse_args(argv)
    args.readout_steps = args.readout_steps or (2 if args.mode == "rows" else 8)
    args.name = f"digits_rnn_{args.mode}" + ("" if args.hidden == HIDDEN else f"_h{args.hidden}")
    limit = None
    if args.quick:
        args.hidden, args.batch, args.epochs, limit = 8, 16, 2, 160
    data = digits(args.mode, args.seed, limit)
    steps, n_in = data.x_train.shape[0], data.x_train.shape[2]
    print(
        f"digits ({args.mode}): {data.y_train.size} train / {data.y_test.size} test sequences of {steps} steps x "
        f"{n_in} inputs; GRU H={args.hidden}, batch {args.batch}, {args.epochs} epochs, float32"
    )
    meta = {"task": f"digits, {args.mode}", "steps": steps, "hidden": args.hidden, "model": "GRU"}
    return run(
        LEARNERS, lambda: Net(n_in, args.hidden), data, args, meta, f"Digits read by {args.mode}: online vs BPTT"
    )


if __name__ == "__main__":
    main()
