"""The rule of the docs page "Writing a learning rule" (examples/forgetting_d_rtrl.py) against oracles.

The rule is D-RTRL with a forgetting factor, written with the public extension API only. For a
leaky integrator :math:`h^t = a \\odot h^{t-1} + x^t W + b` the rule written out by hand is
:math:`\\epsilon^t_{bij} = \\lambda a_j \\epsilon^{t-1}_{bij} + x^t_{bi}` (bias: :math:`+1`), with the
step's gradient :math:`\\sum_b g^t_{bj} \\epsilon^t_{bij}`; at :math:`\\lambda = 1` it is exact (BPTT).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_nn
import etp_primitives as etp
from etp_algorithms import D_RTRL, ETraceAlgorithm
from etp_compiler import NotSupportedError

ROOT = Path(__file__).resolve().parents[1]
T, B, I, O = 7, 3, 4, 5


def _rule_module() -> Any:
    spec = importlib.util.spec_from_file_location("forgetting_d_rtrl", ROOT / "examples" / "forgetting_d_rtrl.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("forgetting_d_rtrl", module)
    spec.loader.exec_module(module)
    return module


forgetting_d_rtrl = _rule_module().forgetting_d_rtrl


@pytest.fixture(autouse=True)
def _x64() -> Any:
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


class Leaky(brainstate.nn.Module):
    def __init__(self, w: jax.Array, b: jax.Array, leak: jax.Array) -> None:
        super().__init__()
        self.leak = leak
        self.w = brainstate.ParamState({"weight": w, "bias": b})
        self.h = brainstate.HiddenState(jnp.zeros((B, O)))

    def update(self, x: jax.Array) -> jax.Array:
        self.h.value = self.leak * self.h.value + etp.matmul(x, self.w.value["weight"], self.w.value["bias"])
        return self.h.value


def _data(rng: np.random.Generator) -> tuple[Any, ...]:
    w, b = jnp.asarray(rng.normal(size=(I, O))), jnp.asarray(rng.normal(size=O))
    leak = jnp.asarray(rng.uniform(0.5, 0.95, size=O))
    xs, r = jnp.asarray(rng.normal(size=(T, B, I))), jnp.asarray(rng.normal(size=(B, O)))
    return w, b, leak, xs, r


def _online(learner: Any, model: brainstate.nn.Module, xs: jax.Array, r: jax.Array) -> dict[str, jax.Array]:
    params = model.states(brainstate.ParamState)
    total: Any = None
    for x in xs:
        g = brainstate.transform.grad(lambda x: jnp.sum(r * jnp.sin(learner(x))), params)(x)[("w",)]
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return dict(total)


def _by_hand(w: Any, b: Any, leak: Any, xs: Any, r: Any, forget: float) -> dict[str, jax.Array]:
    h = jnp.zeros((B, O))
    eps_w, eps_b = jnp.zeros((B, I, O)), jnp.zeros((B, O))
    grad_w, grad_b = jnp.zeros((I, O)), jnp.zeros(O)
    for x in xs:
        h = leak * h + x @ w + b
        eps_w = forget * leak * eps_w + x[:, :, None]
        eps_b = forget * leak * eps_b + 1.0
        g = r * jnp.cos(h)
        grad_w = grad_w + jnp.einsum("bj,bij->ij", g, eps_w)
        grad_b = grad_b + jnp.sum(g * eps_b, axis=0)
    return {"weight": grad_w, "bias": grad_b}


def _compiled(model: brainstate.nn.Module, rule: Any, x0: jax.Array) -> ETraceAlgorithm:
    learner = ETraceAlgorithm(model, rule)
    learner.compile_graph(x0)
    return learner


@pytest.mark.parametrize("vjp_has_seed", [False, True])
@pytest.mark.parametrize("forget", [1.0, 0.6, 0.0])
def test_the_rule_equals_the_rule_written_by_hand(forget: float, vjp_has_seed: bool) -> None:
    w, b, leak, xs, r = _data(np.random.default_rng(3))
    model = Leaky(w, b, leak)
    learner = _compiled(model, forgetting_d_rtrl(forget), xs[0])
    # the weight reaches the loss only through h, so the VJP skips it and the rule supplies the seed term;
    # with the shortcut off, the VJP holds the seed term and the rule adds only the propagated part
    assert learner.context.hidden_only == {(0, "weight"), (0, "bias")}
    if vjp_has_seed:
        learner._hidden_only = frozenset()
    got = _online(learner, model, xs, r)
    want = _by_hand(w, b, leak, xs, r, forget)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12)


def test_no_forgetting_is_exact_bptt() -> None:
    w, b, leak, xs, r = _data(np.random.default_rng(4))
    model = Leaky(w, b, leak)
    got = _online(_compiled(model, forgetting_d_rtrl(1.0), xs[0]), model, xs, r)

    def loss(p: dict[str, jax.Array]) -> jax.Array:
        h, total = jnp.zeros((B, O)), jnp.zeros(())
        for x in xs:
            h = leak * h + x @ p["weight"] + p["bias"]
            total = total + jnp.sum(r * jnp.sin(h))
        return total

    want = jax.grad(loss)({"weight": w, "bias": b})
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12)


def test_no_forgetting_equals_d_rtrl_on_a_gru() -> None:
    xs = jnp.asarray(np.random.default_rng(5).normal(size=(5, 2, 3)))
    grads = []
    for make in (D_RTRL, lambda m: ETraceAlgorithm(m, forgetting_d_rtrl(1.0))):
        brainstate.random.seed(2)
        cell = etp_nn.GRUCell(3, 4)
        brainstate.nn.init_all_states(cell, batch_size=2)
        learner = make(cell)
        with pytest.warns(UserWarning, match="non-parametric-tail"):
            learner.compile_graph(xs[0])
        params = cell.states(brainstate.ParamState)
        grads.append(
            [brainstate.transform.grad(lambda x: jnp.sum(jnp.tanh(learner(x))), params)(x) for x in xs]  # noqa: B023
        )
    for d_rtrl_step, rule_step in zip(*grads, strict=True):
        for path in d_rtrl_step:
            for key in d_rtrl_step[path]:
                np.testing.assert_allclose(rule_step[path][key], d_rtrl_step[path][key], rtol=1e-10, atol=1e-12)


def test_the_rule_refuses_windows_and_bad_factors() -> None:
    w, b, leak, _, _ = _data(np.random.default_rng(6))
    with pytest.raises(NotSupportedError, match="forgetting_D_RTRL.*multi-step"):
        ETraceAlgorithm(Leaky(w, b, leak), forgetting_d_rtrl(0.5), vjp_method="multi-step")
    with pytest.raises(ValueError, match=r"forget must lie in \[0, 1\], got 1.5"):
        forgetting_d_rtrl(1.5)
