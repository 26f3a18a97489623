"""``hidden_transition`` (the full step as a function) and rules given ``dL/dh^{t-1}`` (``hidden_cotangents='previous'``).

Oracles: the step itself (``execute_step`` on invar values with the hidden input or a weight
leaf replaced, differentiated by ``jax.jacfwd``), and BPTT (``jax.grad`` through the unrolled
model) for an exact-RTRL rule written in this file on top of the two.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from algorithms_testing import _rel
from test_multi_step import SNN, TwoLayer, _bptt_of

import etp_nn
import etp_primitives as etp
from etp_algorithms import ETraceAlgorithm, ETraceGraphExecutor, LearningRule
from etp_algorithms.extend import RuleContext, execute_step, hidden_transition, trainable_inputs

Array = jax.Array


class SharedWeight(brainstate.nn.Module):
    """One weight in two ETP ops: two relations, one ParamState leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.w = brainstate.ParamState(jnp.asarray(np.random.default_rng(1).normal(size=(3, 4))))
        self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

    def update(self, x: Array) -> Array:
        self.h.value = 0.5 * jnp.tanh(self.h.value) + etp.matmul(x, self.w.value) + etp.matmul(x**2, self.w.value)
        return self.h.value


def _executor(model: brainstate.nn.Module, x: Array) -> tuple[ETraceGraphExecutor, RuleContext]:
    executor = ETraceGraphExecutor(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = executor.compile_graph(x)
    return executor, RuleContext(graph)


def _models() -> dict[str, Any]:
    return {
        "gru": lambda: etp_nn.GRUCell(3, 4),
        "two-layer": TwoLayer,
        "snn": SNN,
        "shared": SharedWeight,
    }


@pytest.mark.parametrize("kind", list(_models()))
def test_transition_reproduces_the_step_and_its_jacobians(kind: str, rng: np.random.Generator) -> None:
    with brainstate.environ.context(dt=1.0 * u.ms):
        brainstate.random.seed(3)
        model = _models()[kind]()
        brainstate.nn.init_all_states(model, batch_size=2)
        x = jnp.asarray(rng.normal(size=(2, 3)))
        executor, ctx = _executor(model, x)
        minfo = ctx.graph.module_info
        # a non-zero state, so the Jacobians are not those of the zero state
        invals = executor.current_invals(x)
        for var in minfo.hidden_path_to_invar.values():
            invals[minfo.jaxpr.invars.index(var)] = jnp.asarray(rng.normal(size=var.aval.shape)) * 0.5
        values = execute_step(ctx.graph, invals)
        F = hidden_transition(ctx, values)
        paths = list(minfo.hidden_path_to_outvar)
        h0 = {p: values.env[minfo.hidden_path_to_invar[p]] for p in paths}
        w0 = trainable_inputs(ctx, values)
        new = F(h0, w0)
        for p in paths:
            assert jnp.allclose(new[p], values.state_values[p][0], rtol=0, atol=1e-14), p

        def stepped(h: dict[Any, Array], leaves: dict[int, Array]) -> dict[Any, Array]:
            vals = list(invals)
            for p in paths:
                vals[minfo.jaxpr.invars.index(minfo.hidden_path_to_invar[p])] = h[p]
            for i, leaf in leaves.items():
                vals[i] = leaf
            states = execute_step(ctx.graph, vals).state_values
            return {p: states[p][0] for p in paths}

        # dh^t/dh^{t-1}: the full matrix, across positions, states and layers
        want_h = jax.jacfwd(lambda h: stepped(h, {}))(h0)
        got_h = jax.jacfwd(lambda h: F(h, w0))(h0)
        for p in paths:
            for q in paths:
                assert jnp.allclose(got_h[p][q], want_h[p][q], rtol=0, atol=1e-12), (p, q)
        assert any(float(jnp.abs(want_h[p][q]).max()) > 0 for p in paths for q in paths)
        # dh^t/dW of each weight leaf = the sum over the relations fed by that leaf (no weight transform here)
        got_w = jax.jacfwd(lambda w: F(h0, w))(w0)
        by_leaf: dict[int, list[Any]] = {}
        for (r, key), _ in w0.items():
            var = ctx.graph.hidden_param_op_relations[r].trainable_vars[key]
            if any(var is v for v in minfo.jaxpr.invars):
                by_leaf.setdefault(next(i for i, v in enumerate(minfo.jaxpr.invars) if v is var), []).append((r, key))
        assert by_leaf, "the models' relations read their weights directly"
        for i, tkeys in by_leaf.items():
            want_w = jax.jacfwd(lambda leaf, i=i: stepped(h0, {i: leaf}))(invals[i])
            for p in paths:
                total = sum(got_w[p][t] for t in tkeys)
                assert jnp.allclose(total, want_w[p], rtol=0, atol=1e-12), (p, tkeys)
        if kind == "shared":
            assert len(by_leaf) == 1 and len(next(iter(by_leaf.values()))) == 2  # one leaf, two relations
            a, b = next(iter(by_leaf.values()))
            assert not jnp.allclose(got_w[paths[0]][a], got_w[paths[0]][b])  # each relation's own influence


# --- an exact RTRL rule in a few lines (dense influence by jacfwd), a client of hidden_cotangents='previous'


def _exact_rtrl(wrt: str) -> LearningRule:
    def init(ctx: RuleContext) -> dict[Any, Any]:
        minfo = ctx.graph.module_info
        if wrt == "weights":
            inputs = {leaf: var.aval for var, leaf in minfo.invar_to_weight_path.items()}
        else:
            inputs = {
                (r, key): var.aval
                for r, rel in enumerate(ctx.graph.hidden_param_op_relations)
                for key, var in rel.trainable_vars.items()
            }
        return {
            t: {
                p: jnp.zeros((*minfo.hidden_path_to_outvar[p].aval.shape, *a.shape), a.dtype)
                for p in minfo.hidden_path_to_outvar
            }
            for t, a in inputs.items()
        }

    def update(ctx: RuleContext, M: Any, values: Any) -> tuple[Any, Any]:
        minfo = ctx.graph.module_info
        F = hidden_transition(ctx, values, wrt=wrt)
        paths = list(minfo.hidden_path_to_outvar)
        h0 = {p: values.env[minfo.hidden_path_to_invar[p]] for p in paths}
        w0 = trainable_inputs(ctx, values, wrt=wrt)
        J_h = jax.jacfwd(lambda h: F(h, w0))(h0)
        J_w = jax.jacfwd(lambda w: F(h0, w))(w0)
        new = {
            t: {
                p: J_w[p][t] + sum(jnp.tensordot(J_h[p][q], M[t][q], axes=jnp.ndim(h0[q])) for q in paths)
                for p in paths
            }
            for t in M
        }
        return new, M  # the backward pass contracts the old influence M^{t-1}

    def gradients(ctx: RuleContext, M: Any, values: Any, dL_dh: Any) -> Any:
        def contract(per_path: Any) -> Array:
            return sum(jnp.tensordot(dL_dh[p], m, axes=jnp.ndim(dL_dh[p])) for p, m in per_path.items())

        if wrt == "weights":
            return {leaf: contract(per_path) for leaf, per_path in M.items()}
        grads: dict[int, dict[str, Array]] = {}
        for (r, key), per_path in M.items():
            grads.setdefault(r, {})[key] = contract(per_path)
        return grads

    return LearningRule(
        f"exact RTRL over {wrt} (test)", init, update, gradients, hidden_cotangents="previous", gradient_targets=wrt
    )


@pytest.mark.parametrize(
    ("kind", "wrt"),
    [
        ("gru", "weights"),
        ("two-layer", "weights"),
        ("snn", "weights"),
        ("shared", "weights"),
        ("snn", "relations"),
        ("shared", "relations"),
    ],
)
def test_a_rule_given_previous_cotangents_is_exact(kind: str, wrt: str, rng: np.random.Generator) -> None:
    """Over the ParamState leaves, exact for any model (a GRU's reset gate has no relation); over the relations,
    exact where every weight has one."""
    steps = 4
    with brainstate.environ.context(dt=1.0 * u.ms):
        brainstate.random.seed(4)
        model = _models()[kind]()
        brainstate.nn.init_all_states(model, batch_size=2)
        xs = jnp.asarray(rng.normal(size=(steps, 2, 3)))
        out = {"gru": 4, "two-layer": 3, "snn": 2, "shared": 4}[kind]
        target = jnp.asarray(rng.normal(size=(steps, 2, out)))
        want = _bptt_of(model, xs, target)
        learner = ETraceAlgorithm(model, _exact_rtrl(wrt))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner.compile_graph(xs[0])
        assert learner.context.hidden_only == frozenset()  # the VJP keeps every direct term
        got = learner.etrace_grad(xs, target, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2), reduction="sum")
    assert set(got) == set(want)
    for path, value in want.items():
        for leaf_got, leaf_want in zip(jax.tree.leaves(got[path]), jax.tree.leaves(value), strict=True):
            assert _rel(leaf_got, leaf_want) < 1e-10, path


