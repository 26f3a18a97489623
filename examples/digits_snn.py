"""Handwritten digits as Poisson spike trains, classified by a recurrent ALIF network learned online.

The 8x8 digits of scikit-learn (1,797 images, shipped inside the package: no download; split
80/20 with a fixed seed) are rate coded: each of the 64 pixels is an input channel that spikes
at every step with probability ``--max-rate`` times its intensity (intensities in [0, 1]), over
``--steps`` steps (default 60; the spike trains are drawn once per image from the seed, so every
learner sees the same spikes).

The network is the one of ``snn_online.py``: adaptive LIF neurons (``braintrace.nn.ALIF``) driven
by the input and by their own spikes of the previous step (two ``braintrace.nn.Linear``), read
out by a leaky rate integrator (``braintrace.nn.LeakyRateReadout``); the class is the argmax of
the readout averaged over the last ``--readout-steps`` steps. Every learner trains it from the
same initial weights, on the same mini-batches, with the same optimizer (see
``_online_training.py``): BPTT, and online ``ES_D_RTRL``, ``D_RTRL`` and the spiking-network
learners of the library (``EProp``, ``OSTL``, ``OTTT``) where this installation has them.

Run: ``uv run python examples/digits_snn.py [--quick] [--out results]``; the table is printed,
``results/digits_snn.json`` and ``.png`` are written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import brainstate
import numpy as np
import saiunit as u

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _online_training import BPTT, LearnerSpec, Split, common_arguments, run
from snn_online import RecurrentALIF

LEARNERS = [
    BPTT,
    LearnerSpec("ES_D_RTRL", "es_d_rtrl", {"decay_or_rank": 0.9}, exact="no (low-rank, decayed)"),
    LearnerSpec("D_RTRL", "d_rtrl", exact="no (the spike is read before the reset)"),
    LearnerSpec("EProp", "eprop", exact="no (symmetric e-prop, truncated)"),
    LearnerSpec("OSTL", "ostl_recurrent", exact="as D_RTRL"),
    LearnerSpec("OTTT", "ottt", exact="no (instantaneous error, presynaptic trace)"),
]


def spike_digits(steps: int, max_rate: float, seed: int, limit: int | None = None) -> Split:
    """Poisson (Bernoulli per step) spike trains ``(steps, N, 64)`` of the digits, drawn once from ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    if limit is not None:
        order = order[:limit]
    rates = (data.images.reshape(-1, 64)[order] / 16.0) * max_rate  # (N, 64) spike probability per step
    labels = data.target[order].astype(np.int32)
    spikes = (rng.uniform(size=(steps, *rates.shape)) < rates[None]).astype(np.float32)
    cut = int(0.8 * len(labels))
    return Split(spikes[:, :cut], labels[:cut], spikes[:, cut:], labels[cut:], n_classes=10)


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "digits_snn")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-rate", type=float, default=0.3, help="spike probability per step of a full pixel")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--readout-steps", type=int, default=10)
    parser.set_defaults(epochs=20, lr=0.005)
    args = parser.parse_args(argv)
    limit = None
    if args.quick:
        args.steps, args.hidden, args.batch, args.epochs, args.readout_steps, limit = 12, 16, 16, 2, 4, 160
    brainstate.environ.set(dt=1.0 * u.ms)  # the neurons' time step
    data = spike_digits(args.steps, args.max_rate, args.seed, limit)
    print(
        f"spiking digits: {data.y_train.size} train / {data.y_test.size} test spike trains of {args.steps} steps x 64 "
        f"channels (max rate {args.max_rate}/step); recurrent ALIF H={args.hidden}, batch {args.batch}, "
        f"{args.epochs} epochs, float32"
    )
    meta = {"task": "spiking digits", "steps": args.steps, "hidden": args.hidden, "model": "recurrent ALIF"}
    return run(LEARNERS, lambda: RecurrentALIF(64, args.hidden, 10), data, args, meta, "Spiking digits: online vs BPTT")


if __name__ == "__main__":
    main()
