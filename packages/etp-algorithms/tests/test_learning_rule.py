"""The learner core: a rule is a value (a record of pure functions) that ETraceAlgorithm runs."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algorithms_testing import Driven, _cases

import etp_nn
from etp_algorithms import D_RTRL, ES_D_RTRL, ETraceAlgorithm, IODimVjpAlgorithm, LearningRule, ParamDimVjpAlgorithm
from etp_algorithms.extend import (
    D_RTRLTrace,
    ES_D_RTRLTrace,
    ES_D_RTRLTraces,
    RuleContext,
    build_step,
    d_rtrl,
    es_d_rtrl,
    execute_step,
    instantaneous_gradient,
)
from etp_compiler import NotSupportedError


def _gru(batch: int | None = 2) -> Any:
    brainstate.random.seed(0)
    cell = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(cell, batch_size=batch)
    return cell


def _compiled(learner: ETraceAlgorithm, x: Any) -> ETraceAlgorithm:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GRU's reset gate has no trace (non-parametric tail)
        learner.compile_graph(x)
    return learner


@pytest.mark.parametrize(
    ("make", "trace_type"),
    [(lambda m: D_RTRL(m), tuple), (lambda m: ES_D_RTRL(m, 0.5), ES_D_RTRLTraces)],
)
def test_traces_are_typed_records_keyed_by_relation(make: Any, trace_type: type) -> None:
    cell = _gru()
    learner = _compiled(make(cell), jnp.zeros((2, 3)))
    traces = learner.etrace.value
    assert isinstance(traces, trace_type)
    relations = learner.graph.hidden_param_op_relations
    if isinstance(traces, ES_D_RTRLTraces):
        assert [t.relation for t in traces.relations] == list(range(len(relations)))
        assert all(isinstance(t, ES_D_RTRLTrace) for t in traces.relations)
        assert traces["steps"] is traces.steps  # the earlier dict keys still read the fields
    else:
        assert all(isinstance(t, D_RTRLTrace) for t in traces)
        assert [(t.relation, t.group) for t in traces] == [
            (i, g.index) for i, r in enumerate(relations) for g in r.hidden_groups
        ]
    # the records are pytrees with static indices: a tree map keeps them, and they are frozen
    mapped = jax.tree.map(jnp.zeros_like, traces)
    assert type(mapped) is type(traces)
    record = traces.relations[0] if isinstance(traces, ES_D_RTRLTraces) else traces[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.relation = 5  # type: ignore[misc]


def test_class_names_and_their_historical_aliases() -> None:
    assert D_RTRL is ParamDimVjpAlgorithm and ES_D_RTRL is IODimVjpAlgorithm
    cell = _gru()
    assert repr(D_RTRL(cell)).startswith("D_RTRL(")
    assert D_RTRL(cell).rule.name == "D_RTRL" and ES_D_RTRL(cell, 3).rule.name == "ES_D_RTRL"
    assert ES_D_RTRL(cell, 3).decay == 0.5


def test_a_rule_value_runs_like_its_class() -> None:
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 3)))
    results = []
    for make in (lambda m: ES_D_RTRL(m, 0.7), lambda m: ETraceAlgorithm(m, es_d_rtrl(0.7))):
        cell = _gru()
        learner = _compiled(make(cell), xs[0])
        params = cell.states(brainstate.ParamState)
        results.append([brainstate.transform.grad(lambda x: jnp.sum(learner(x) ** 2), params)(x) for x in xs])  # noqa: B023
    for a, b in zip(*results, strict=True):
        jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


def test_rule_functions_are_pure() -> None:
    cell = _gru()
    learner = _compiled(D_RTRL(cell), jnp.zeros((2, 3)))
    ctx, rule = learner.context, learner.rule
    values = execute_step(ctx.graph, learner.executor.current_invals(jnp.ones((2, 3))))
    traces = rule.init_traces(ctx)
    first, _ = rule.update_traces(ctx, traces, values)
    second, _ = rule.update_traces(ctx, traces, values)
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), first, second)
    assert all(float(jnp.abs(leaf).sum()) == 0 for leaf in jax.tree.leaves(traces))  # the input is untouched
    assert any(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(first))


def test_build_step_is_the_learners_gradient(rng: np.random.Generator) -> None:
    """The standalone step of a graph and a rule gives, under jax.grad, the learner's gradient."""
    op, weights, xs, leak, h_shape = _cases(rng)["mm+bias"]
    model = Driven(op, weights, jnp.broadcast_to(leak, h_shape), h_shape)
    learner = _compiled(D_RTRL(model), xs[0])
    step = build_step(learner.context, d_rtrl())
    minfo = learner.graph.module_info
    weight_vals, other_vals = learner._current_values()
    traces = learner.etrace.value

    def loss(w: Any) -> Any:
        outputs, _, _ = step(w, other_vals, [xs[0]], traces)
        return jnp.sum(jnp.sin(outputs[0]))

    g_step = jax.grad(loss)(weight_vals)
    g_learner = brainstate.transform.grad(lambda x: jnp.sum(jnp.sin(learner(x))), model.states(brainstate.ParamState))(
        xs[0]
    )
    (path,) = list(minfo.weight_states)
    np.testing.assert_allclose(g_step[0][0], g_learner[path]["bias"], rtol=1e-12)
    np.testing.assert_allclose(g_step[0][1], g_learner[path]["weight"], rtol=1e-12)


