"""saiunit Quantities through the user-facing functions.

Each wrapper splits Quantities into mantissa and unit, binds the primitive on
plain arrays and re-attaches ``unit(x) * unit(weight)``; a bias is converted
into that unit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
import saiunit.sparse as ss
from jax import lax

import etp_primitives as etp

NWC = ("NWC", "WIO", "NWC")


# ----------------------------------------------------------------- helpers


def _is_plain_array(y: object) -> bool:
    return isinstance(y, jax.Array) and not isinstance(y, u.Quantity)


def _assert_unit(y: object, unit: u.Unit) -> None:
    assert isinstance(y, u.Quantity), f"expected a Quantity in {unit}, got {type(y).__name__}"
    assert u.get_unit(y) == unit, f"unit {u.get_unit(y)} != {unit}"


def _etp_eqns(closed_jaxpr: jax.extend.core.ClosedJaxpr, primitive: object) -> list:
    return [e for e in closed_jaxpr.jaxpr.eqns if e.primitive is primitive]


def _assert_binds_mantissas(fn, args, primitive, n_direct: int) -> None:
    """The primitive appears once and its first ``n_direct`` invars are the flattened inputs (the mantissas)."""
    closed = jax.make_jaxpr(fn)(*args)
    eqns = _etp_eqns(closed, primitive)
    assert len(eqns) == 1, closed
    eqn = eqns[0]
    for var in eqn.invars:
        aval = var.aval
        assert not isinstance(aval, u.Quantity)
        assert aval.dtype == jnp.float64
    # The flattened Quantity leaves are the mantissas; they reach the primitive unchanged.
    assert list(eqn.invars[:n_direct]) == list(closed.jaxpr.invars[:n_direct]), closed


def _sparse_fixture(rng: np.random.Generator):
    dense = np.array([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0], [4.0, 0.0, 0.0, 5.0]])
    mat = ss.CSR.fromdense(jnp.asarray(dense))
    data = jnp.asarray(rng.normal(size=mat.data.shape))
    w_dense = etp.SparseStructure.from_sparse(mat).todense(data)
    return mat, data, w_dense


# ------------------------------------------------------------------ matmul


def test_matmul_volt_times_siemens_is_amp(rng):
    x = jnp.asarray(rng.normal(size=(4, 3)))
    w = jnp.asarray(rng.normal(size=(3, 5)))
    y = etp.matmul(x * u.volt, w * u.siemens)
    _assert_unit(y, u.amp)
    np.testing.assert_allclose(u.get_mantissa(y), x @ w, rtol=1e-12)


def test_matmul_millivolt_times_siemens_is_milliamp(rng):
    x = jnp.asarray(rng.normal(size=(3,)))
    w = jnp.asarray(rng.normal(size=(3, 2)))
    y = etp.matmul(x * u.mV, w * u.siemens)
    _assert_unit(y, u.mA)
    np.testing.assert_allclose(u.get_mantissa(y), x @ w, rtol=1e-12)


def test_matmul_binds_mantissas(rng):
    x = jnp.asarray(rng.normal(size=(4, 3))) * u.mV
    w = jnp.asarray(rng.normal(size=(3, 5))) * u.siemens
    _assert_binds_mantissas(lambda a, b: etp.matmul(a, b), (x, w), etp.etp_mm_p, 2)
    _assert_binds_mantissas(lambda a, b: etp.matmul(a, b), (x[0], w), etp.etp_mv_p, 2)


def test_matmul_bias_in_other_compatible_unit_is_rescaled(rng):
    x = jnp.asarray(rng.normal(size=(4, 3)))
    w = jnp.asarray(rng.normal(size=(3, 5)))
    b = jnp.asarray(rng.normal(size=(5,)))
    y = etp.matmul(x * u.mV, w * u.siemens, bias=b * u.nA)
    _assert_unit(y, u.mA)
    np.testing.assert_allclose(u.get_mantissa(y), x @ w + b[None, :] * 1e-6, rtol=1e-12)
    # The same bias given in amps gives the same current.
    y_amp = etp.matmul(x * u.mV, w * u.siemens, bias=(b * 1e-9) * u.amp)
    np.testing.assert_allclose(u.get_mantissa(y_amp.to(u.mA)), u.get_mantissa(y), rtol=1e-12)


def test_matmul_plain_bias_with_scaled_dimensionless_output(rng):
    # mV * (1/V) is dimensionless with scale 1e-3: a plain bias is compatible and must be added as is.
    x = jnp.asarray(rng.normal(size=(4, 3)))
    w = jnp.asarray(rng.normal(size=(3, 5)))
    b = jnp.asarray(rng.normal(size=(5,)))
    y = etp.matmul(x * u.mV, w / u.volt, bias=b)
    value = y.to_decimal() if isinstance(y, u.Quantity) else y
    np.testing.assert_allclose(value, 1e-3 * (x @ w) + b[None, :], rtol=1e-12)


def test_matmul_plain_inputs_give_plain_array(rng):
    x = jnp.asarray(rng.normal(size=(4, 3)))
    w = jnp.asarray(rng.normal(size=(3, 5)))
    b = jnp.asarray(rng.normal(size=(5,)))
    y = etp.matmul(x, w, bias=b)
    assert _is_plain_array(y)
    np.testing.assert_allclose(y, x @ w + b[None, :], rtol=1e-12)


def test_matmul_under_jit_and_grad(rng):
    x = jnp.asarray(rng.normal(size=(4, 3)))
    w = jnp.asarray(rng.normal(size=(3, 5)))
    b = jnp.asarray(rng.normal(size=(5,)))

    @jax.jit
    def f(xm, wm, bm):
        return etp.matmul(xm * u.mV, wm * u.siemens, bias=bm * u.nA)

    y = f(x, w, b)
    _assert_unit(y, u.mA)
    np.testing.assert_allclose(u.get_mantissa(y), x @ w + 1e-6 * b[None, :], rtol=1e-12)

    def loss(wm, bm):
        return jnp.sum(u.get_mantissa(etp.matmul(x * u.mV, wm * u.siemens, bias=bm * u.nA)) ** 2)

    def ref(wm, bm):
        return jnp.sum((x @ wm + 1e-6 * bm[None, :]) ** 2)

    got = jax.grad(loss, argnums=(0, 1))(w, b)
    want = jax.grad(ref, argnums=(0, 1))(w, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-10)


def test_matmul_incompatible_bias_unit_names_both_units(rng):
    x = jnp.ones((2, 3)) * u.mV
    w = jnp.ones((3, 4)) * u.siemens
    with pytest.raises(ValueError) as info:
        etp.matmul(x, w, bias=jnp.ones(4) * u.ms)
    msg = str(info.value)
    assert "etp_mm" in msg and "bias" in msg
    assert str(u.ms) in msg and str(u.mA) in msg, msg


# -------------------------------------------------------------------- conv


def _ref_conv(x, k, b=None):
    y = lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=NWC)
    return y if b is None else y + b[None, None, :]


def test_conv_units_and_bias_rescaling(rng):
    x = jnp.asarray(rng.normal(size=(2, 8, 3)))
    k = jnp.asarray(rng.normal(size=(3, 3, 4)))
    b = jnp.asarray(rng.normal(size=(4,)))
    y = etp.conv(x * u.volt, k * u.siemens, dimension_numbers=NWC)
    _assert_unit(y, u.amp)
    np.testing.assert_allclose(u.get_mantissa(y), _ref_conv(x, k), rtol=1e-12)

    y = etp.conv(x * u.mV, k * u.siemens, b * u.nA, dimension_numbers=NWC)
    _assert_unit(y, u.mA)
    np.testing.assert_allclose(u.get_mantissa(y), _ref_conv(x, k, 1e-6 * b), rtol=1e-12)


def test_conv_binds_mantissas(rng):
    x = jnp.asarray(rng.normal(size=(2, 8, 3))) * u.mV
    k = jnp.asarray(rng.normal(size=(3, 3, 4))) * u.siemens
    _assert_binds_mantissas(lambda a, b: etp.conv(a, b, dimension_numbers=NWC), (x, k), etp.etp_conv_p, 2)


def test_conv_plain_inputs_give_plain_array(rng):
    x = jnp.asarray(rng.normal(size=(2, 8, 3)))
    k = jnp.asarray(rng.normal(size=(3, 3, 4)))
    y = etp.conv(x, k, jnp.zeros(4), dimension_numbers=NWC)
    assert _is_plain_array(y)
    np.testing.assert_allclose(y, _ref_conv(x, k), rtol=1e-12)


def test_conv_under_jit_and_grad(rng):
    x = jnp.asarray(rng.normal(size=(2, 8, 3)))
    k = jnp.asarray(rng.normal(size=(3, 3, 4)))
    b = jnp.asarray(rng.normal(size=(4,)))
    f = jax.jit(lambda km: etp.conv(x * u.mV, km * u.siemens, b * u.nA, dimension_numbers=NWC))
    y = f(k)
    _assert_unit(y, u.mA)
    np.testing.assert_allclose(u.get_mantissa(y), _ref_conv(x, k, 1e-6 * b), rtol=1e-12)
    got = jax.grad(lambda km: jnp.sum(u.get_mantissa(f(km)) ** 2))(k)
    want = jax.grad(lambda km: jnp.sum(_ref_conv(x, km, 1e-6 * b) ** 2))(k)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_conv_incompatible_bias_unit_names_both_units():
    with pytest.raises(ValueError) as info:
        etp.conv(jnp.ones((2, 8, 3)) * u.mV, jnp.ones((3, 3, 4)) * u.siemens, jnp.ones(4) * u.ms, dimension_numbers=NWC)
    msg = str(info.value)
    assert "etp_conv" in msg and str(u.ms) in msg and str(u.mA) in msg, msg


# ----------------------------------------------------------- sparse_matmul


def test_sparse_matmul_units_and_bias_rescaling(rng):
    mat, data, w_dense = _sparse_fixture(rng)
    x = jnp.asarray(rng.normal(size=(4, 3)))
    b = jnp.asarray(rng.normal(size=(4,)))
    y = etp.sparse_matmul(x * u.volt, data * u.siemens, sparse_mat=mat)
    _assert_unit(y, u.amp)
    np.testing.assert_allclose(u.get_mantissa(y), x @ w_dense, rtol=1e-12)

    y = etp.sparse_matmul(x[0] * u.mV, data * u.siemens, sparse_mat=mat, bias=b * u.nA)
    _assert_unit(y, u.mA)
    np.testing.assert_allclose(u.get_mantissa(y), x[0] @ w_dense + 1e-6 * b, rtol=1e-12)


def test_sparse_matmul_binds_mantissas(rng):
    mat, data, _ = _sparse_fixture(rng)
    x = jnp.asarray(rng.normal(size=(4, 3))) * u.mV
    fn = lambda a, d: etp.sparse_matmul(a, d, sparse_mat=mat)  # noqa: E731
    _assert_binds_mantissas(fn, (x, data * u.siemens), etp.etp_sp_mm_p, 2)
    _assert_binds_mantissas(fn, (x[0], data * u.siemens), etp.etp_sp_mv_p, 2)


def test_sparse_matmul_plain_inputs_give_plain_array(rng):
    mat, data, w_dense = _sparse_fixture(rng)
    x = jnp.asarray(rng.normal(size=(4, 3)))
    y = etp.sparse_matmul(x, data, sparse_mat=mat)
    assert _is_plain_array(y)
    np.testing.assert_allclose(y, x @ w_dense, rtol=1e-12)


def test_sparse_matmul_under_jit_and_grad(rng):
    mat, data, _ = _sparse_fixture(rng)
    pattern = etp.SparseStructure.from_sparse(mat)
    x = jnp.asarray(rng.normal(size=(4, 3)))
    b = jnp.asarray(rng.normal(size=(4,)))
    f = jax.jit(lambda d: etp.sparse_matmul(x * u.mV, d * u.siemens, sparse_mat=mat, bias=b * u.nA))
    y = f(data)
    _assert_unit(y, u.mA)
    np.testing.assert_allclose(u.get_mantissa(y), x @ pattern.todense(data) + 1e-6 * b[None, :], rtol=1e-12)
    got = jax.grad(lambda d: jnp.sum(u.get_mantissa(f(d)) ** 2))(data)
    want = jax.grad(lambda d: jnp.sum((x @ pattern.todense(d) + 1e-6 * b[None, :]) ** 2))(data)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_sparse_matmul_incompatible_bias_unit_names_both_units(rng):
    mat, data, _ = _sparse_fixture(rng)
    with pytest.raises(ValueError) as info:
        etp.sparse_matmul(jnp.ones((2, 3)) * u.mV, data * u.siemens, sparse_mat=mat, bias=jnp.ones(4) * u.ms)
    msg = str(info.value)
    assert "etp_sp_mm" in msg and str(u.ms) in msg and str(u.mA) in msg, msg


# ------------------------------------------------------------- lora_matmul


def test_lora_matmul_units_and_bias_rescaling(rng):
    x = jnp.asarray(rng.normal(size=(4, 6)))
    B = jnp.asarray(rng.normal(size=(6, 2)))
    A = jnp.asarray(rng.normal(size=(2, 5)))
    b = jnp.asarray(rng.normal(size=(5,)))
    y = etp.lora_matmul(x * u.volt, B * u.siemens, A, alpha=0.5)
    _assert_unit(y, u.amp)
    np.testing.assert_allclose(u.get_mantissa(y), 0.5 * (x @ B @ A), rtol=1e-12)

    y = etp.lora_matmul(x * u.mV, B, A * u.siemens, alpha=2.0, bias=b * u.nA)
    _assert_unit(y, u.mA)
    np.testing.assert_allclose(u.get_mantissa(y), 2.0 * (x @ B @ A) + 1e-6 * b[None, :], rtol=1e-12)


def test_lora_matmul_binds_mantissas(rng):
    x = jnp.asarray(rng.normal(size=(4, 6))) * u.mV
    B = jnp.asarray(rng.normal(size=(6, 2))) * u.siemens
    A = jnp.asarray(rng.normal(size=(2, 5)))
    fn = lambda a, bb, aa: etp.lora_matmul(a, bb, aa, alpha=3.0)  # noqa: E731
    _assert_binds_mantissas(fn, (x, B, A), etp.etp_lora_mm_p, 3)
    _assert_binds_mantissas(fn, (x[0], B, A), etp.etp_lora_mv_p, 3)


def test_lora_matmul_plain_inputs_give_plain_array(rng):
    x = jnp.asarray(rng.normal(size=(4, 6)))
    B = jnp.asarray(rng.normal(size=(6, 2)))
    A = jnp.asarray(rng.normal(size=(2, 5)))
    y = etp.lora_matmul(x, B, A)
    assert _is_plain_array(y)
    np.testing.assert_allclose(y, x @ B @ A, rtol=1e-12)


def test_lora_matmul_under_jit_and_grad(rng):
    x = jnp.asarray(rng.normal(size=(4, 6)))
    B = jnp.asarray(rng.normal(size=(6, 2)))
    A = jnp.asarray(rng.normal(size=(2, 5)))
    b = jnp.asarray(rng.normal(size=(5,)))
    f = jax.jit(lambda bm, am: etp.lora_matmul(x * u.mV, bm * u.siemens, am, alpha=0.5, bias=b * u.nA))
    y = f(B, A)
    _assert_unit(y, u.mA)
    np.testing.assert_allclose(u.get_mantissa(y), 0.5 * (x @ B @ A) + 1e-6 * b[None, :], rtol=1e-12)
    got = jax.grad(lambda bm, am: jnp.sum(u.get_mantissa(f(bm, am)) ** 2), argnums=(0, 1))(B, A)
    want = jax.grad(lambda bm, am: jnp.sum((0.5 * (x @ bm @ am) + 1e-6 * b[None, :]) ** 2), argnums=(0, 1))(B, A)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-10)


def test_lora_matmul_incompatible_bias_unit_names_both_units():
    with pytest.raises(ValueError) as info:
        etp.lora_matmul(
            jnp.ones((2, 3)) * u.mV, jnp.ones((3, 2)) * u.siemens, jnp.ones((2, 4)), bias=jnp.ones(4) * u.ms
        )
    msg = str(info.value)
    assert "etp_lora_mm" in msg and str(u.ms) in msg and str(u.mA) in msg, msg


# ------------------------------------------------------------ element_wise


def test_element_wise_unit_unaware_fn_on_quantity_raises_clear_error(rng):
    # jnp.abs cannot take a Quantity; the error must name element_wise, fn and the unit, and point to saiunit.math.
    w = jnp.asarray(rng.normal(size=(5,)))
    with pytest.raises(TypeError, match=r"element_wise \(etp_elemwise\): fn='abs'.*unit ms.*saiunit\.math\.abs"):
        etp.element_wise(w * u.ms, jnp.abs)


def test_element_wise_unit_aware_fn_keeps_unit(rng):
    w = jnp.asarray(rng.normal(size=(5,)))
    y = etp.element_wise(w * u.ms, u.math.abs)
    _assert_unit(y, u.ms)
    np.testing.assert_allclose(u.get_mantissa(y), jnp.abs(w), rtol=1e-12)
    y = etp.element_wise(w * u.mV)  # identity
    _assert_unit(y, u.mV)
    np.testing.assert_allclose(u.get_mantissa(y), w, rtol=1e-12)


def test_element_wise_binds_mantissa(rng):
    w = jnp.asarray(rng.normal(size=(5,))) * u.ms
    _assert_binds_mantissas(lambda q: etp.element_wise(q), (w,), etp.etp_elemwise_p, 1)


def test_element_wise_plain_input_gives_plain_array(rng):
    w = jnp.asarray(rng.normal(size=(5,)))
    y = etp.element_wise(w, jax.nn.sigmoid)
    assert _is_plain_array(y)
    np.testing.assert_allclose(y, jax.nn.sigmoid(w), rtol=1e-12)


def test_element_wise_under_jit_and_grad(rng):
    w = jnp.asarray(rng.normal(size=(5,)))
    f = jax.jit(lambda m: etp.element_wise(m * u.ms, u.math.abs))
    y = f(w)
    _assert_unit(y, u.ms)
    np.testing.assert_allclose(u.get_mantissa(y), jnp.abs(w), rtol=1e-12)
    got = jax.grad(lambda m: jnp.sum(u.get_mantissa(f(m)) ** 2))(w)
    np.testing.assert_allclose(got, 2.0 * w, rtol=1e-12)
