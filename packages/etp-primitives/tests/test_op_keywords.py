"""Keywords of both eras on the ops: ``fn``/``weight_fn``, ``weight_fn``/``bias_fn``, ``kernel_fn``, ``a_fn``/``b_fn``.

Each transform is plain JAX applied to the weight inside the op, before the
marker. Oracle: ``jax.grad`` of the plain op (``jnp``/``lax``, no primitive)
composed with the same transform, in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
import saiunit.sparse as ss
from jax import lax

import etp_primitives as etp

Array = jax.Array


def _mask(shape: tuple[int, ...]) -> Array:
    return jnp.asarray(np.random.default_rng(5).random(shape) > 0.4, dtype=jnp.float64)


def _plus(y: Array, b: Array) -> Array:
    """``y + b`` along the last axis, broadcast explicitly (the tests run with rank promotion 'raise')."""
    return y + jnp.reshape(b, (1,) * (y.ndim - 1) + b.shape)


def _grads(f: Callable[..., Array], args: tuple[Array, ...]) -> tuple[Array, ...]:
    return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=tuple(range(len(args))))(*args)


def _assert_same(f: Callable[..., Array], ref: Callable[..., Array], args: tuple[Array, ...]) -> None:
    np.testing.assert_allclose(f(*args), ref(*args), rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(f, args), _grads(ref, args), strict=True):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jax.jit(f)(*args), ref(*args), rtol=1e-12, atol=1e-12)


def _marker_inputs(f: Callable[..., Array], args: tuple[Array, ...], primitive: Any) -> tuple[Any, list[str]]:
    """The ETP equation of ``f`` and the primitives that produce its inputs."""
    jaxpr = jax.make_jaxpr(f)(*args).jaxpr
    producers = {v: e for e in jaxpr.eqns for v in e.outvars}
    (eqn,) = [e for e in jaxpr.eqns if e.primitive is primitive]
    return eqn, [producers[v].primitive.name if v in producers else "input" for v in eqn.invars]


def _computed(producers: list[str]) -> list[bool]:
    """Which inputs of the marker are computed in the jaxpr (not taken as they are from its inputs)."""
    return [name != "input" for name in producers]


@pytest.mark.parametrize("batched", [True, False], ids=["etp_mm", "etp_mv"])
def test_matmul_weight_fn_and_bias_fn(batched: bool, rng: np.random.Generator) -> None:
    x = jnp.asarray(rng.normal(size=(4, 3) if batched else (3,)))
    w, b = jnp.asarray(rng.normal(size=(3, 5))), jnp.asarray(rng.normal(size=(5,)))
    mask = _mask((3, 5))

    def f(x: Array, w: Array, b: Array) -> Array:
        return etp.matmul(x, w, b, weight_fn=lambda v: jnp.tanh(v) * mask, bias_fn=jnp.exp)

    def ref(x: Array, w: Array, b: Array) -> Array:
        return _plus(x @ (jnp.tanh(w) * mask), jnp.exp(b))

    _assert_same(f, ref, (x, w, b))
    eqn, producers = _marker_inputs(f, (x, w, b), etp.etp_mm_p if batched else etp.etp_mv_p)
    assert _computed(producers) == [False, True, True]  # the transforms run before the marker, on the weights
    _assert_same(lambda x, w: etp.matmul(x, w, weight_fn=jnp.abs), lambda x, w: x @ jnp.abs(w), (x, w))


def test_element_wise_fn_and_weight_fn_are_one_keyword(rng: np.random.Generator) -> None:
    w = jnp.asarray(rng.normal(size=(6,)))
    ref = jax.nn.sigmoid
    _assert_same(lambda w: etp.element_wise(w, fn=jax.nn.sigmoid), ref, (w,))
    _assert_same(lambda w: etp.element_wise(w, weight_fn=jax.nn.sigmoid), ref, (w,))
    _assert_same(lambda w: etp.element_wise(w, jax.nn.sigmoid, weight_fn=jax.nn.sigmoid), ref, (w,))
    _assert_same(lambda w: etp.element_wise(w, fn=None), lambda w: w, (w,))
    _, producers = _marker_inputs(lambda w: etp.element_wise(w, weight_fn=jnp.exp), (w,), etp.etp_elemwise_p)
    assert _computed(producers) == [True]
    with pytest.raises(TypeError, match=r"element_wise \(etp_elemwise\): got both fn= and weight_fn="):
        etp.element_wise(w, fn=jnp.tanh, weight_fn=jax.nn.sigmoid)
    with pytest.raises(TypeError, match=r"element_wise \(etp_elemwise\): weight_fn must be callable.*int"):
        etp.element_wise(w, weight_fn=3)
    with pytest.raises(TypeError, match=r"weight_fn='abs'.*unit ms.*saiunit\.math\.abs"):
        etp.element_wise(w * u.ms, weight_fn=jnp.abs)


def test_conv_kernel_fn_and_bias_fn(rng: np.random.Generator) -> None:
    x = jnp.asarray(rng.normal(size=(2, 7, 3)))
    k, b = jnp.asarray(rng.normal(size=(3, 3, 4))), jnp.asarray(rng.normal(size=(4,)))
    mask = _mask((3, 3, 4))
    dn = ("NWC", "WIO", "NWC")

    def f(x: Array, k: Array, b: Array) -> Array:
        return etp.conv(x, k, b, padding="SAME", dimension_numbers=dn, kernel_fn=lambda v: v * mask, bias_fn=jnp.tanh)

    def ref(x: Array, k: Array, b: Array) -> Array:
        y = lax.conv_general_dilated(x, k * mask, (1,), "SAME", dimension_numbers=dn)
        return y + jnp.tanh(b).reshape(1, 1, 4)

    _assert_same(f, ref, (x, k, b))
    _, producers = _marker_inputs(f, (x, k, b), etp.etp_conv_p)
    assert _computed(producers) == [False, True, True]


@pytest.mark.parametrize("batched", [True, False], ids=["etp_lora_mm", "etp_lora_mv"])
def test_lora_a_fn_b_fn_and_bias_fn(batched: bool, rng: np.random.Generator) -> None:
    x = jnp.asarray(rng.normal(size=(3, 5) if batched else (5,)))
    B, A, b = (jnp.asarray(rng.normal(size=s)) for s in ((5, 2), (2, 4), (4,)))

    def f(x: Array, B: Array, A: Array, b: Array) -> Array:
        return etp.lora_matmul(x, B, A, alpha=0.5, bias=b, b_fn=jnp.tanh, a_fn=lambda v: v**2, bias_fn=jnp.sin)

    def ref(x: Array, B: Array, A: Array, b: Array) -> Array:
        return _plus(0.5 * (x @ jnp.tanh(B) @ A**2), jnp.sin(b))

    _assert_same(f, ref, (x, B, A, b))
    _, producers = _marker_inputs(f, (x, B, A, b), etp.etp_lora_mm_p if batched else etp.etp_lora_mv_p)
    assert _computed(producers) == [False, True, True, True]


def test_sparse_matmul_weight_fn_and_bias_fn(rng: np.random.Generator) -> None:
    dense = np.where(rng.random((4, 3)) < 0.5, rng.normal(size=(4, 3)), 0.0)
    csr = ss.CSR.fromdense(jnp.asarray(dense))
    x, data, b = jnp.asarray(rng.normal(size=(2, 4))), jnp.asarray(rng.normal(size=(csr.nse,))), jnp.ones(3)
    pattern = etp.SparseStructure.from_sparse(csr)

    def f(x: Array, data: Array, b: Array) -> Array:
        return etp.sparse_matmul(x, data, sparse_mat=csr, bias=b, weight_fn=jnp.abs, bias_fn=lambda v: 3.0 * v)

    def ref(x: Array, data: Array, b: Array) -> Array:
        return _plus(x @ pattern.todense(jnp.abs(data)), 3.0 * b)

    _assert_same(f, ref, (x, data, b))
    # the 0.2.8 name of the second argument
    _assert_same(
        lambda x, data: etp.sparse_matmul(x, weight=data, sparse_mat=csr),
        lambda x, data: x @ pattern.todense(data),
        (x, data),
    )
    with pytest.raises(TypeError, match=r"sparse_matmul \(etp_sp_mm\): pass the stored values once.*got both"):
        etp.sparse_matmul(x, data, weight=data, sparse_mat=csr)
    with pytest.raises(TypeError, match=r"sparse_matmul \(etp_sp_mm\): pass the stored values once.*got neither"):
        etp.sparse_matmul(x, sparse_mat=csr)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: etp.matmul(jnp.ones((2, 3)), jnp.ones((3, 4)), weight_fn=3), r"matmul \(etp_mm\): weight_fn must be callable.*int"),
        (lambda: etp.matmul(jnp.ones(3), jnp.ones((3, 4)), bias_fn=jnp.abs), r"matmul \(etp_mv\): bias_fn was given but bias is None"),
        (lambda: etp.conv(jnp.ones((1, 4, 2)), jnp.ones((2, 2, 3)), dimension_numbers=("NWC", "WIO", "NWC"), kernel_fn="x"), r"conv \(etp_conv\): kernel_fn must be callable.*str"),
        (lambda: etp.conv(jnp.ones((1, 4, 2)), jnp.ones((2, 2, 3)), dimension_numbers=("NWC", "WIO", "NWC"), bias_fn=jnp.abs), r"conv \(etp_conv\): bias_fn was given but bias is None"),
        (lambda: etp.lora_matmul(jnp.ones((2, 3)), jnp.ones((3, 1)), jnp.ones((1, 2)), a_fn=1.0), r"lora_matmul \(etp_lora_mm\): a_fn must be callable.*float"),
        (lambda: etp.lora_matmul(jnp.ones(3), jnp.ones((3, 1)), jnp.ones((1, 2)), b_fn=[]), r"lora_matmul \(etp_lora_mv\): b_fn must be callable.*list"),
        (lambda: etp.lora_matmul(jnp.ones(3), jnp.ones((3, 1)), jnp.ones((1, 2)), bias_fn=jnp.abs), r"lora_matmul \(etp_lora_mv\): bias_fn was given but bias is None"),
        (lambda: etp.sparse_matmul(jnp.ones(2), jnp.ones(2), sparse_mat=ss.CSR.fromdense(jnp.eye(2)), weight_fn=0), r"sparse_matmul \(etp_sp_mv\): weight_fn must be callable.*int"),
        (lambda: etp.matmul(jnp.ones(3), jnp.ones((3, 2)) * u.mV, weight_fn=jnp.abs), r"matmul \(etp_mv\): weight_fn='abs'.*Quantity weight \(unit mV\).*saiunit\.math\.abs"),
    ],
    ids=["matmul-weight_fn", "matmul-bias_fn", "conv-kernel_fn", "conv-bias_fn", "lora-a_fn", "lora-b_fn", "lora-bias_fn", "sparse-weight_fn", "unit-unaware"],
)  # fmt: skip
def test_transform_errors_name_the_op_and_keyword(call: Callable[[], Any], pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        call()


def test_unit_aware_transforms_keep_units(rng: np.random.Generator) -> None:
    x = jnp.asarray(rng.normal(size=(2, 3))) * u.mV
    w = jnp.asarray(rng.normal(size=(3, 4))) * u.siemens
    b = jnp.asarray(rng.normal(size=(4,))) * u.mA
    y = etp.matmul(x, w, b, weight_fn=u.math.abs, bias_fn=lambda v: 2.0 * v)
    assert u.get_unit(y).dim == u.mA.dim
    want = _plus(u.get_mantissa(x) @ jnp.abs(u.get_mantissa(w)), 2.0 * u.get_mantissa(b))  # mV * S = mA
    np.testing.assert_allclose(u.get_mantissa(y.to(u.mA)), want, rtol=1e-12)