def test_the_same_rule_over_relations_misses_a_weight_without_one(rng: np.random.Generator) -> None:
    """The GRU's reset-gate weight reaches the state only through another weight: over relations it keeps only its
    instantaneous gradient, so the 'weights' targets are what makes RTRL exact there."""
    brainstate.random.seed(4)
    model = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(model, batch_size=2)
    xs = jnp.asarray(rng.normal(size=(4, 2, 3)))
    target = jnp.asarray(rng.normal(size=(4, 2, 4)))
    want = _bptt_of(model, xs, target)
    learner = ETraceAlgorithm(model, _exact_rtrl("relations"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    got = learner.etrace_grad(xs, target, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2), reduction="sum")
    errors = {
        path: max(_rel(a, b) for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path]))) for path in want
    }
    reset = [p for p in errors if p[0] == "Wr"]
    assert reset and all(errors[p] > 1e-3 for p in reset), errors
    assert all(e < 1e-10 for p, e in errors.items() if p not in reset), errors


def test_bad_keys_are_named(rng: np.random.Generator) -> None:
    model = SharedWeight()
    x = jnp.asarray(rng.normal(size=(2, 3)))
    executor, ctx = _executor(model, x)
    values = executor.step(executor.current_invals(x))
    h0 = {("h",): model.h.value}
    with pytest.raises(KeyError, match=r"\(5, 'weight'\)\] are not among its inputs"):
        hidden_transition(ctx, values)(h0, {(5, "weight"): jnp.zeros((3, 4))})
    with pytest.raises(KeyError, match="no value for the hidden state"):
        hidden_transition(ctx, values)({}, {})
    with pytest.raises(ValueError, match="wrt must be one of"):
        hidden_transition(ctx, values, wrt="leaves")
    rule = dataclasses.replace(_exact_rtrl("weights"), trace_gradients=lambda ctx, M, values, g: {(("nope",), ()): 0.0})
    learner = ETraceAlgorithm(model, rule)
    learner.compile_graph(x)
    with pytest.raises(ValueError, match=r"gradients for \[\(\('nope',\), \(\)\)\], which are not ParamState leaves"):
        brainstate.transform.grad(lambda: jnp.sum(learner(x)), model.states(brainstate.ParamState))()


