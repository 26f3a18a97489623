"""D_RTRL against BPTT (jax.grad through the unrolled model), and the learner's contract.

Models drive hidden states with one ETP op and a leaky integrator,
``h^t = a * h^{t-1} + y^t``; the loss of step t is ``sum(r * sin(h^t))`` (plus a
readout where stated). With a per-unit leak for mm/mv/elemwise/sparse and a
uniform leak for conv and LoRA, the accumulated online gradient must equal
BPTT (float64, relative error < 1e-10).
"""

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
from etp_algorithms import D_RTRL

Array = jax.Array


def _online(model: brainstate.nn.Module, xs: Array, r: Array, steps: int, jit: bool = False) -> dict[str, Array]:
    learner = D_RTRL(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    params = model.states(brainstate.ParamState)

    def grads(x: Array) -> Any:
        return brainstate.transform.grad(lambda x: jnp.sum(r * jnp.sin(learner(x))), params)(x)

    step = brainstate.transform.jit(grads) if jit else grads
    total = None
    for t in range(steps):
        g = step(xs[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total[("w",)]  # type: ignore[index]


@pytest.mark.parametrize("steps", [1, 4, 16])
@pytest.mark.parametrize("name", CASES)
def test_d_rtrl_equals_bptt_on_leaky_integrators(name: str, steps: int, rng: np.random.Generator) -> None:
    op, weights, xs, leak, h_shape = _cases(rng)[name]
    r = jnp.asarray(rng.normal(size=h_shape))
    leak_full = jnp.broadcast_to(leak, h_shape)
    got = _online(Driven(op, weights, leak_full, h_shape), xs, r, steps)
    want = _bptt(op, weights, xs, leak_full, h_shape, r, steps)
    for key in want:
        assert got[key].dtype == jnp.float64
        assert _rel(got[key], want[key]) < 1e-10, key


def test_jit_equals_eager(rng: np.random.Generator) -> None:
    op, weights, xs, leak, h_shape = _cases(rng)["mm+bias"]
    r = jnp.asarray(rng.normal(size=h_shape))
    eager = _online(Driven(op, weights, leak, h_shape), xs, r, 5)
    jitted = _online(Driven(op, weights, leak, h_shape), xs, r, 5, jit=True)
    for key in eager:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-12)


class TwoStateWithReadout(brainstate.nn.Module):
    """v, a mixed per unit; input through etp_mm; a plain-op gain and an ETP readout (no hidden state after it)."""

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__()
        self.w = brainstate.ParamState({"weight": jnp.asarray(rng.normal(size=(3, 4)))})
        self.gain = brainstate.ParamState(jnp.asarray(rng.uniform(0.5, 1.5, size=4)))
        self.out = brainstate.ParamState({"weight": jnp.asarray(rng.normal(size=(4, 2)))})
        self.coef = jnp.asarray(rng.uniform(0.1, 0.8, size=(4, 4)))
        self.v = brainstate.HiddenState(jnp.zeros((2, 4)))
        self.a = brainstate.HiddenState(jnp.zeros((2, 4)))

    def update(self, x: Any) -> Array:
        vv, va, av, aa = self.coef
        v = vv * self.v.value + va * self.a.value + etp.matmul(x, self.w.value["weight"]) * self.gain.value
        self.a.value = av * jnp.tanh(v) + aa * self.a.value
        self.v.value = v
        return etp.matmul(v, self.out.value["weight"])


def test_two_state_neuron_and_instantaneous_gradients(rng: np.random.Generator) -> None:
    model = TwoStateWithReadout(rng)
    xs = jnp.asarray(rng.normal(size=(6, 2, 3)))
    target = jnp.asarray(rng.normal(size=(2, 2)))
    init = {p: s.value for p, s in model.states(brainstate.ParamState).items()}
    learner = D_RTRL(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    assert [r.weight_path for r in learner.graph.hidden_param_op_relations] == [("w",)]
    params = model.states(brainstate.ParamState)
    total: Any = None
    for t in range(6):
        g = brainstate.transform.grad(lambda x: jnp.sum((learner(x) - target) ** 2), params)(xs[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)

    def bptt(p: dict[Any, Any]) -> Array:
        vv, va, av, aa = model.coef
        v, a, loss = jnp.zeros((2, 4)), jnp.zeros((2, 4)), 0.0
        for t in range(6):
            v_new = vv * v + va * a + (xs[t] @ p[("w",)]["weight"]) * p[("gain",)]
            a = av * jnp.tanh(v_new) + aa * a
            v = v_new
            loss = loss + jnp.sum((v @ p[("out",)]["weight"] - target) ** 2)
        return loss

    want = jax.grad(bptt)(init)
    # the ETP weight of a 2-state element-wise group: exact
    assert _rel(total[("w",)]["weight"], want[("w",)]["weight"]) < 1e-10
    # the readout: its instantaneous gradient is its exact gradient
    assert _rel(total[("out",)]["weight"], want[("out",)]["weight"]) < 1e-10

    # a plain-op parameter gets the instantaneous gradient dL^t/dθ with h^{t-1} held fixed (non-zero, not BPTT)
    def instantaneous(p: dict[Any, Any]) -> Array:
        vv, va, av, aa = model.coef
        v, a, total_loss = jnp.zeros((2, 4)), jnp.zeros((2, 4)), 0.0
        for t in range(6):
            v_new = vv * jax.lax.stop_gradient(v) + va * jax.lax.stop_gradient(a) + (xs[t] @ init[("w",)]["weight"]) * p
            a = av * jnp.tanh(v_new) + aa * jax.lax.stop_gradient(a)
            v = v_new
            total_loss = total_loss + jnp.sum((v @ init[("out",)]["weight"] - target) ** 2)
        return total_loss

    np.testing.assert_allclose(total[("gain",)], jax.grad(instantaneous)(init[("gain",)]), rtol=1e-10)


def test_learner_contract_and_errors(rng: np.random.Generator) -> None:
    op, weights, xs, leak, h_shape = _cases(rng)["mm+bias"]
    model = Driven(op, weights, leak, h_shape)
    learner = D_RTRL(model)
    with pytest.raises(RuntimeError, match=r"D_RTRL|ParamDimVjpAlgorithm"):
        learner(xs[0])
    with pytest.raises(ValueError, match="unknown vjp_method 'bogus'"):
        D_RTRL(model, vjp_method="bogus")
    learner.compile_graph(xs[0])
    assert learner.is_compiled
    assert set(learner.param_states) == {("w",)} and set(learner.hidden_states) == {("h",)}
    assert learner.trace_bytes() == (3 * 4 * 5 + 3 * 5) * 8
    h_before = model.h.value
    with pytest.raises(ValueError, match=r"input shapes \[\(2, 4\)\] differ from the compiled \[\(3, 4\)\]"):
        learner(jnp.ones((2, 4)))
    np.testing.assert_allclose(model.h.value, h_before)  # a failed call changes nothing
    learner(xs[0])
    trace = learner.get_etrace_of(("w",))
    assert float(jnp.abs(trace[0]["weight"]).sum()) > 0
    assert learner.get_etrace_of(model.w)[0]["weight"].shape == (3, 4, 5, 1)
    with pytest.raises(ValueError, match="has no eligibility trace"):
        learner.get_etrace_of(("nope",))
    learner.reset_state()
    assert float(jnp.abs(learner.get_etrace_of(("w",))[0]["weight"]).sum()) == 0.0


def test_float32_weights_with_float64_inputs(rng: np.random.Generator) -> None:
    """Mixed precision: traces follow the wider input dtype, gradients come back in each weight's dtype."""
    weights = {"weight": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32), "bias": jnp.zeros(5, jnp.float32)}
    model = Driven(
        lambda x, w: etp.matmul(x, w["weight"], w["bias"]).astype(jnp.float32), weights, jnp.float32(0.9), (3, 5)
    )
    model.h.value = model.h.value.astype(jnp.float32)
    learner = D_RTRL(model)
    x = jnp.asarray(rng.normal(size=(3, 4)))  # float64
    learner.compile_graph(x)
    for _ in range(2):
        grads = brainstate.transform.grad(lambda x: jnp.sum(learner(x)), model.states(brainstate.ParamState))(x)
    assert grads[("w",)]["weight"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(grads[("w",)]["weight"])))


class RecurrentTanh(brainstate.nn.Module):
    """h' = alpha h + (1 - alpha) tanh([x, h] W): D-RTRL drops the path through W (an approximation)."""

    def __init__(self, w: Array, alpha: float, batch: int) -> None:
        super().__init__()
        self.alpha = alpha
        self.w = brainstate.ParamState(w)
        self.init_state(batch)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.h = brainstate.HiddenState(jnp.zeros((batch_size or 1, self.w.value.shape[1])))

    def update(self, x: Any) -> Array:
        xh = jnp.concatenate([x, self.h.value], axis=-1)
        self.h.value = self.alpha * self.h.value + (1 - self.alpha) * jnp.tanh(etp.matmul(xh, self.w.value))
        return self.h.value


def test_d_rtrl_rule_written_out_by_hand_on_a_recurrent_tanh_rnn(rng: np.random.Generator) -> None:
    T, B, I, H, alpha = 6, 2, 3, 4, 0.7
    w = jnp.asarray(rng.normal(size=(I + H, H))) * 0.5
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    target = jnp.asarray(rng.normal(size=(B, H)))
    model = RecurrentTanh(w, alpha, B)
    learner = D_RTRL(model)
    learner.compile_graph(xs[0])
    params = model.states(brainstate.ParamState)
    h, eps = jnp.zeros((B, H)), jnp.zeros((B, I + H, H))
    total_online, total_hand = jnp.zeros_like(w), jnp.zeros_like(w)
    for t in range(T):
        got = brainstate.transform.grad(lambda x: jnp.sum((learner(x) - target) ** 2), params)(xs[t])[("w",)]
        xh = jnp.concatenate([xs[t], h], axis=-1)
        pre = xh @ w
        h = alpha * h + (1 - alpha) * jnp.tanh(pre)
        Df = (1 - alpha) * (1 - jnp.tanh(pre) ** 2)  # dh/dy, per unit
        eps = alpha * eps + xh[:, :, None] * Df[:, None, :]  # D = alpha with y held fixed
        g = 2 * (h - target)
        want = jnp.einsum("bio,bo->io", eps, g)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        total_online, total_hand = total_online + got, total_hand + want

    # and it is an approximation here: BPTT differs
    def bptt(w_: Array) -> Array:
        h_, loss = jnp.zeros((B, H)), 0.0
        for t in range(T):
            h_ = alpha * h_ + (1 - alpha) * jnp.tanh(jnp.concatenate([xs[t], h_], -1) @ w_)
            loss = loss + jnp.sum((h_ - target) ** 2)
        return loss

    assert _rel(total_online, jax.grad(bptt)(w)) > 1e-4


def test_reset_state_with_a_new_batch_size_recompiles(rng: np.random.Generator) -> None:
    model = RecurrentTanh(jnp.asarray(rng.normal(size=(7, 4))), 0.7, 2)
    learner = D_RTRL(model)
    learner.compile_graph(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="reset_state\\(batch_size=...\\)"):
        learner(jnp.ones((5, 3)))
    learner.reset_state(batch_size=5)
    out = learner(jnp.ones((5, 3)))
    assert out.shape == (5, 4) and model.h.value.shape == (5, 4)
    assert learner.get_etrace_of(("w",))[0]["weight"].shape == (5, 7, 4, 1)
