"""The one jaxpr evaluator: ``eval_jaxpr``, ``read_atom``, ``eval_eqns``, against ``jax.core.eval_jaxpr`` and the functions."""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import etp_compiler
from etp_compiler import OpenJaxpr, eval_eqns, eval_jaxpr, is_var, read_atom

CAPTURED = np.linspace(-1.0, 1.0, 6).reshape(2, 3)  # a closed-over array: a constant of the traced jaxpr


@jax.custom_jvp
def _soft_step(x: jax.Array) -> jax.Array:
    return jnp.where(x > 0, 1.0, 0.0)


@_soft_step.defjvp
def _soft_step_jvp(primals: Any, tangents: Any) -> Any:
    (x,), (t,) = primals, tangents
    return _soft_step(x), t / (1.0 + jnp.abs(x)) ** 2


def _many_kinds(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array, float]:
    """A function with a constant, a nested jit, a custom_jvp, a literal output and several outputs."""
    inner = jax.jit(lambda a: jnp.tanh(a @ w))(x)
    return inner * CAPTURED.sum() + _soft_step(x @ w), jnp.cumsum(x, axis=-1) ** 2, 2.0


def _closed(rng: np.random.Generator) -> tuple[Any, list[np.ndarray]]:
    args = [rng.normal(size=(4, 2)), rng.normal(size=(2, 3))]
    return jax.make_jaxpr(_many_kinds)(*args), args


def test_eval_jaxpr_agrees_with_jax_and_the_function(rng: np.random.Generator) -> None:
    closed, args = _closed(rng)
    ours = eval_jaxpr(closed.jaxpr, closed.consts, *args)
    theirs = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args)
    direct = _many_kinds(*args)
    assert len(ours) == len(theirs) == len(direct) == 3
    for a, b, c in zip(ours, theirs, direct, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-12)
    assert float(ours[2]) == 2.0  # a literal output gives its own value


def test_eval_jaxpr_is_differentiable_like_the_function(rng: np.random.Generator) -> None:
    closed, (x, w) = _closed(rng)

    def via_jaxpr(x: jax.Array) -> jax.Array:
        first, second, _ = eval_jaxpr(closed.jaxpr, closed.consts, x, w)
        return jnp.sum(first) + jnp.sum(second)

    def direct(x: jax.Array) -> jax.Array:
        first, second, _ = _many_kinds(x, w)
        return jnp.sum(first) + jnp.sum(second)

    # the custom_jvp surrogate is kept: the gradient of the step function is not zero
    np.testing.assert_allclose(jax.grad(via_jaxpr)(x), jax.grad(direct)(x), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(via_jaxpr)(x), direct(x), rtol=1e-12)


def test_eval_jaxpr_on_an_open_jaxpr_binds_constvars_then_invars(rng: np.random.Generator) -> None:
    traced = jax.make_jaxpr(lambda c, x: jnp.sin(c) * x + c)(1.0, 2.0).jaxpr
    c, x = traced.invars
    open_jaxpr = OpenJaxpr((c,), (x,), tuple(traced.outvars), tuple(traced.eqns), "sin(c) * x + c")
    c_value, x_value = rng.normal(size=3), rng.normal(size=3)
    (ours,) = eval_jaxpr(open_jaxpr, [c_value], x_value)
    (theirs,) = jax.core.eval_jaxpr(open_jaxpr.as_jaxpr(), [], c_value, x_value)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(ours, np.sin(c_value) * x_value + c_value, rtol=1e-14)
    np.testing.assert_array_equal(open_jaxpr.evaluate([c_value], x_value)[0], ours)