def test_rule_options_are_checked() -> None:
    rule = _exact_rtrl("weights")
    with pytest.raises(ValueError, match=r"hidden_cotangents must be one of \('new', 'previous'\), got 'old'"):
        dataclasses.replace(rule, hidden_cotangents="old")
    with pytest.raises(ValueError, match=r"gradient_targets must be one of \('relations', 'weights'\), got 'leaves'"):
        dataclasses.replace(rule, gradient_targets="leaves")


def test_trace_gradients_see_the_output_cotangents(rng: np.random.Generator) -> None:
    """``values.output_cotangents`` in the backward pass is dL/d(outputs): a rule adding ``sum(ct)`` to every leaf
    shifts the gradient by exactly ``sum(c)`` for the loss ``sum(c * out)``."""
    x = jnp.asarray(rng.normal(size=(2, 3)))
    c = jnp.asarray(rng.normal(size=(2, 4)))
    seen: list[Any] = []

    def gradients(ctx: RuleContext, M: Any, values: Any, dL_dh: Any) -> Any:
        seen.append(values.output_cotangents)
        total = sum(jnp.sum(ct) for ct in values.output_cotangents)
        return {
            leaf: jnp.full(var.aval.shape, total) for var, leaf in ctx.graph.module_info.invar_to_weight_path.items()
        }

    def nothing(ctx: RuleContext, M: Any, values: Any, dL_dh: Any) -> Any:
        return {}

    grads = []
    for fn in (gradients, nothing):
        model = SharedWeight()
        brainstate.nn.init_all_states(model)
        rule = dataclasses.replace(_exact_rtrl("weights"), trace_gradients=fn)
        learner = ETraceAlgorithm(model, rule)
        learner.compile_graph(x)
        params = model.states(brainstate.ParamState)
        grads.append(brainstate.transform.grad(lambda learner=learner: jnp.sum(c * learner(x)), params)())
    (path,) = grads[0]
    assert jnp.allclose(grads[0][path] - grads[1][path], jnp.sum(c), rtol=0, atol=1e-12)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].shape == (2, 4)


