"""Jaxpr slices keep their constant inputs apart from their arguments on every JAX version.

JAX >= 0.11 merged ``ClosedJaxpr`` into ``Jaxpr``: a ``Jaxpr`` built with constvars but no
values for them treats those constvars as leading invars. The compiler's slices
(transitions, weight functions, ``y -> h`` maps) are :class:`etp_compiler.OpenJaxpr`, so
``constvars`` and ``invars`` mean the same on jax 0.10 and jax 0.12; these tests run on both.
"""

from __future__ import annotations

import brainstate
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from compiler_testing import compile_quiet, group_inputs, relation_by_path, step_env

import etp_compiler
import etp_primitives as etp


class ScaledLeaky(brainstate.nn.Module):
    """``h <- decay * h + x @ (gain * w)``: the transition and the weight function both have constants."""

    def __init__(self) -> None:
        super().__init__()
        self.w = brainstate.ParamState({"weight": jnp.arange(12.0).reshape(3, 4) / 10, "gain": jnp.array(1.5)})
        self.decay = jnp.linspace(0.2, 0.8, 4)
        self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

    def update(self, x: jax.Array) -> jax.Array:
        w = self.w.value
        self.h.value = self.decay * jnp.tanh(self.h.value) + etp.matmul(x, w["gain"] * w["weight"])
        return self.h.value


@pytest.fixture
def graph() -> etp_compiler.ETraceGraph:
    model = ScaledLeaky()
    model.h.value = jnp.full((2, 4), 0.3)
    return compile_quiet(model, jnp.ones((2, 3)))


def test_transition_constvars_and_invars_are_the_recorded_ones(graph: etp_compiler.ETraceGraph) -> None:
    (group,) = graph.hidden_groups
    jaxpr = group.transition_jaxpr
    assert isinstance(jaxpr, etp_compiler.OpenJaxpr)
    assert jaxpr.constvars == group.transition_jaxpr_constvars and len(jaxpr.constvars) >= 1
    assert jaxpr.invars == group.hidden_invars
    assert set(jaxpr.constvars).isdisjoint(jaxpr.invars)
    hidden, consts = group_inputs(group, step_env(graph, jnp.ones((2, 3))))
    (new_h,) = jaxpr.evaluate(consts, *hidden)
    np.testing.assert_allclose(new_h, group.transition(hidden, consts)[0])
    decay, y = np.linspace(0.2, 0.8, 4), np.ones((2, 3)) @ (1.5 * np.arange(12.0).reshape(3, 4) / 10)
    np.testing.assert_allclose(new_h, decay * np.tanh(0.3) + y, rtol=1e-6)


def test_weight_function_takes_the_param_leaves_only(graph: etp_compiler.ETraceGraph) -> None:
    relation = relation_by_path(graph, ("w",))
    jaxpr, const_vars = relation.weight_fns["weight"]
    assert jaxpr.constvars == const_vars
    assert len(jaxpr.invars) == len(relation.trainable_paths["weight"]) == 2
    # the leaves are sorted by path: gain before weight
    assert [keys for _, keys in relation.trainable_paths["weight"]] == [("gain",), ("weight",)]
    gain, weight = jnp.array(2.0), jnp.ones((3, 4))
    (out,) = jaxpr.evaluate([], gain, weight)
    np.testing.assert_allclose(out, 2.0 * np.ones((3, 4)))


def test_str_and_as_jaxpr_put_the_constvars_first(graph: etp_compiler.ETraceGraph) -> None:
    (group,) = graph.hidden_groups
    jaxpr = group.transition_jaxpr
    plain = jaxpr.as_jaxpr()
    assert list(plain.invars) == [*jaxpr.constvars, *jaxpr.invars] and not plain.constvars
    assert "tanh" in str(jaxpr) and str(jaxpr) == str(plain)
    assert "transition of hidden group 0" in repr(jaxpr)
    hidden, consts = group_inputs(group, step_env(graph, jnp.ones((2, 3))))
    (via_jax,) = jax.core.eval_jaxpr(plain, [], *consts, *hidden)
    np.testing.assert_array_equal(via_jax, jaxpr.evaluate(consts, *hidden)[0])


def test_evaluate_checks_its_arity(graph: etp_compiler.ETraceGraph) -> None:
    (group,) = graph.hidden_groups
    n_const = len(group.transition_jaxpr.constvars)
    with pytest.raises(
        TypeError,
        match=rf"transition of hidden group 0: expected {n_const} constant values and 1 arguments, got 0 and 1",
    ):
        group.transition_jaxpr.evaluate([], jnp.zeros((2, 4)))


def test_jax_jaxpr_without_const_values_reads_constvars_as_invars_on_new_jax() -> None:
    """The JAX behaviour OpenJaxpr protects against, pinned so a change in either direction is seen."""
    traced = jax.make_jaxpr(lambda c, x: c * x)(jnp.ones(3), jnp.ones(3)).jaxpr
    c, x = traced.invars
    debug = jax.extend.core.DebugInfo("test", "c * x", None, None)
    rebuilt = type(traced)([c], [x], list(traced.outvars), list(traced.eqns), debug_info=debug)
    if tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11):
        assert list(rebuilt.invars) == [c, x] and list(rebuilt.constvars) == []
    else:
        assert list(rebuilt.invars) == [x] and list(rebuilt.constvars) == [c]
