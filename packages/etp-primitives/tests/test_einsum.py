"""etp.einsum against jnp.einsum (forward, jit, vmap, VJP) and its D-RTRL rules against BPTT.

Every equation of :data:`EQUATIONS` is checked: the result and the VJP (with respect to ``x`` and the
weight) equal those of ``jnp.einsum``; under ``vmap`` over ``x`` the marker stays and the result is
unchanged; ``xy_to_dw`` is the VJP of ``jnp.einsum`` with respect to the weight; and D-RTRL run from the
primitive's rules on a leaky integrator with one leak per output element,
``h^t = a * h^{t-1} + c * y^t``, equals ``jax.grad`` through the unrolled loop (float64).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp_primitives as etp

Array = jax.Array

#: (equation, x shape, weight shape): batched and unbatched, shared (group) subscripts, summed-over-x and
#: summed-over-weight subscripts, a transposed x, an ellipsis, an implicit output, a diagonal of x,
#: a scalar output per sample and an outer product.
EQUATIONS = [
    ("bi,io->bo", (3, 4), (4, 5)),
    ("i,io->o", (4,), (4, 5)),
    ("bgi,gio->bgo", (3, 2, 4), (2, 4, 5)),
    ("ib,io->ob", (4, 3), (4, 5)),
    ("...i,io->...o", (2, 3, 4), (4, 5)),
    ("bi,io", (3, 4), (4, 5)),
    ("bti,i->bt", (2, 3, 4), (4,)),
    ("bi,ij->b", (3, 4), (4, 6)),
    ("bik,io->bo", (3, 4, 2), (4, 5)),
    ("bii,io->bo", (2, 4, 4), (4, 5)),
    ("b,o->bo", (3,), (5,)),
    ("bi,oi->ob", (3, 4), (5, 4)),
]
IDS = [e for e, _, _ in EQUATIONS]


def _data(rng: np.random.Generator, xs: tuple[int, ...], ws: tuple[int, ...]) -> tuple[Array, Array]:
    return jnp.asarray(rng.normal(size=xs)), jnp.asarray(rng.normal(size=ws))


def _eqn(equation: str, x: Array, w: Array) -> Any:
    eqns = [e for e in jax.make_jaxpr(lambda x, w: etp.einsum(equation, x, w))(x, w).jaxpr.eqns]
    marked = [e for e in eqns if e.primitive is etp.etp_einsum_p]
    assert len(marked) == 1
    return marked[0]


@pytest.mark.parametrize(("equation", "xs", "ws"), EQUATIONS, ids=IDS)
def test_forward_jit_and_vjp_equal_jnp_einsum(
    equation: str, xs: tuple[int, ...], ws: tuple[int, ...], rng: np.random.Generator
) -> None:
    x, w = _data(rng, xs, ws)
    want = jnp.einsum(equation, x, w)
    np.testing.assert_allclose(etp.einsum(equation, x, w), want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(jax.jit(lambda x, w: etp.einsum(equation, x, w))(x, w), want, rtol=1e-13, atol=1e-13)
    cot = jnp.asarray(rng.normal(size=want.shape))
    _, pull = jax.vjp(lambda x, w: etp.einsum(equation, x, w), x, w)
    _, pull_ref = jax.vjp(lambda x, w: jnp.einsum(equation, x, w), x, w)
    for got, ref in zip(pull(cot), pull_ref(cot), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("equation", "xs", "ws"), EQUATIONS[:6], ids=IDS[:6])
def test_vmap_over_x_keeps_the_marker(
    equation: str, xs: tuple[int, ...], ws: tuple[int, ...], rng: np.random.Generator
) -> None:
    x, w = _data(rng, (2, *xs), ws)
    mapped = jax.vmap(lambda xi: etp.einsum(equation, xi, w))
    want = jnp.stack([jnp.einsum(equation, xi, w) for xi in x])
    np.testing.assert_allclose(mapped(x), want, rtol=1e-13, atol=1e-13)
    eqns = jax.make_jaxpr(mapped)(x).jaxpr.eqns
    assert sum(e.primitive is etp.etp_einsum_p for e in eqns) == 1
    # a vmap over the weight falls back to the plain einsum, still correct
    ws_batch = jnp.stack([w, 2 * w])
    np.testing.assert_allclose(
        jax.vmap(lambda wi: etp.einsum(equation, x[0], wi))(ws_batch),
        jnp.stack([jnp.einsum(equation, x[0], wi) for wi in ws_batch]),
        rtol=1e-13,
        atol=1e-13,
    )


@pytest.mark.parametrize(("equation", "xs", "ws"), EQUATIONS, ids=IDS)
def test_xy_to_dw_is_the_weight_vjp(
    equation: str, xs: tuple[int, ...], ws: tuple[int, ...], rng: np.random.Generator
) -> None:
    x, w = _data(rng, xs, ws)
    eqn = _eqn(equation, x, w)
    cot = jnp.asarray(rng.normal(size=eqn.outvars[0].aval.shape))
    x_bound = _bound_x(equation, x, w)
    assert tuple(eqn.invars[0].aval.shape) == tuple(x_bound.shape)
    got = etp.ETP_RULES_XY_TO_DW[etp.etp_einsum_p](x_bound, cot, {"weight": w}, **eqn.params)["weight"]
    _, pull = jax.vjp(lambda w: jnp.einsum(equation, x, w), w)
    np.testing.assert_allclose(got, pull(cot)[0], rtol=1e-12, atol=1e-12)


def _bound_x(equation: str, x: Array, w: Array) -> Array:
    """The marked equation's x as documented: the output's batch axes in output order, the shared axes flattened."""
    lay = etp.einsum_layout(equation, x.ndim, w.ndim)
    moved = jnp.einsum(f"{lay.x}->{lay.batch}{lay.shared}", x)
    return moved.reshape((*moved.shape[: len(lay.batch)], -1 if lay.shared else 1))


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize(("equation", "xs", "ws"), EQUATIONS, ids=IDS)
def test_drtrl_rules_are_exact_on_a_leaky_integrator(
    equation: str, xs: tuple[int, ...], ws: tuple[int, ...], steps: int, rng: np.random.Generator
) -> None:
    x0, w = _data(rng, xs, ws)
    xs_t = jnp.asarray(rng.normal(size=(steps, *xs)))
    eqn = _eqn(equation, x0, w)
    p, params = eqn.primitive, eqn.params
    rules = etp.require_rules(p)
    y_shape = eqn.outvars[0].aval.shape
    a = jnp.asarray(rng.uniform(0.4, 0.95, size=y_shape))  # one leak per output element
    c = jnp.asarray(rng.uniform(0.2, 1.0, size=y_shape))
    r = jnp.asarray(rng.normal(size=y_shape))
    trace = {
        k: v[..., 0]
        for k, v in rules["init_drtrl"](eqn.invars[0], eqn.outvars[0], {"weight": eqn.invars[1]}, 1).items()
    }
    grad = jnp.zeros_like(w)
    h = jnp.zeros(y_shape)
    for t in range(steps):
        xb = _bound_x(equation, xs_t[t], w)
        h = a * h + c * etp.einsum(equation, xs_t[t], w)
        trace = rules["yw_to_w"](a, trace, **params)
        seed = etp.drtrl_seed(p, xb, c, {"weight": w}, params)
        trace = {"weight": trace["weight"] + seed["weight"]}
        grad = grad + etp.drtrl_grad(p, xb, r * jnp.cos(h), trace, {"weight": w}, params)["weight"]

    def loss(w: Array) -> Array:
        h, total = jnp.zeros(y_shape), jnp.zeros(())
        for t in range(steps):
            h = a * h + c * jnp.einsum(equation, xs_t[t], w)
            total = total + jnp.sum(r * jnp.sin(h))
        return total

    want = jax.grad(loss)(w)
    assert grad.dtype == jnp.float64
    assert float(jnp.max(jnp.abs(grad - want)) / jnp.max(jnp.abs(want))) < 1e-10


def test_the_trace_layout_follows_the_equation(rng: np.random.Generator) -> None:
    """Batch subscripts (in x and y, not the weight) in front, in output order, then the weight's axes."""
    x, w = _data(rng, (4, 3, 2), (4, 5))  # 'itb,io->bto': batch t and b
    eqn = _eqn("itb,io->bto", x, w)
    init = etp.ETP_RULES_INIT_DRTRL[etp.etp_einsum_p](eqn.invars[0], eqn.outvars[0], {"weight": eqn.invars[1]}, 2)
    assert init["weight"].shape == (2, 3, 4, 5, 2)
    layout = etp.einsum_layout("itb,io->bto", 3, 2)
    assert (layout.batch, layout.shared, layout.weight_only, layout.trace) == ("bt", "i", "", "btio")
    assert etp.einsum_layout("...i,io", 3, 2).equation == "abi,io->abo"


