"""Every registered recurrent-network learner reduces the loss of a small task trained online (a cut of 3x or more).

The task: a GRU with a linear readout reproduces a smoothed copy of its input, ``y^t = (x^t + x^{t-1}) / 2``
(one step of memory), on fresh random sequences; each sequence gives one plain gradient step from
``etrace_grad``. The loss of the last sequences is compared with that of the first ones.
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_algorithms
import etp_nn

B, I, H, T = 8, 2, 8, 10
LEARNERS: dict[str, dict[str, Any]] = {
    "d_rtrl": {},
    "es_d_rtrl": {"decay_or_rank": 0.9},
    "rtrl": {},
    "snap": {"n": 2},
    "uoro": {"projection_key": 0},
    "kf_rtrl": {"projection_key": 0},
    "rflo": {"feedback": "symmetric"},
    "ostl_recurrent": {},
    "dni": {},
}
#: Learners driven in windows of this many steps (DNI: exact inside a window, its synthesizer's estimate at the end).
CHUNK: dict[str, int] = {"dni": 5}


class Net(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = etp_nn.GRUCell(I, H)
        self.out = etp_nn.Linear(H, I)

    def update(self, x: jax.Array) -> jax.Array:
        return self.out(self.rnn(x))


def _losses(name: str, options: dict[str, Any], sequences: int = 120, lr: float = 0.1) -> np.ndarray:
    brainstate.random.seed(0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = etp_algorithms.compile(model, name, jnp.zeros((B, I)), batch_size=B, **options)
    params = model.states(brainstate.ParamState)
    chunking = {"chunk_size": CHUNK[name]} if name in CHUNK else {}

    def step_loss(x: jax.Array, y: jax.Array) -> jax.Array:
        if chunking:  # a window: the inputs as MultiStepData, one loss per step of it
            return jnp.mean((learner(etp_algorithms.MultiStepData(x)) - y) ** 2, axis=tuple(range(1, y.ndim)))
        return jnp.mean((learner(x) - y) ** 2)

    @brainstate.transform.jit
    def train(xs: jax.Array, ys: jax.Array) -> jax.Array:
        brainstate.nn.reset_all_states(model, batch_size=B)
        learner.reset_state()
        grads, loss = learner.etrace_grad(
            xs, ys, step_fn=step_loss, weights=params, loss_output="scalar", return_value=True, **chunking
        )
        for path, state in params.items():
            state.value = jax.tree.map(lambda p, g: p - lr * g, state.value, grads[path])
        return loss

    rng = np.random.default_rng(1)
    out = []
    for _ in range(sequences):
        xs = rng.normal(size=(T + 1, B, I))
        ys = 0.5 * (xs[1:] + xs[:-1])
        out.append(float(train(jnp.asarray(xs[1:]), jnp.asarray(ys))))
    return np.asarray(out)


def test_every_rnn_learner_is_listed() -> None:
    """A learner registered for recurrent networks is either trained below or named here as out of scope."""
    out_of_scope = {"esd_rtrl", "pp_prop", "ostl_feedforward", "three_factor"}  # aliases; no memory; needs a modulator
    spiking = {"eprop", "ottt"}  # trained on a spiking task in test_eprop.py / test_ottt.py
    assert set(etp_algorithms.registered_learners()) - set(LEARNERS) - out_of_scope - spiking == set()


@pytest.mark.parametrize("name", list(LEARNERS))
def test_online_training_cuts_the_loss(name: str) -> None:
    if name not in etp_algorithms.registered_learners():
        pytest.fail(f"learner {name!r} is listed here but not registered")
    losses = _losses(name, LEARNERS[name])
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert np.all(np.isfinite(losses))
    assert last * 3 <= first, f"{name}: mean loss {first:.4f} over the first sequences, {last:.4f} over the last"
