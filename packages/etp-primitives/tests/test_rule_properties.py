"""Property tests (hypothesis) of every built-in's ETP rules over random small shapes, in float64.

* ``xy_to_dw`` is the VJP of the *plain* op (``jnp`` / ``lax``, written here) w.r.t. every trainable input;
* ``drtrl_grad(seed(d))`` is ``xy_to_dw`` at the cotangent ``g * d``: the D-RTRL seed and contraction
  of one step give the instantaneous gradient (for any ``d`` where each weight feeds one output
  position, for ``d`` uniform over a sample's outputs where it feeds many: conv kernels, LoRA's ``B``);
* ``yw_to_w`` moves into the cotangent: ``drtrl_grad(g, yw_to_w(a, eps)) == drtrl_grad(g * a, eps)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit.sparse as ss
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import etp_primitives as etp

Array = jax.Array

# Each test is parametrized over the five ops, so 6 examples per op (30 per test) keep the file at ~40 s.
PROPERTY = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Case:
    """One op call: ``op(x, weights)`` through the primitive and ``plain(x, weights)`` without it."""

    op: Callable[[Any, dict[str, Array]], Array]
    plain: Callable[[Any, dict[str, Array]], Array]
    x: Any
    weights: dict[str, Array]
    #: Leading axes of ``y`` that index samples (a factor may vary along them only, when not position-wise).
    sample_ndim: int
    #: Whether every weight element feeds one output position (rules exact for any ``d``).
    position_wise: bool

    def equation(self) -> tuple[Any, dict[str, Any]]:
        jaxpr = jax.make_jaxpr(lambda w: self.op(self.x, w))(self.weights).jaxpr
        (eqn,) = [e for e in jaxpr.eqns if etp.is_etp_primitive(e.primitive)]
        return eqn.primitive, dict(eqn.params)


def _plus_bias(y: Array, w: dict[str, Array]) -> Array:
    """``y + bias`` along the last axis when there is a bias, broadcast explicitly (rank promotion 'raise')."""
    return y + jnp.reshape(w["bias"], (1,) * (y.ndim - 1) + w["bias"].shape) if "bias" in w else y


def _normal(rng: np.random.Generator, *shape: int) -> Array:
    return jnp.asarray(rng.normal(size=shape))


@st.composite
def dense_cases(draw: st.DrawFn) -> Case:
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    n_in, n_out, bias = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    weights = {"weight": _normal(rng, n_in, n_out), **({"bias": _normal(rng, n_out)} if bias else {})}

    def plain(x: Array, w: dict[str, Array]) -> Array:
        return _plus_bias(x @ w["weight"], w)

    op = lambda x, w: etp.matmul(x, w["weight"], w.get("bias"))  # noqa: E731
    return Case(op, plain, _normal(rng, *lead, n_in), weights, len(lead), True)


@st.composite
def sparse_cases(draw: st.DrawFn) -> Case:
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    n_in, n_out, bias = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.booleans())
    layout = draw(st.sampled_from([ss.CSR, ss.CSC, ss.COO]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dense = np.where(rng.random((n_in, n_out)) < 0.6, rng.normal(size=(n_in, n_out)), 0.0)
    dense[rng.integers(n_in), rng.integers(n_out)] = 1.5  # at least one stored value
    mat = layout.fromdense(jnp.asarray(dense))
    pattern = etp.SparseStructure.from_sparse(mat)
    weights = {"weight": jnp.asarray(mat.data), **({"bias": _normal(rng, n_out)} if bias else {})}

    def plain(x: Array, w: dict[str, Array]) -> Array:
        return _plus_bias(x @ pattern.todense(w["weight"]), w)

    op = lambda x, w: etp.sparse_matmul(x, w["weight"], sparse_mat=mat, bias=w.get("bias"))  # noqa: E731
    return Case(op, plain, _normal(rng, *lead, n_in), weights, len(lead), True)


@st.composite
def lora_cases(draw: st.DrawFn) -> Case:
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    n_in, rank, n_out = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    alpha, bias = draw(st.sampled_from([1.0, 0.5, -2.0])), draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    weights = {"lora_b": _normal(rng, n_in, rank), "lora_a": _normal(rng, rank, n_out)}
    if bias:
        weights["bias"] = _normal(rng, n_out)

    def plain(x: Array, w: dict[str, Array]) -> Array:
        return _plus_bias(alpha * (x @ w["lora_b"] @ w["lora_a"]), w)

    op = lambda x, w: etp.lora_matmul(x, w["lora_b"], w["lora_a"], alpha=alpha, bias=w.get("bias"))  # noqa: E731
    return Case(op, plain, _normal(rng, *lead, n_in), weights, len(lead), False)


@st.composite
def conv_cases(draw: st.DrawFn) -> Case:
    batch, width, c_in, c_out = (
        draw(st.integers(1, 2)),
        draw(st.integers(3, 6)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
    )
    size, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    padding, bias = draw(st.sampled_from(["SAME", "VALID"])), draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dn = ("NWC", "WIO", "NWC")
    weights = {"weight": _normal(rng, size, c_in, c_out), **({"bias": _normal(rng, c_out)} if bias else {})}

    def plain(x: Array, w: dict[str, Array]) -> Array:
        return _plus_bias(lax.conv_general_dilated(x, w["weight"], (stride,), padding, dimension_numbers=dn), w)

    op = lambda x, w: etp.conv(x, w["weight"], w.get("bias"), strides=stride, padding=padding, dimension_numbers=dn)  # noqa: E731
    return Case(op, plain, _normal(rng, batch, width, c_in), weights, 1, False)


@st.composite
def elemwise_cases(draw: st.DrawFn) -> Case:
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return Case(
        lambda x, w: etp.element_wise(w["weight"]),
        lambda x, w: w["weight"],
        None,
        {"weight": _normal(rng, *shape)},
        0,
        True,
    )


OPS = {
    "matmul": dense_cases(),
    "sparse_matmul": sparse_cases(),
    "lora_matmul": lora_cases(),
    "conv": conv_cases(),
    "element_wise": elemwise_cases(),
}


def _assert_trees_close(got: dict[str, Array], want: dict[str, Array]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12, err_msg=key)


def _y_shape(case: Case) -> tuple[int, ...]:
    return tuple(jax.eval_shape(lambda: case.plain(case.x, case.weights)).shape)


@pytest.mark.parametrize("op", OPS)
@PROPERTY
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_xy_to_dw_is_the_vjp_of_the_plain_op(op: str, data: st.DataObject, seed: int) -> None:
    case = data.draw(OPS[op], label="case")
    primitive, params = case.equation()
    ct = _normal(np.random.default_rng(seed), *_y_shape(case))
    np.testing.assert_allclose(case.op(case.x, case.weights), case.plain(case.x, case.weights), rtol=1e-12, atol=1e-12)
    _, pullback = jax.vjp(lambda w: case.plain(case.x, w), case.weights)
    (want,) = pullback(ct)
    got = etp.require_rules(primitive, "xy_to_dw")["xy_to_dw"](case.x, ct, case.weights, **params)
    _assert_trees_close(dict(got), want)
    # and jax.grad through the primitive is the plain op's
    _assert_trees_close(
        jax.grad(lambda w: jnp.sum(ct * case.op(case.x, w)))(case.weights),
        jax.grad(lambda w: jnp.sum(ct * case.plain(case.x, w)))(case.weights),
    )


def _factors(case: Case, rng: np.random.Generator, y_shape: tuple[int, ...]) -> tuple[Array, Array]:
    """A ``d`` and an ``a`` the rules are exact for: arbitrary when position-wise, else uniform per sample."""
    if case.position_wise:
        return _normal(rng, *y_shape), _normal(rng, *y_shape)
    lead, rest = y_shape[: case.sample_ndim], (1,) * (len(y_shape) - case.sample_ndim)

    def per_sample() -> Array:
        return jnp.broadcast_to(_normal(rng, *lead).reshape(*lead, *rest), y_shape)

    return per_sample(), per_sample()


@pytest.mark.parametrize("op", OPS)
@PROPERTY
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_drtrl_seed_grad_and_propagation(op: str, data: st.DataObject, seed: int) -> None:
    case = data.draw(OPS[op], label="case")
    primitive, params = case.equation()
    rng = np.random.default_rng(seed)
    y_shape = _y_shape(case)
    d, a = _factors(case, rng, y_shape)
    g = _normal(rng, *y_shape)
    rules = etp.require_rules(primitive, "dt_to_t", "xy_to_dw")
    # one step: the seed contracted with g is the instantaneous gradient at the cotangent g * d
    trace = etp.drtrl_seed(primitive, case.x, d, case.weights, params)
    got = etp.drtrl_grad(primitive, case.x, g, trace, case.weights, params)
    _assert_trees_close(got, dict(rules["xy_to_dw"](case.x, g * d, case.weights, **params)))
    # the propagation factor keeps the trace layout and moves into the cotangent
    propagated = rules["dt_to_t"](a, trace, **params)
    assert {k: v.shape for k, v in propagated.items()} == {k: v.shape for k, v in trace.items()}
    got = etp.drtrl_grad(primitive, case.x, g, propagated, case.weights, params)
    _assert_trees_close(got, etp.drtrl_grad(primitive, case.x, g * a, trace, case.weights, params))