@pytest.mark.parametrize(
    ("equation", "xs", "ws", "match"),
    [
        ("bi,ii->bi", (3, 4), (4, 4), r"cannot trace the equation 'bi,ii->bi': the subscript\(s\) \['i'\] repeat"),
        ("b...,...o->bo", (3, 4), (4, 5), r"cannot trace the equation 'b...,...o->bo': an ellipsis in the weight"),
        ("bi,io,o->bo", (3, 4), (4, 5), r"cannot trace the equation 'bi,io,o->bo': it has 3 operand\(s\)"),
        ("bi->bi", (3, 4), (4, 5), r"cannot trace the equation 'bi->bi': it has 1 operand\(s\)"),
        ("bi,io->bz", (3, 4), (4, 5), r"invalid equation 'bi,io->bz': output subscript\(s\) \['z'\] are in no operand"),
        ("bi,io->bo", (3, 4, 1), (4, 5), r"names 2 axes of x, but x has 3"),
        ("bi,io->bo", (3, 4), (4, 5, 1), r"names 2 axes of the weight, but it has 3"),
        ("bi,io->bo", (3, 4), (6, 5), r"subscript 'i' of the equation 'bi,io->bo' has size 4 in one place and 6"),
        ("b1,io->bo", (3, 4), (4, 5), r"invalid equation 'b1,io->bo': subscripts must be letters"),
    ],
)
def test_bad_equations_are_named(
    equation: str, xs: tuple[int, ...], ws: tuple[int, ...], match: str, rng: np.random.Generator
) -> None:
    x, w = _data(rng, xs, ws)
    with pytest.raises(ValueError, match=match):
        etp.einsum(equation, x, w)


