"""ES_D_RTRL (pp_prop): exact at T = 1, the rule written out by hand for a leaky tanh RNN, and its contract."""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algorithms_testing import CASES, Driven, _bptt, _cases, _rel

import etp_primitives as etp
from etp_algorithms import ES_D_RTRL, IODimVjpAlgorithm, pp_prop

Array = jax.Array


@pytest.mark.parametrize("name", CASES)
def test_es_d_rtrl_equals_bptt_at_one_step(name: str, rng: np.random.Generator) -> None:
    op, weights, xs, leak, h_shape = _cases(rng)[name]
    leak_full = jnp.broadcast_to(leak, h_shape)
    r = jnp.asarray(rng.normal(size=h_shape))
    model = Driven(op, weights, leak_full, h_shape)
    learner = ES_D_RTRL(model, 0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    got = brainstate.transform.grad(lambda x: jnp.sum(r * jnp.sin(learner(x))), model.states(brainstate.ParamState))(
        xs[0]
    )[("w",)]
    want = _bptt(op, weights, xs, leak_full, h_shape, r, 1)
    for key in want:
        assert _rel(got[key], want[key]) < 1e-10, key


class LeakyTanh(brainstate.nn.Module):
    """h' = alpha * h + (1 - alpha) * tanh(x W): D = alpha, D_f = (1 - alpha) * sech^2(x W)."""

    def __init__(self, w: Array, alpha: float, batch: int) -> None:
        super().__init__()
        self.alpha = alpha
        self.w = brainstate.ParamState(w)
        self.h = brainstate.HiddenState(jnp.zeros((batch, w.shape[1])))

    def update(self, x: Any) -> Array:
        self.h.value = self.alpha * self.h.value + (1 - self.alpha) * jnp.tanh(etp.matmul(x, self.w.value))
        return self.h.value


@pytest.mark.parametrize("decay_or_rank", [0.7, 3])
def test_rule_written_out_by_hand(decay_or_rank: float | int, rng: np.random.Generator) -> None:
    T, B, I, O, alpha = 7, 2, 3, 4, 0.8
    w = jnp.asarray(rng.normal(size=(I, O)))
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    target = jnp.asarray(rng.normal(size=(B, O)))
    model = LeakyTanh(w, alpha, B)
    learner = pp_prop(model, decay_or_rank)
    a = decay_or_rank if isinstance(decay_or_rank, float) else (decay_or_rank - 1) / (decay_or_rank + 1)
    assert learner.decay == pytest.approx(a)
    learner.compile_graph(xs[0])
    params = model.states(brainstate.ParamState)
    eps_x, eps_f, h = jnp.zeros((B, I)), jnp.zeros((B, O)), jnp.zeros((B, O))
    for t in range(T):
        got = brainstate.transform.grad(lambda x: jnp.sum((learner(x) - target) ** 2), params)(xs[t])[("w",)]
        pre = xs[t] @ w
        h = alpha * h + (1 - alpha) * jnp.tanh(pre)
        g = 2 * (h - target)
        Df = (1 - alpha) * (1 - jnp.tanh(pre) ** 2)
        eps_x = a * eps_x + xs[t]
        eps_f = a * alpha * eps_f + (1 - a) * Df
        want = eps_x.T @ (g * eps_f) / (1 - a ** (t + 1))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert learner.trace_bytes() == (B * I + B * O) * 8 + 4  # eps_x, eps_f and the step counter
    learner.reset_state()
    assert int(learner.etrace.value["steps"]) == 0


class Adaptive(brainstate.nn.Module):
    """Two coupled states: v' = alpha v - beta w + tanh(x W), w' = rho w + kappa v'."""

    def __init__(self, weight: Array, batch: int) -> None:
        super().__init__()
        self.alpha, self.beta, self.rho, self.kappa = 0.8, 0.3, 0.6, 0.5
        self.weight = brainstate.ParamState(weight)
        self.v = brainstate.HiddenState(jnp.zeros((batch, weight.shape[1])))
        self.w = brainstate.HiddenState(jnp.zeros((batch, weight.shape[1])))

    def update(self, x: Any) -> tuple[Array, Array]:
        v = self.alpha * self.v.value - self.beta * self.w.value + jnp.tanh(etp.matmul(x, self.weight.value))
        self.w.value = self.rho * self.w.value + self.kappa * v
        self.v.value = v
        return v, self.w.value


def test_two_state_rule_written_out_by_hand(rng: np.random.Generator) -> None:
    """The S x S propagation and the sum over states, for a group of two coupled states."""
    T, B, I, O, a = 6, 2, 3, 4, 0.7
    weight = jnp.asarray(rng.normal(size=(I, O)))
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    target, c = jnp.asarray(rng.normal(size=(B, O))), jnp.asarray(rng.normal(size=(B, O)))
    model = Adaptive(weight, B)
    learner = ES_D_RTRL(model, a)
    learner.compile_graph(xs[0])
    (group,) = learner.graph.hidden_groups
    assert group.num_state == 2
    params = model.states(brainstate.ParamState)

    def loss(x: Array) -> Array:
        v, w = learner(x)
        return jnp.sum((v - target) ** 2) + jnp.sum(c * w)

    al, be, rho, ka = model.alpha, model.beta, model.rho, model.kappa
    # D[s][s'] = dh_s^t / dh_{s'}^{t-1}, Df[s] = dh_s^t / dy^t (y = x W)
    D = {("v", "v"): al, ("v", "w"): -be, ("w", "v"): ka * al, ("w", "w"): rho - ka * be}
    eps_x = jnp.zeros((B, I))
    eps_f = {"v": jnp.zeros((B, O)), "w": jnp.zeros((B, O))}
    v, w = jnp.zeros((B, O)), jnp.zeros((B, O))
    for t in range(T):
        got = brainstate.transform.grad(loss, params)(xs[t])[("weight",)]
        sech2 = 1 - jnp.tanh(xs[t] @ weight) ** 2
        v = al * v - be * w + jnp.tanh(xs[t] @ weight)
        w = rho * w + ka * v
        Df = {"v": sech2, "w": ka * sech2}
        eps_x = a * eps_x + xs[t]
        eps_f = {s: a * sum(D[(s, s2)] * eps_f[s2] for s2 in "vw") + (1 - a) * Df[s] for s in "vw"}
        g = {"v": 2 * (v - target), "w": c}
        want = eps_x.T @ (g["v"] * eps_f["v"] + g["w"] * eps_f["w"]) / (1 - a ** (t + 1))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_decay_or_rank_validation() -> None:
    model = LeakyTanh(jnp.ones((3, 4)), 0.5, 2)
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="decay must lie in"):
            ES_D_RTRL(model, bad)
    for bad_rank in (0, -3):
        with pytest.raises(ValueError, match="rank must be a positive int"):
            IODimVjpAlgorithm(model, bad_rank)
    with pytest.raises(TypeError, match="decay_or_rank"):
        ES_D_RTRL(model, "fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decay_or_rank"):
        ES_D_RTRL(model, True)
    with pytest.raises(TypeError, match="decay_or_rank must be .* concrete 0-d JAX number"):
        ES_D_RTRL(model, jnp.array([0.5, 0.6]))


@pytest.mark.parametrize(
    ("given", "decay"),
    [(np.float32(0.75), 0.75), (np.float64(0.9), 0.9), (jnp.array(0.5), 0.5), (np.int64(3), 0.5), (jnp.array(3), 0.5)],
)
def test_numpy_and_jax_scalars_as_decay_or_rank(given: object, decay: float) -> None:
    """NumPy and JAX scalars are the numbers they hold: an integer type is a rank, a floating type a decay."""
    model = LeakyTanh(jnp.ones((3, 4)), 0.5, 2)
    learner = ES_D_RTRL(model, given)
    assert isinstance(learner.decay, float) and learner.decay == pytest.approx(decay, rel=1e-7)
