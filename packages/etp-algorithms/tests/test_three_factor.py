"""ThreeFactor: D-RTRL's traces gated by the caller's modulator, against D_RTRL and the rule by hand.

Oracles: with the modulator set to dL/dh^t (computed here by ``jax.grad`` of the loss through the
step's output map, on an identical model run by D_RTRL) the gradients equal D_RTRL's, step by step
and through ``etrace_grad`` (the modulator a traced sequence); with a given modulator M on a tiny
LIF layer they equal M . e written out by hand (e^t = alpha e^{t-1} + x^t), for an array, a
broadcast scalar and a callable modulator.
"""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from test_ostl import B, H, I, TinyLIF, _assert_same, _compiled, _model, _train_snn

from etp_algorithms import D_RTRL, ES_D_RTRL, MultiStepData
from etp_algorithms._three_factor import ThreeFactor
from etp_compiler import NotSupportedError

Array = jax.Array


@pytest.fixture(autouse=True)
def _dt() -> Any:
    with brainstate.environ.context(dt=1.0 * u.ms):
        yield


def test_the_modulator_dl_dh_gives_d_rtrl_on_a_gru(rng: np.random.Generator) -> None:
    xs, ys = jnp.asarray(rng.normal(size=(6, B, I))), jnp.asarray(rng.normal(size=(6, B, H)))
    ref_cell, cell = _model("gru"), _model("gru")
    ref, learner = _compiled(D_RTRL(ref_cell), xs[0]), _compiled(ThreeFactor(cell), xs[0])
    (path,) = learner.hidden_states
    gs, total = [], None
    for t in range(xs.shape[0]):
        want = brainstate.transform.grad(lambda x, y=ys[t]: jnp.sum((ref(x) - y) ** 2), ref.param_states)(xs[t])
        h = ref_cell.h.value  # the new hidden state; the GRU's output is h itself
        g = jax.grad(lambda h, y=ys[t]: jnp.sum((h - y) ** 2))(h)
        gs.append(g)
        got = brainstate.transform.grad(
            lambda x, g=g, y=ys[t]: jnp.sum((learner(x, modulator={path: g}) - y) ** 2), learner.param_states
        )(xs[t])
        _assert_same(got, want, tol=1e-12)
        total = got if total is None else jax.tree.map(jnp.add, total, got)
    # the same through etrace_grad, the modulator a traced sequence
    fresh = _compiled(ThreeFactor(_model("gru")), xs[0])
    seq = fresh.etrace_grad(
        xs, ys, jnp.stack(gs), step_fn=lambda x, y, g: jnp.sum((fresh(x, modulator=g) - y) ** 2), reduction="sum"
    )
    _assert_same(seq, total, tol=1e-12)


def test_the_modulator_dl_dh_gives_d_rtrl_on_a_lif_layer(rng: np.random.Generator) -> None:
    T, Bt, It, O, alpha, theta = 6, 2, 3, 4, 0.8, 0.4
    w = jnp.asarray(rng.normal(size=(It, O)))
    xs = jnp.asarray(rng.uniform(size=(T, Bt, It)) < 0.5, dtype=jnp.float64)
    target = jnp.asarray(rng.uniform(size=(Bt, O)))
    ref_model, model = TinyLIF(w, alpha, theta, Bt), TinyLIF(w, alpha, theta, Bt)
    ref, learner = _compiled(D_RTRL(ref_model), xs[0]), _compiled(ThreeFactor(model), xs[0])
    for t in range(T):
        want = brainstate.transform.grad(lambda x: jnp.sum((ref(x) - target) ** 2), ref.param_states)(xs[t])
        v = ref_model.v.value
        g = jax.grad(lambda v: jnp.sum((ref_model.spike(v - theta) - target) ** 2))(v)
        got = brainstate.transform.grad(
            lambda x, g=g: jnp.sum((learner(x, modulator=g) - target) ** 2), learner.param_states
        )(xs[t])
        _assert_same(got, want, tol=1e-12)
        assert float(jnp.max(jnp.abs(got[("w",)]))) > 0


