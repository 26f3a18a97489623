"""Weights whose only route to the loss is their relation's hidden states skip the step's VJP.

The analysis (``hidden_only_keys``) is checked on structures where it must and must not apply,
and the learners' gradients with the skip are compared with the same learners without it
(the VJP differentiating every weight) and, for D_RTRL on a leaky integrator, with BPTT.
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_nn
import etp_primitives as etp
from etp_algorithms import D_RTRL, ES_D_RTRL
from etp_algorithms._hidden_only import hidden_only_keys

Array = jax.Array


class Leaky(brainstate.nn.Module):
    """``h = 0.8 h + x W``; with ``bypass`` the op's output also feeds the output directly."""

    def __init__(self, rng: np.random.Generator, bypass: bool = False, shared: bool = False) -> None:
        super().__init__()
        self.bypass, self.shared = bypass, shared
        self.w = brainstate.ParamState({"weight": jnp.asarray(rng.normal(size=(3, 4)))})
        self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

    def update(self, x: Any) -> Array:
        y = etp.matmul(x, self.w.value["weight"])
        self.h.value = 0.8 * self.h.value + y
        out = jnp.tanh(self.h.value)
        if self.bypass:
            out = out + 0.5 * y
        if self.shared:
            out = out + jnp.sum(self.w.value["weight"] ** 2)
        return out


class GRUNet(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = etp_nn.GRUCell(3, 5)
        self.out = etp_nn.Linear(5, 2)

    def update(self, x: Any) -> Array:
        return self.out(self.cell(x))


def _learner(cls: Any, model: brainstate.nn.Module, x: Array, **kwargs: Any) -> Any:
    learner = cls(model, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(x)
    return learner


def _keys(learner: Any) -> set[tuple[tuple[Any, ...], str]]:
    relations = learner.graph.hidden_param_op_relations
    return {(relations[i].weight_path, key) for i, key in hidden_only_keys(learner.graph)}


@pytest.mark.parametrize(
    ("bypass", "shared", "skipped"),
    [(False, False, True), (True, False, False), (False, True, False)],
    ids=["only-through-h", "y-bypasses-h", "weight-used-elsewhere"],
)
def test_analysis_on_leaky_integrators(bypass: bool, shared: bool, skipped: bool, rng: np.random.Generator) -> None:
    model = Leaky(rng, bypass=bypass, shared=shared)
    learner = _learner(D_RTRL, model, jnp.zeros((2, 3)))
    assert _keys(learner) == ({(("w",), "weight")} if skipped else set())


def test_analysis_on_a_gru() -> None:
    brainstate.random.seed(0)
    model = GRUNet()
    brainstate.nn.init_all_states(model, batch_size=2)
    learner = _learner(D_RTRL, model, jnp.zeros((2, 3)))
    weights = {path for path, _ in _keys(learner)}
    # the reset gate's weight reaches h only through Wh (excluded); the readout has no relation
    assert weights == {("cell", "Wz", "weight"), ("cell", "Wh", "weight")}
    assert {key for _, key in _keys(learner)} == {"weight", "bias"}


def _online_grads(learner: Any, model: brainstate.nn.Module, xs: Array, disable_skip: bool) -> list[Any]:
    if disable_skip:
        learner._hidden_only = frozenset()
    params = model.states(brainstate.ParamState)
    grads = []
    for x in xs:
        g = brainstate.transform.grad(lambda x: jnp.sum(jnp.sin(learner(x))), params)(x)
        grads.append({p: jax.tree.map(np.asarray, v) for p, v in g.items()})
    return grads


@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl"])
@pytest.mark.parametrize("model_name", ["gru", "leaky", "leaky-bypass"])
def test_skipping_the_vjp_changes_no_gradient(algorithm: str, model_name: str, rng: np.random.Generator) -> None:
    xs = jnp.asarray(rng.normal(size=(5, 2, 3)))
    results = []
    for disable_skip in (False, True):
        brainstate.random.seed(1)
        model = (
            GRUNet() if model_name == "gru" else Leaky(np.random.default_rng(3), bypass=model_name.endswith("bypass"))
        )
        brainstate.nn.init_all_states(model, batch_size=2)
        kwargs = {"decay_or_rank": 0.6} if algorithm == "es_d_rtrl" else {}
        learner = _learner(D_RTRL if algorithm == "d_rtrl" else ES_D_RTRL, model, xs[0], **kwargs)
        results.append(_online_grads(learner, model, xs, disable_skip))
    assert bool(hidden_only_keys(learner.graph)) == (model_name != "leaky-bypass")
    for with_skip, without in zip(*results, strict=True):
        for path in with_skip:
            for a, b in zip(jax.tree.leaves(with_skip[path]), jax.tree.leaves(without[path]), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_d_rtrl_with_the_skip_equals_bptt(rng: np.random.Generator) -> None:
    model = Leaky(rng)
    learner = _learner(D_RTRL, model, jnp.zeros((2, 3)))
    assert hidden_only_keys(learner.graph)
    w0 = jnp.array(model.w.value["weight"])
    xs = jnp.asarray(rng.normal(size=(6, 2, 3)))
    online = _online_grads(learner, model, xs, disable_skip=False)

    def loss_at(t: int, w: Array) -> Array:
        h = jnp.zeros((2, 4))
        for k in range(t + 1):
            h = 0.8 * h + xs[k] @ w
        return jnp.sum(jnp.sin(jnp.tanh(h)))

    for t, grads in enumerate(online):
        np.testing.assert_allclose(grads[("w",)]["weight"], jax.grad(lambda w, t=t: loss_at(t, w))(w0), rtol=1e-10)
