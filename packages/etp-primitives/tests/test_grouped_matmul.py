"""etp.grouped_matmul against the dense product with the block-diagonal matrix, and its D-RTRL rules against BPTT."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from jax.scipy.linalg import block_diag

import etp_primitives as etp

Array = jax.Array


def _dense(w: Array) -> Array:
    """The (G * I_g, G * O_g) block-diagonal matrix of the (G, I_g, O_g) blocks, written with block_diag."""
    return block_diag(*[w[g] for g in range(w.shape[0])])


def _plain(x: Array, w: Array, b: Array | None = None) -> Array:
    y = x @ _dense(w)
    return y if b is None else y + jnp.broadcast_to(b, y.shape)


CASES = [((3, 6), (2, 3, 4), True), ((6,), (2, 3, 4), True), ((2, 3, 6), (3, 2, 1), False), ((4, 5), (1, 5, 2), True)]


def _data(rng: np.random.Generator, xs: tuple[int, ...], ws: tuple[int, ...], bias: bool) -> tuple[Array, ...]:
    x, w = jnp.asarray(rng.normal(size=xs)), jnp.asarray(rng.normal(size=ws))
    b = jnp.asarray(rng.normal(size=ws[0] * ws[2])) if bias else None
    return x, w, b  # type: ignore[return-value]


@pytest.mark.parametrize(("xs", "ws", "bias"), CASES)
def test_forward_jit_grad_vmap_equal_the_block_diagonal_product(
    xs: tuple[int, ...], ws: tuple[int, ...], bias: bool, rng: np.random.Generator
) -> None:
    x, w, b = _data(rng, xs, ws, bias)
    want = _plain(x, w, b)
    np.testing.assert_allclose(etp.grouped_matmul(x, w, b), want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(jax.jit(etp.grouped_matmul)(x, w, b), want, rtol=1e-13, atol=1e-13)
    cot = jnp.asarray(rng.normal(size=want.shape))
    args = (x, w) if b is None else (x, w, b)
    _, pull = jax.vjp(etp.grouped_matmul, *args)
    _, pull_ref = jax.vjp(_plain, *args)
    for got, ref in zip(pull(cot), pull_ref(cot), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    xb = jnp.stack([x, 2 * x])
    mapped = jax.vmap(lambda xi: etp.grouped_matmul(xi, w, b))
    np.testing.assert_allclose(mapped(xb), jnp.stack([_plain(xi, w, b) for xi in xb]), rtol=1e-13, atol=1e-13)
    names = [e.primitive.name for e in jax.make_jaxpr(mapped)(xb).jaxpr.eqns if etp.is_etp_primitive(e.primitive)]
    assert names == ["etp_grouped_mm"]


def _eqn(x: Array, w: Array, b: Array | None) -> Any:
    eqns = jax.make_jaxpr(etp.grouped_matmul)(x, w, b).jaxpr.eqns
    return next(e for e in eqns if etp.is_etp_primitive(e.primitive))


@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize(("xs", "ws", "bias"), CASES)
def test_drtrl_rules_are_exact_on_a_leaky_integrator(
    xs: tuple[int, ...], ws: tuple[int, ...], bias: bool, steps: int, rng: np.random.Generator
) -> None:
    x0, w, b = _data(rng, xs, ws, bias)
    weights = {"weight": w} if b is None else {"weight": w, "bias": b}
    xs_t = jnp.asarray(rng.normal(size=(steps, *xs)))
    eqn = _eqn(x0, w, b)
    p, params = eqn.primitive, eqn.params
    rules = etp.require_rules(p)
    y_shape = eqn.outvars[0].aval.shape
    a = jnp.broadcast_to(jnp.asarray(rng.uniform(0.4, 0.95, size=y_shape[-1])), y_shape)
    c = jnp.broadcast_to(jnp.asarray(rng.uniform(0.2, 1.0, size=y_shape[-1])), y_shape)
    r = jnp.asarray(rng.normal(size=y_shape))
    layout = etp.trainable_invars(p, params)
    init = rules["init_drtrl"](eqn.invars[0], eqn.outvars[0], {k: eqn.invars[i] for k, i in layout.items()}, 1)
    assert init["weight"].shape == (*xs[:-1], *ws, 1)
    trace = {k: v[..., 0] for k, v in init.items()}
    grads = {k: jnp.zeros_like(v) for k, v in weights.items()}
    h = jnp.zeros(y_shape)
    for t in range(steps):
        h = a * h + c * etp.grouped_matmul(xs_t[t], w, b)
        trace = rules["yw_to_w"](a, trace, **params)
        seed = etp.drtrl_seed(p, xs_t[t], c, weights, params)
        trace = {k: trace[k] + seed[k] for k in trace}
        step = etp.drtrl_grad(p, xs_t[t], r * jnp.cos(h), trace, weights, params)
        grads = {k: grads[k] + step[k] for k in grads}

    def loss(wts: dict[str, Array]) -> Array:
        h, total = jnp.zeros(y_shape), jnp.zeros(())
        for t in range(steps):
            h = a * h + c * _plain(xs_t[t], wts["weight"], wts.get("bias"))
            total = total + jnp.sum(r * jnp.sin(h))
        return total

    want = jax.grad(loss)(weights)
    for key in want:
        assert float(jnp.max(jnp.abs(grads[key] - want[key])) / jnp.max(jnp.abs(want[key]))) < 1e-10, key


def test_xy_to_dw_is_the_vjp(rng: np.random.Generator) -> None:
    x, w, b = _data(rng, (3, 6), (2, 3, 4), True)
    eqn = _eqn(x, w, b)
    cot = jnp.asarray(rng.normal(size=(3, 8)))
    got = etp.ETP_RULES_XY_TO_DW[eqn.primitive](x, cot, {"weight": w, "bias": b}, **eqn.params)
    _, pull = jax.vjp(lambda w, b: _plain(x, w, b), w, b)
    want = pull(cot)
    np.testing.assert_allclose(got["weight"], want[0], rtol=1e-12)
    np.testing.assert_allclose(got["bias"], want[1], rtol=1e-12)


def test_errors_units_and_transforms(rng: np.random.Generator) -> None:
    x, w, b = _data(rng, (3, 6), (2, 3, 4), True)
    with pytest.raises(ValueError, match=r"grouped_matmul \(etp_grouped_mm\): x has 5 input features .* 2 \* 3 = 6"):
        etp.grouped_matmul(jnp.ones((3, 5)), w)
    with pytest.raises(ValueError, match=r"weight must have shape \(groups, in_features // groups"):
        etp.grouped_matmul(x, jnp.ones((6, 8)))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        etp.grouped_matmul(x, w, jnp.ones(4))
    with pytest.raises(TypeError, match="bias_fn was given but bias is None"):
        etp.grouped_matmul(x, w, bias_fn=jnp.abs)
    y = etp.grouped_matmul(x * u.volt, w * u.siemens, b * u.amp)
    assert u.get_unit(y) == u.amp
    np.testing.assert_allclose(u.get_mantissa(y), _plain(x, w, b), rtol=1e-13)
    np.testing.assert_allclose(etp.grouped_matmul(x, w, b, weight_fn=jnp.abs, bias_fn=jnp.abs),
                               _plain(x, jnp.abs(w), jnp.abs(b)), rtol=1e-13)  # fmt: skip