def test_equation_type_units_and_weight_fn(rng: np.random.Generator) -> None:
    x, w = _data(rng, (3, 4), (4, 5))
    with pytest.raises(TypeError, match=r"einsum \(etp_einsum\): equation must be a str"):
        etp.einsum(3, x, w)  # type: ignore[arg-type]
    y = etp.einsum("bi,io->bo", x * u.volt, w * u.siemens)
    assert u.get_unit(y) == u.amp
    np.testing.assert_allclose(u.get_mantissa(y), x @ w, rtol=1e-13)
    np.testing.assert_allclose(etp.einsum("bi,io->bo", x, w, weight_fn=jnp.abs), x @ jnp.abs(w), rtol=1e-13)
    dw = jax.grad(lambda w: jnp.sum(etp.einsum("bi,io->bo", x, w, weight_fn=jnp.tanh) ** 2))(w)
    np.testing.assert_allclose(dw, jax.grad(lambda w: jnp.sum((x @ jnp.tanh(w)) ** 2))(w), rtol=1e-12)
    with pytest.raises(TypeError, match="weight_fn must be callable"):
        etp.einsum("bi,io->bo", x, w, weight_fn=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("equation", "xs", "ws"), EQUATIONS, ids=IDS)
def test_es_drtrl_rule_is_exact_at_one_step(
    equation: str, xs: tuple[int, ...], ws: tuple[int, ...], rng: np.random.Generator
) -> None:
    """ES-D-RTRL after a reset: eps_x = x (the bound x), eps_f = (1 - a) D_f, corrected by 1 / (1 - a)."""
    x, w = _data(rng, xs, ws)
    eqn = _eqn(equation, x, w)
    y_shape = eqn.outvars[0].aval.shape
    c, r, decay = jnp.asarray(rng.uniform(0.2, 1.0, size=y_shape)), jnp.asarray(rng.normal(size=y_shape)), 0.6
    eps_f = etp.ETP_RULES_INIT_PP[etp.etp_einsum_p](eqn.invars[0], eqn.outvars[0], {}, 1)[..., 0]
    assert eps_f.shape == y_shape
    eps_f = decay * eps_f + (1 - decay) * c
    g = r * jnp.cos(c * jnp.einsum(equation, x, w))
    rule = etp.ETP_RULES_XY_TO_DW[etp.etp_einsum_p]
    got = rule(_bound_x(equation, x, w), g * eps_f, {"weight": w}, **eqn.params)["weight"] / (1 - decay)
    want = jax.grad(lambda w: jnp.sum(r * jnp.sin(c * jnp.einsum(equation, x, w))))(w)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
