"""Multi-step windows: exact reverse mode inside a window, eligibility traces across windows."""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from algorithms_testing import Driven, _bptt, _cases, _rel

import etp_nn
from etp_algorithms import D_RTRL, ES_D_RTRL, MultiStepData, SingleStepData

Array = jax.Array


def _windowed_grads(learner: Any, model: brainstate.nn.Module, xs: Array, window: int, loss: Any) -> Any:
    params = model.states(brainstate.ParamState)
    total = None
    for start in range(0, xs.shape[0], window):
        chunk = xs[start : start + window]
        g = brainstate.transform.grad(lambda c: loss(learner(MultiStepData(c))), params)(chunk)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


@pytest.mark.parametrize("window", [8, 2])
@pytest.mark.parametrize("name", ["mm+bias", "conv1d+bias"])
def test_windows_on_an_exact_model_equal_bptt(name: str, window: int, rng: np.random.Generator) -> None:
    op, weights, xs, leak, h_shape = _cases(rng)[name]
    xs = xs[:8]
    leak_full = jnp.broadcast_to(leak, h_shape)
    r = jnp.asarray(rng.normal(size=h_shape))
    model = Driven(op, weights, leak_full, h_shape)
    learner = D_RTRL(model, vjp_method="multi-step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    got = _windowed_grads(learner, model, xs, window, lambda hs: jnp.sum(r * jnp.sin(hs)))[("w",)]
    want = _bptt(op, weights, xs, leak_full, h_shape, r, 8)
    for key in want:
        assert _rel(got[key], want[key]) < 1e-10, key


def test_full_window_on_a_gru_equals_bptt(rng: np.random.Generator) -> None:
    cell = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(cell, batch_size=2)
    xs = jnp.asarray(rng.normal(size=(6, 2, 3)))
    target = jnp.asarray(rng.normal(size=(6, 2, 4)))
    init = {p: s.value for p, s in cell.states(brainstate.ParamState).items()}
    learner = D_RTRL(cell, vjp_method="multi-step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    got = _windowed_grads(learner, cell, xs, 6, lambda hs: jnp.sum((hs - target) ** 2))

    def bptt(p: dict[Any, Any]) -> Array:
        def lin(key: str, inp: Array) -> Array:
            return inp @ p[(key, "weight")]["weight"] + p[(key, "weight")]["bias"]

        h, loss = jnp.zeros((2, 4)), 0.0
        for t in range(6):
            xh = jnp.concatenate([xs[t], h], -1)
            z, r = jax.nn.sigmoid(lin("Wz", xh)), jax.nn.sigmoid(lin("Wr", xh))
            cand = jnp.tanh(lin("Wh", jnp.concatenate([xs[t], r * h], -1)))
            h = (1 - z) * h + z * cand
            loss = loss + jnp.sum((h - target[t]) ** 2)
        return loss

    want = jax.grad(bptt)(init)
    for path in want:
        for key in want[path]:
            assert _rel(got[path][key], want[path][key]) < 1e-10, (path, key)


def test_window_outputs_and_errors(rng: np.random.Generator) -> None:
    op, weights, xs, leak, h_shape = _cases(rng)["mm+bias"]
    model = Driven(op, weights, jnp.broadcast_to(leak, h_shape), h_shape)
    learner = D_RTRL(model)
    learner.compile_graph(xs[0])
    outs = learner(MultiStepData(xs[:3]))
    assert outs.shape == (3, *h_shape)
    with pytest.raises(ValueError, match="input shapes"):
        learner(MultiStepData(jnp.ones((3, 2, 4))))


@pytest.mark.parametrize("kind", ["D_RTRL", "ES_D_RTRL"])
def test_a_plain_call_on_a_multi_step_learner_is_one_step(kind: str, rng: np.random.Generator) -> None:
    """As in braintrace 0.2.8: only MultiStepData makes a window; a plain call (or SingleStepData) is one step, with the
    gradient and traces of the single-step learner's step."""
    op, weights, xs, leak, h_shape = _cases(rng)["mm+bias"]
    results = []
    for vjp_method, wrap in (("single-step", None), ("multi-step", None), ("multi-step", SingleStepData)):
        model = Driven(op, weights, jnp.broadcast_to(leak, h_shape), h_shape)
        learner = (
            D_RTRL(model, vjp_method=vjp_method) if kind == "D_RTRL" else ES_D_RTRL(model, 0.6, vjp_method=vjp_method)
        )
        learner.compile_graph(xs[0])
        params = model.states(brainstate.ParamState)
        grads = None
        for t in range(3):
            x = xs[t] if wrap is None else wrap(xs[t])
            g = brainstate.transform.grad(lambda x=x, learner=learner: jnp.sum(jnp.sin(learner(x))), params)()
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        results.append((grads, learner.etrace.value, model.h.value))
    for other in results[1:]:
        for got, want in zip(jax.tree.leaves(other), jax.tree.leaves(results[0]), strict=True):
            assert _rel(got, want) < 1e-12
    model = Driven(op, weights, jnp.broadcast_to(leak, h_shape), h_shape)
    learner = D_RTRL(model, vjp_method="multi-step")
    learner.compile_graph(xs[0])
    with pytest.raises(
        ValueError, match=r"differ from the compiled .* passed as MultiStepData\(x\): a plain call is one step"
    ):
        learner(xs[:3])  # a window's shape, not wrapped: refused with the hint, never read as a batch
    assert jnp.all(model.h.value == 0)


class TwoLayer(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = etp_nn.LSTMCell(3, 4)
        self.l2 = etp_nn.GRUCell(4, 3)

    def update(self, x: Array) -> Array:
        return self.l2(self.l1(x))


class SNN(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = etp_nn.Linear(3, 5)
        self.lif = etp_nn.LIF(5, tau=4.0 * u.ms, V_th=0.5 * u.mV)
        self.out = etp_nn.LeakyRateReadout(5, 2, tau=3.0 * u.ms)

    def update(self, x: Array) -> Array:
        return self.out(self.lif(self.inp(x) * u.mV))


def _bptt_of(model: brainstate.nn.Module, xs: Array, target: Array) -> Any:
    """jax.grad through the unrolled model itself (its states saved and restored around)."""
    params = model.states(brainstate.ParamState)
    saved = {p: s.value for p, s in model.states().items()}

    def loss() -> Array:
        total = 0.0
        for t in range(xs.shape[0]):
            total = total + jnp.sum((model(xs[t]) - target[t]) ** 2)
        return total

    grads = brainstate.transform.grad(loss, params)()
    for p, s in model.states().items():
        s.value = saved[p]
    return grads


@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl"])
@pytest.mark.parametrize("kind", ["lstm", "two-layer", "snn"])
def test_full_window_equals_bptt(kind: str, algorithm: str, rng: np.random.Generator) -> None:
    with brainstate.environ.context(dt=1.0 * u.ms):
        model = {"lstm": lambda: etp_nn.LSTMCell(3, 4), "two-layer": TwoLayer, "snn": SNN}[kind]()
        brainstate.nn.init_all_states(model, batch_size=2)
        xs = jnp.asarray(rng.normal(size=(5, 2, 3)))
        out_size = {"lstm": 4, "two-layer": 3, "snn": 2}[kind]
        target = jnp.asarray(rng.normal(size=(5, 2, out_size)))
        want = _bptt_of(model, xs, target)
        learner = (
            D_RTRL(model, vjp_method="multi-step")
            if algorithm == "d_rtrl"
            else ES_D_RTRL(model, 0.7, vjp_method="multi-step")
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner.compile_graph(xs[0])
        got = _windowed_grads(learner, model, xs, 5, lambda ys: jnp.sum((ys - target) ** 2))
    for path, value in want.items():
        for leaf_got, leaf_want in zip(jax.tree.leaves(got[path]), jax.tree.leaves(value), strict=True):
            assert _rel(leaf_got, leaf_want) < 1e-9, path


def test_es_windows_carry_the_traces(rng: np.random.Generator) -> None:
    """Two windows of 3 with ES_D_RTRL: the second window's start gradient comes from the traces (non-zero)."""
    op, weights, xs, leak, h_shape = _cases(rng)["mm+bias"]
    model = Driven(op, weights, jnp.broadcast_to(leak, h_shape), h_shape)
    learner = ES_D_RTRL(model, 0.8, vjp_method="multi-step")
    learner.compile_graph(xs[0])
    r = jnp.asarray(rng.normal(size=h_shape))
    two = _windowed_grads(learner, model, xs[:6], 3, lambda hs: jnp.sum(r * jnp.sin(hs)))
    exact = _bptt(op, weights, xs, jnp.broadcast_to(leak, h_shape), h_shape, r, 6)
    # close to BPTT (ES is approximate across windows) but not identical
    err = _rel(two[("w",)]["weight"], exact["weight"])
    assert 0 < err < 0.5
