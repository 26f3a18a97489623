"""``etrace_grad(chunk_size=T)`` is BPTT for any model: an LSTM, a two-layer LSTM->GRU, a LIF network.

A window covering the whole sequence from reset traces is exact reverse mode; the oracle is
``jax.grad`` through the unrolled model itself (``_bptt_of``, the states saved and restored).
"""

from __future__ import annotations

import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from algorithms_testing import _rel
from test_multi_step import SNN, TwoLayer, _bptt_of

import etp_nn
from etp_algorithms import D_RTRL, ES_D_RTRL, MultiStepData


@pytest.mark.parametrize("algorithm", ["D_RTRL", "ES_D_RTRL"])
@pytest.mark.parametrize("kind", ["lstm", "two-layer", "snn"])
def test_chunk_size_t_equals_bptt(kind: str, algorithm: str, rng: np.random.Generator) -> None:
    steps = 5
    with brainstate.environ.context(dt=1.0 * u.ms):
        model = {"lstm": lambda: etp_nn.LSTMCell(3, 4), "two-layer": TwoLayer, "snn": SNN}[kind]()
        brainstate.nn.init_all_states(model, batch_size=2)
        xs = jnp.asarray(rng.normal(size=(steps, 2, 3)))
        target = jnp.asarray(rng.normal(size=(steps, 2, {"lstm": 4, "two-layer": 3, "snn": 2}[kind])))
        want = _bptt_of(model, xs, target)
        learner = (
            D_RTRL(model, vjp_method="multi-step")
            if algorithm == "D_RTRL"
            else ES_D_RTRL(model, 0.7, vjp_method="multi-step")
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner.compile_graph(xs[0])

        def window_loss(x: jax.Array, y: jax.Array) -> jax.Array:
            return jnp.sum((learner(MultiStepData(x)) - y) ** 2, axis=(1, 2))

        got = learner.etrace_grad(xs, target, step_fn=window_loss, chunk_size=steps, reduction="sum")
    assert set(got) == set(want)
    for path, value in want.items():
        for leaf_got, leaf_want in zip(jax.tree.leaves(got[path]), jax.tree.leaves(value), strict=True):
            assert _rel(leaf_got, leaf_want) < 1e-9, path