@pytest.mark.parametrize("form", ["array", "scalar", "callable", "default"])
def test_a_given_modulator_equals_m_dot_e_by_hand(form: str, rng: np.random.Generator) -> None:
    T, Bt, It, O, alpha, theta = 5, 2, 3, 4, 0.7, 0.4
    w = jnp.asarray(rng.normal(size=(It, O)))
    xs = jnp.asarray(rng.uniform(size=(T, Bt, It)) < 0.5, dtype=jnp.float64)
    Ms = jnp.asarray(rng.normal(size=(T, Bt, O)))
    target, reward = jnp.asarray(rng.uniform(size=(Bt, O))), 0.3
    model = TinyLIF(w, alpha, theta, Bt)
    if form == "callable":
        learner = ThreeFactor(model, modulator=lambda out, hidden: reward * (out - target))
    elif form == "default":
        learner = ThreeFactor(model, modulator=Ms[0])
    else:
        learner = ThreeFactor(model)
    _compiled(learner, xs[0])
    e, v = jnp.zeros((Bt, It)), jnp.zeros((Bt, O))
    for t in range(T):
        kwargs = {"array": {"modulator": Ms[t]}, "scalar": {"modulator": reward}}.get(form, {})
        # the loss is anything: the modulator alone decides the trace weight's update
        got = brainstate.transform.grad(lambda x, kw=kwargs: 7.0 * jnp.sum(learner(x, **kw)), learner.param_states)(
            xs[t]
        )
        v = alpha * v - theta * jnp.asarray(v - theta > 0, jnp.float64) + xs[t] @ w
        s = jnp.asarray(v - theta > 0, jnp.float64)
        M = {"array": Ms[t], "scalar": jnp.full((Bt, O), reward), "callable": reward * (s - target), "default": Ms[0]}[
            form
        ]
        e = alpha * e + xs[t]  # D = alpha, D_f = 1: e_{b,i,o} = e_{b,i} for every o
        np.testing.assert_allclose(got[("w",)], e.T @ M, rtol=1e-10, atol=1e-12)


def test_a_readout_keeps_its_gradient_and_a_partial_dict_zeros_the_rest(rng: np.random.Generator) -> None:
    xs = jnp.asarray(rng.normal(size=(4, B, I)))
    ref, learner = _compiled(D_RTRL(_model("snn")), xs[0]), _compiled(ThreeFactor(_model("snn")), xs[0])
    assert ("out", "r") in learner.hidden_states
    for t in range(xs.shape[0]):
        want = brainstate.transform.grad(lambda x: jnp.sum(ref(x) ** 2), ref.param_states)(xs[t])

        # the readout's state r is the output: its dL/dr = 2 r; every other state gets no modulator
        def loss(x: Array) -> Array:
            out = learner(x, modulator={("out", "r"): 2 * ref.model.out.r.value})
            return jnp.sum(out**2)

        got = brainstate.transform.grad(loss, learner.param_states)(xs[t])
        _assert_same({p: got[p] for p in got if p[0] == "out"}, {p: want[p] for p in want if p[0] == "out"}, 1e-12)


def test_an_snn_trained_online_reduces_its_loss() -> None:
    """The readout's error as the modulator of the readout state (a callable), zero elsewhere."""
    box: dict[str, Array] = {}

    def make(model: brainstate.nn.Module) -> ThreeFactor:
        def error(out: Array, hidden: Any) -> dict[Any, Array]:
            n = out.shape[-1]
            return {("out", "r"): (jax.nn.softmax(out) - jax.nn.one_hot(box["labels"], n)) / out.shape[0]}

        return ThreeFactor(model, modulator=error)

    first, last = _train_snn(make, labels_box=box)
    assert np.isfinite(last) and last < 0.8 * first, (first, last)


def test_bad_modulators() -> None:
    lif = TinyLIF(jnp.ones((3, 4)), 0.8, 0.4, 2)
    learner = _compiled(ThreeFactor(lif), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"hidden state v must have the state's shape \(2, 4\).*got shape \(3,\)"):
        learner(jnp.zeros((2, 3)), modulator=jnp.zeros(3))
    with pytest.raises(ValueError, match="names nope, which is not a hidden state.*its hidden states: v"):
        learner(jnp.zeros((2, 3)), modulator={("nope",): jnp.zeros((2, 4))})
    snn = _compiled(ThreeFactor(_model("snn")), jnp.zeros((B, I)))
    with pytest.raises(ValueError, match="pass the modulator as a dict"):
        snn(jnp.zeros((B, I)), modulator=jnp.zeros((B, H)))
    plain = _compiled(ES_D_RTRL(TinyLIF(jnp.ones((3, 4)), 0.8, 0.4, 2), 0.5), jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="ES_D_RTRL takes no modulator="):
        plain(jnp.zeros((2, 3)), modulator=jnp.zeros((2, 4)))
    window = _compiled(ThreeFactor(TinyLIF(jnp.ones((3, 4)), 0.8, 0.4, 2), vjp_method="multi-step"), jnp.zeros((2, 3)))
    with pytest.raises(NotSupportedError, match="a modulator applies to one step"):
        window(MultiStepData(jnp.zeros((3, 2, 3))), modulator=jnp.zeros((2, 4)))
    # nothing was written by the refused calls
    assert jnp.all(lif.v.value == 0)
    assert window(MultiStepData(jnp.ones((3, 2, 3)))).shape == (3, 2, 4)  # a window without one runs