@pytest.mark.parametrize("wrt", ["relations", "weights"])
def test_the_transition_of_a_kept_scan_is_that_of_the_unrolled_step(wrt: str, rng: np.random.Generator) -> None:
    """4 Euler sub-steps with a recurrent weight inside, kept as a loop: F's value and Jacobians (with respect to
    the old state and to every sub-step's trainable input) are those of the unrolled step."""
    from algorithms_testing import Euler

    from etp_compiler import ControlFlowPolicy

    x = jnp.asarray(rng.normal(size=(2, 3)))
    h = jnp.asarray(rng.normal(size=(2, 4)))
    results = []
    for descent in ("auto", "unroll"):
        model = Euler(4, recurrent=True, jitter=True)
        executor = ETraceGraphExecutor(model, control_flow=ControlFlowPolicy(scan_unroll_limit=2, scan_descent=descent))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctx = RuleContext(executor.compile_graph(x))
        model.h.value = h
        values = executor.step(executor.current_invals(x))
        F = hidden_transition(ctx, values, wrt=wrt)
        theta = trainable_inputs(ctx, values, wrt=wrt)
        hidden = {("h",): h}
        new = F(hidden, theta)[("h",)]
        np.testing.assert_array_equal(np.asarray(new), np.asarray(values.state_values[("h",)][0]))
        jac_h, jac_theta = jax.jacfwd(lambda a, b, F=F: F(a, b)[("h",)], argnums=(0, 1))(hidden, theta)
        results.append((new, jac_h[("h",)], jac_theta))
    (kept, kept_h, kept_theta), (unrolled, unrolled_h, unrolled_theta) = results
    assert _rel(kept, unrolled) < 1e-12 and _rel(kept_h, unrolled_h) < 1e-12
    assert sorted(kept_theta) == sorted(unrolled_theta) and len(kept_theta) == (8 if wrt == "relations" else 2)
    for key in kept_theta:
        assert _rel(kept_theta[key], unrolled_theta[key]) < 1e-12, key
        assert float(jnp.abs(kept_theta[key]).max()) > 0, key