def test_instantaneous_gradient_is_the_vjp_of_the_plain_op(rng: np.random.Generator) -> None:
    op, weights, xs, leak, h_shape = _cases(rng)["mm+bias"]
    model = Driven(op, weights, jnp.broadcast_to(leak, h_shape), h_shape)
    learner = _compiled(D_RTRL(model), xs[0])
    ctx = learner.context
    values = execute_step(ctx.graph, learner.executor.current_invals(xs[0]))
    g = jnp.asarray(rng.normal(size=h_shape))
    (path,) = list(ctx.graph.module_info.hidden_path_to_outvar)
    got = instantaneous_gradient(ctx, 0, values, {path: g})
    # h = leak * h0 + x W + b: the VJP of the plain op with cotangent g
    _, pullback = jax.vjp(lambda w: xs[0] @ w["weight"] + w["bias"], dict(weights))
    (want,) = pullback(g)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12)


def _noop(*args: Any) -> Any:
    return args


def test_bad_rules_and_unsupported_modes_raise_clear_errors() -> None:
    with pytest.raises(TypeError, match="LearningRule 'mine': update_traces must be callable, got 3"):
        LearningRule("mine", _noop, 3, _noop)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="window_start_gradients must be callable or None"):
        LearningRule("mine", _noop, _noop, _noop, window_start_gradients="no")  # type: ignore[arg-type]
    cell = _gru()
    with pytest.raises(TypeError, match="ETraceAlgorithm expects a LearningRule as its rule, got function"):
        ETraceAlgorithm(cell, _noop)  # type: ignore[arg-type]
    no_windows = LearningRule("no-windows", _noop, _noop, _noop)
    assert not no_windows.supports_windows and d_rtrl().supports_windows
    with pytest.raises(NotSupportedError, match="'no-windows' has no window_start_gradients"):
        ETraceAlgorithm(cell, no_windows, vjp_method="multi-step")
    with pytest.raises(ValueError, match="D_RTRL: unknown vjp_method 'bogus'"):
        D_RTRL(cell, vjp_method="bogus")


def test_rule_context_names_what_the_vjp_skipped() -> None:
    learner = _compiled(D_RTRL(_gru()), jnp.zeros((2, 3)))
    ctx = learner.context
    assert isinstance(ctx, RuleContext) and ctx.graph is learner.graph
    for index, key in ctx.hidden_only:
        assert ctx.keeps_instantaneous(index, key)
    assert not ctx.keeps_instantaneous(99, "weight")