def test_eval_jaxpr_checks_the_number_of_values(rng: np.random.Generator) -> None:
    closed, args = _closed(rng)
    with pytest.raises(TypeError, match=r"_many_kinds: expected \d+ input values \(constants then arguments\)"):
        eval_jaxpr(closed.jaxpr, closed.consts, args[0])
    traced = jax.make_jaxpr(lambda c, x: c * x)(1.0, 2.0).jaxpr
    c, x = traced.invars
    open_jaxpr = OpenJaxpr((c,), (x,), tuple(traced.outvars), tuple(traced.eqns), "c times x")
    with pytest.raises(TypeError, match=r"c times x: expected 1 constant values and 1 arguments, got 2 and 0"):
        eval_jaxpr(open_jaxpr, [1.0, 2.0])
    with pytest.raises(TypeError, match=r"takes a Jaxpr or an OpenJaxpr, got function"):
        eval_jaxpr(_many_kinds, [], *args)  # type: ignore[arg-type]


def test_a_closed_jaxpr_is_evaluated_through_its_parts_on_every_jax() -> None:
    closed = jax.make_jaxpr(lambda x: x * CAPTURED)(jnp.ones((2, 3)))
    if isinstance(closed, jax.extend.core.Jaxpr):  # jax >= 0.11: one class
        (out,) = eval_jaxpr(closed, closed.consts, jnp.ones((2, 3)))
    else:
        with pytest.raises(TypeError, match=r"eval_jaxpr\(closed.jaxpr, closed.consts, \*args\)"):
            eval_jaxpr(closed, [], jnp.ones((2, 3)))
        (out,) = eval_jaxpr(closed.jaxpr, closed.consts, jnp.ones((2, 3)))
    np.testing.assert_array_equal(out, CAPTURED)


def test_read_atom_reads_variables_from_the_env_and_literals_from_themselves() -> None:
    jaxpr = jax.make_jaxpr(lambda x: x * 3.0 + 1.0)(2.0).jaxpr
    mul = jaxpr.eqns[0]
    x, three = mul.invars
    assert is_var(x) and not is_var(three)
    assert read_atom({x: 5.0}, x) == 5.0
    assert float(read_atom({}, three)) == 3.0
    with pytest.raises(KeyError):
        read_atom({}, x)


def test_eval_eqns_writes_every_variable_and_applies_the_override() -> None:
    jaxpr = jax.make_jaxpr(lambda x: jnp.exp(x) * 2.0)(0.5).jaxpr
    (x,) = jaxpr.invars
    exp_out = jaxpr.eqns[0].outvars[0]
    env = eval_eqns(jaxpr.eqns, {x: 0.5})
    assert set(env) == {x, exp_out, *jaxpr.outvars}
    np.testing.assert_allclose(env[jaxpr.outvars[0]], 2.0 * np.exp(0.5))
    shifted = eval_eqns(jaxpr.eqns, {x: 0.5}, override=lambda v, value: value + 1.0 if v is exp_out else value)
    np.testing.assert_allclose(shifted[jaxpr.outvars[0]], 2.0 * (np.exp(0.5) + 1.0))


def test_the_evaluator_is_exported_and_the_old_import_paths_still_work() -> None:
    from etp_compiler._jaxpr_walk import eval_eqns as walk_eval_eqns
    from etp_compiler._jaxpr_walk import is_var as walk_is_var
    from etp_compiler._jaxpr_walk import read_atom as walk_read_atom

    assert {"eval_jaxpr", "read_atom", "eval_eqns", "is_var"} <= set(etp_compiler.__all__)
    assert walk_eval_eqns is eval_eqns and walk_read_atom is read_atom and walk_is_var is is_var


def test_build_producers_maps_every_produced_variable_to_its_equation(rng: np.random.Generator) -> None:
    closed, _ = _closed(rng)
    jaxpr = closed.jaxpr
    producers = etp_compiler.build_producers(jaxpr)
    produced = [(v, eqn) for eqn in jaxpr.eqns for v in eqn.outvars if is_var(v)]
    assert len(producers) == len(produced) and all(producers[v] is eqn for v, eqn in produced)
    assert not set(jaxpr.invars) & set(producers) and not set(jaxpr.constvars) & set(producers)
