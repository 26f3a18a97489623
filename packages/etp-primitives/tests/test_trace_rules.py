"""The D-RTRL and ES-D-RTRL rules of every built-in, against BPTT.

Each test drives hidden states with one ETP op and a leaky integrator,

    h^t = a * h^{t-1} + c * y^t,   y^t = op(x^t, W),   L = sum_t sum(r * sin(h^t)),

and compares the gradient assembled online from the primitive's rules with
``jax.grad`` through the unrolled loop (BPTT). With a per-unit leak for
mm/mv/elemwise/sparse and a leak uniform over units for conv and LoRA the
online gradient must be exact (float64, relative error < 1e-10).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit.sparse as ss

import etp_primitives as etp

Array = jax.Array


def _eqn_of(fn: Callable[..., Any], *args: Any) -> Any:
    eqns = [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if etp.is_etp_primitive(e.primitive)]
    assert len(eqns) == 1, eqns
    return eqns[0]


class Case:
    """One ETP op with weights, a random input stream and its leak structure."""

    def __init__(
        self, name: str, op: Callable[..., Array], weights: dict[str, Array], xs: Array | None, uniform_leak: bool
    ):
        self.name, self.op, self.weights, self.xs, self.uniform_leak = name, op, weights, xs, uniform_leak


def _cases(rng: np.random.Generator) -> list[Case]:
    def normal(*shape: int) -> Array:
        return jnp.asarray(rng.normal(size=shape))

    T, B, I, O = 16, 3, 4, 5
    dense = np.where(rng.uniform(size=(I, O)) < 0.5, rng.normal(size=(I, O)), 0.0)
    csr = ss.CSR.fromdense(jnp.asarray(dense))
    coo = ss.COO.fromdense(jnp.asarray(dense))
    conv1 = dict(strides=(1,), padding="SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    conv2 = dict(strides=(2, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return [
        Case(
            "mm+bias",
            lambda x, w: etp.matmul(x, w["weight"], w["bias"]),
            {"weight": normal(I, O), "bias": normal(O)},
            normal(T, B, I),
            False,
        ),
        Case("mm-3d", lambda x, w: etp.matmul(x, w["weight"]), {"weight": normal(I, O)}, normal(T, 2, B, I), False),
        Case(
            "mv+bias",
            lambda x, w: etp.matmul(x, w["weight"], w["bias"]),
            {"weight": normal(I, O), "bias": normal(O)},
            normal(T, I),
            False,
        ),
        Case("elemwise", lambda x, w: etp.element_wise(w["weight"]), {"weight": normal(O)}, None, False),
        Case(
            "sp_mm-csr+bias",
            lambda x, w: etp.sparse_matmul(x, w["weight"], sparse_mat=csr, bias=w["bias"]),
            {"weight": normal(csr.nse), "bias": normal(O)},
            normal(T, B, I),
            False,
        ),
        Case(
            "sp_mv-coo",
            lambda x, w: etp.sparse_matmul(x, w["weight"], sparse_mat=coo),
            {"weight": normal(coo.nse)},
            normal(T, I),
            False,
        ),
        Case(
            "conv1d+bias",
            lambda x, w: etp.conv(x, w["weight"], w["bias"], **conv1),
            {"weight": normal(3, 2, 4), "bias": normal(4)},
            normal(T, B, 7, 2),
            True,
        ),
        Case(
            "conv2d+bias",
            lambda x, w: etp.conv(x, w["weight"], w["bias"], **conv2),
            {"weight": normal(2, 2, 2, 3), "bias": normal(3)},
            normal(T, B, 6, 5, 2),
            True,
        ),
        Case(
            "lora_mm+bias",
            lambda x, w: etp.lora_matmul(x, w["lora_b"], w["lora_a"], alpha=0.7, bias=w["bias"]),
            {"lora_b": normal(I, 2), "lora_a": normal(2, O), "bias": normal(O)},
            normal(T, B, I),
            True,
        ),
        Case(
            "lora_mv",
            lambda x, w: etp.lora_matmul(x, w["lora_b"], w["lora_a"]),
            {"lora_b": normal(I, 2), "lora_a": normal(2, O)},
            normal(T, I),
            True,
        ),
    ]


CASE_NAMES = [c.name for c in _cases(np.random.default_rng(0))]


def _case(name: str, rng: np.random.Generator) -> Case:
    return next(c for c in _cases(rng) if c.name == name)


def _leak(case: Case, y_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[Array, Array]:
    """(a, c) broadcast to y's shape: per-unit (last axis) or uniform."""
    if case.uniform_leak:
        return jnp.full(y_shape, 0.8), jnp.full(y_shape, 0.3)
    a = jnp.asarray(rng.uniform(0.5, 0.95, size=y_shape[-1]))
    c = jnp.asarray(rng.uniform(0.1, 1.0, size=y_shape[-1]))
    return jnp.broadcast_to(a, y_shape), jnp.broadcast_to(c, y_shape)


def _x_at(case: Case, t: int) -> Array | None:
    return None if case.xs is None else case.xs[t]


def _bptt_grad(case: Case, a: Array, c: Array, r: Array, steps: int) -> dict[str, Array]:
    def loss(weights: dict[str, Array]) -> Array:
        h = jnp.zeros_like(a)
        total = jnp.zeros(())
        for t in range(steps):
            h = a * h + c * case.op(_x_at(case, t), weights)
            total = total + jnp.sum(r * jnp.sin(h))
        return total

    return jax.grad(loss)(case.weights)


def _relative_error(got: Array, want: Array) -> float:
    return float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-300))


@pytest.mark.parametrize("steps", [1, 4, 16])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_drtrl_rules_are_exact_on_leaky_integrators(name: str, steps: int, rng: np.random.Generator) -> None:
    case = _case(name, rng)
    eqn = _eqn_of(case.op, _x_at(case, 0), case.weights)
    primitive, params = eqn.primitive, eqn.params
    rules = etp.require_rules(primitive)
    x_index = etp.ETP_X_INVAR_INDICES[primitive]
    x_var = None if x_index is None else eqn.invars[x_index]
    layout = etp.trainable_invars(primitive, params)
    weight_vars = {key: eqn.invars[i] for key, i in layout.items()}
    y_shape = eqn.outvars[0].aval.shape
    a, c = _leak(case, y_shape, rng)
    r = jnp.asarray(rng.normal(size=y_shape))

    trace = {k: v[..., 0] for k, v in rules["init_drtrl"](x_var, eqn.outvars[0], weight_vars, 1).items()}
    grads = {k: jnp.zeros_like(v) for k, v in case.weights.items()}
    h = jnp.zeros(y_shape)
    for t in range(steps):
        x_t = _x_at(case, t)
        h = a * h + c * case.op(x_t, case.weights)
        trace = rules["yw_to_w"](a, trace, **params)
        seed = etp.drtrl_seed(primitive, x_t, c, case.weights, params)
        trace = {k: trace[k] + seed[k] for k in trace}
        g = r * jnp.cos(h)
        step = etp.drtrl_grad(primitive, x_t, g, trace, case.weights, params)
        grads = {k: grads[k] + step[k] for k in grads}

    want = _bptt_grad(case, a, c, r, steps)
    assert set(grads) == set(want)
    for key in want:
        assert grads[key].dtype == jnp.float64
        assert _relative_error(grads[key], want[key]) < 1e-10, (key, grads[key], want[key])


def test_drtrl_two_state_neuron_is_exact(rng: np.random.Generator) -> None:
    """Two hidden states per unit (v, w), mixed by a per-unit 2x2 block, driven by etp_mm."""
    T, B, I, O = 12, 2, 3, 4
    weights = {"weight": jnp.asarray(rng.normal(size=(I, O))), "bias": jnp.asarray(rng.normal(size=O))}
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    # D[o] = [[a_vv, a_vw], [a_wv, a_ww]] per unit; y drives v only.
    D = jnp.asarray(rng.uniform(-0.4, 0.9, size=(O, 2, 2)))
    Df = jnp.stack([jnp.asarray(rng.uniform(0.2, 1.0, size=O)), jnp.zeros(O)], axis=-1)  # (O, 2)
    r = jnp.asarray(rng.normal(size=(B, O, 2)))

    def step(h: Array, x: Array, w: dict[str, Array]) -> Array:
        y = etp.matmul(x, w["weight"], w["bias"])
        return jnp.einsum("ost,bot->bos", D, h) + Df[None] * y[..., None]

    def loss(w: dict[str, Array]) -> Array:
        h, total = jnp.zeros((B, O, 2)), jnp.zeros(())
        for t in range(T):
            h = step(h, xs[t], w)
            total = total + jnp.sum(r * jnp.sin(h))
        return total

    eqn = _eqn_of(lambda x, w: etp.matmul(x, w["weight"], w["bias"]), xs[0], weights)
    p, params = eqn.primitive, eqn.params
    rules = etp.require_rules(p)
    traces = rules["init_drtrl"](eqn.invars[0], eqn.outvars[0], {"weight": eqn.invars[1], "bias": eqn.invars[2]}, 2)
    state = [{k: v[..., s] for k, v in traces.items()} for s in range(2)]
    grads = {k: jnp.zeros_like(v) for k, v in weights.items()}
    h = jnp.zeros((B, O, 2))
    for t in range(T):
        h = step(h, xs[t], weights)
        new_state = []
        for s in range(2):
            mixed = {k: jnp.zeros_like(v) for k, v in state[s].items()}
            for s2 in range(2):
                part = rules["yw_to_w"](jnp.broadcast_to(D[:, s, s2], (B, O)), state[s2], **params)
                mixed = {k: mixed[k] + part[k] for k in mixed}
            seed = etp.drtrl_seed(p, xs[t], jnp.broadcast_to(Df[:, s], (B, O)), weights, params)
            new_state.append({k: mixed[k] + seed[k] for k in mixed})
        state = new_state
        g = r * jnp.cos(h)
        for s in range(2):
            part = etp.drtrl_grad(p, xs[t], g[..., s], state[s], weights, params)
            grads = {k: grads[k] + part[k] for k in grads}
    want = jax.grad(loss)(weights)
    for key in want:
        assert _relative_error(grads[key], want[key]) < 1e-10


@pytest.mark.parametrize("name", CASE_NAMES)
def test_es_drtrl_rule_is_exact_at_one_step(name: str, rng: np.random.Generator) -> None:
    """ES-D-RTRL after a reset: eps_x = x, eps_f = (1 - a) D_f, bias correction 1 - a; exact at T = 1."""
    case = _case(name, rng)
    eqn = _eqn_of(case.op, _x_at(case, 0), case.weights)
    primitive, params = eqn.primitive, eqn.params
    rules = etp.require_rules(primitive)
    y_shape = eqn.outvars[0].aval.shape
    a_leak, c = _leak(case, y_shape, rng)
    r = jnp.asarray(rng.normal(size=y_shape))
    decay = 0.6
    x_var = None if etp.ETP_X_INVAR_INDICES[primitive] is None else eqn.invars[0]
    eps_f = rules["init_pp"](x_var, eqn.outvars[0], {}, 1)[..., 0]
    assert eps_f.shape == y_shape
    x0 = _x_at(case, 0)
    eps_x = None if x0 is None else decay * jnp.zeros_like(x0) + x0
    eps_f = decay * a_leak * eps_f + (1 - decay) * c
    h = c * case.op(x0, case.weights)
    g = r * jnp.cos(h)
    got = rules["xy_to_dw"](eps_x, g * eps_f, case.weights, **params)
    got = {k: v / (1 - decay) for k, v in got.items()}
    want = _bptt_grad(case, a_leak, c, r, 1)
    for key in want:
        assert _relative_error(got[key], want[key]) < 1e-10


@pytest.mark.parametrize("name", ["mm+bias", "mv+bias", "sp_mm-csr+bias", "sp_mv-coo", "lora_mm+bias", "lora_mv"])
def test_explicit_seed_of_weight_shaped_keys_equals_per_sample_vjp(name: str, rng: np.random.Generator) -> None:
    """For keys stored in the weight-shaped layout, the seed is the per-sample VJP of the op."""
    case = _case(name, rng)
    x = _x_at(case, 0)
    assert x is not None
    eqn = _eqn_of(case.op, x, case.weights)
    seed = etp.drtrl_seed(
        eqn.primitive, x, jnp.asarray(rng.normal(size=eqn.outvars[0].aval.shape)), case.weights, eqn.params
    )
    d = jnp.asarray(rng.normal(size=eqn.outvars[0].aval.shape))
    seed = etp.drtrl_seed(eqn.primitive, x, d, case.weights, eqn.params)
    weight_shaped = [k for k in case.weights if k != "lora_b"]

    def per_sample(x_b: Array, d_b: Array) -> dict[str, Array]:
        _, pullback = jax.vjp(
            lambda w: case.op(x_b, {**case.weights, **w}), {k: case.weights[k] for k in weight_shaped}
        )
        return dict(pullback(d_b)[0])

    lead = x.ndim - 1
    fn = per_sample
    for _ in range(lead):
        fn = jax.vmap(fn)
    want = fn(x, d)
    for key in weight_shaped:
        np.testing.assert_allclose(seed[key], want[key], rtol=1e-12, atol=1e-12)


def test_default_seed_and_grad_for_a_custom_primitive_are_exact(rng: np.random.Generator) -> None:
    """A custom primitive with only the four rules gets exact D-RTRL from the derived seed/grad."""

    def impl(x: Array, w: Array, *, scale: float = 1.0) -> Array:
        return scale * (x @ w)

    name = "etp_test_trace_rules_scaled_mm"
    p = etp.register_primitive(name, impl, batched=True)
    try:
        p.register_etp_rules(
            yw_to_w=lambda hd, tr, **kw: {"weight": tr["weight"] * hd[..., None, :]},
            xy_to_dw=etp.derive_xy_to_dw(impl, etp.default_trainable_invars, 0),
            init_drtrl=lambda xv, yv, wv, n: {"weight": jnp.zeros((xv.aval.shape[0], *wv["weight"].aval.shape, n))},
            init_pp=etp.init_pp_like_output,
        )
        T, B, I, O = 10, 3, 4, 5
        w = jnp.asarray(rng.normal(size=(I, O)))
        xs = jnp.asarray(rng.normal(size=(T, B, I)))
        a = jnp.broadcast_to(jnp.asarray(rng.uniform(0.5, 0.9, size=O)), (B, O))
        r = jnp.asarray(rng.normal(size=(B, O)))

        def loss(w_: Array) -> Array:
            h, total = jnp.zeros((B, O)), jnp.zeros(())
            for t in range(T):
                h = a * h + p.bind(xs[t], w_, scale=2.0)
                total = total + jnp.sum(r * jnp.sin(h))
            return total

        params = {"scale": 2.0}
        trace = {"weight": jnp.zeros((B, I, O))}
        grad = jnp.zeros_like(w)
        h = jnp.zeros((B, O))
        for t in range(T):
            h = a * h + p.bind(xs[t], w, scale=2.0)
            trace = etp.ETP_RULES_YW_TO_W[p](a, trace, **params)
            seed = etp.drtrl_seed(p, xs[t], jnp.ones((B, O)), {"weight": w}, params)
            trace = {"weight": trace["weight"] + seed["weight"]}
            grad = grad + etp.drtrl_grad(p, xs[t], r * jnp.cos(h), trace, {"weight": w}, params)["weight"]
        assert _relative_error(grad, jax.grad(loss)(w)) < 1e-10
    finally:
        etp.unregister_primitive(name)


def test_conv_weight_trace_is_an_approximation_when_the_leak_varies_over_units(rng: np.random.Generator) -> None:
    """The filtered-input layout is exact only for a uniform leak: with a per-channel leak it must differ."""
    case = _case("conv1d+bias", rng)
    eqn = _eqn_of(case.op, _x_at(case, 0), case.weights)
    p, params = eqn.primitive, eqn.params
    rules = etp.require_rules(p)
    y_shape = eqn.outvars[0].aval.shape
    a = jnp.broadcast_to(jnp.asarray([0.2, 0.5, 0.8, 0.95]), y_shape)
    c = jnp.ones(y_shape)
    r = jnp.asarray(rng.normal(size=y_shape))
    trace = {
        k: v[..., 0]
        for k, v in rules["init_drtrl"](
            eqn.invars[0], eqn.outvars[0], {"weight": eqn.invars[1], "bias": eqn.invars[2]}, 1
        ).items()
    }
    grads = {k: jnp.zeros_like(v) for k, v in case.weights.items()}
    h = jnp.zeros(y_shape)
    for t in range(8):
        h = a * h + c * case.op(case.xs[t], case.weights)  # type: ignore[index]
        trace = rules["yw_to_w"](a, trace, **params)
        seed = etp.drtrl_seed(p, case.xs[t], c, case.weights, params)  # type: ignore[index]
        trace = {k: trace[k] + seed[k] for k in trace}
        step = etp.drtrl_grad(p, case.xs[t], r * jnp.cos(h), trace, case.weights, params)  # type: ignore[index]
        grads = {k: grads[k] + step[k] for k in grads}
    want = _bptt_grad(case, a, c, r, 8)
    assert _relative_error(grads["weight"], want["weight"]) > 1e-3
    # The bias trace is y-shaped and stays exact for any position-wise leak.
    assert _relative_error(grads["bias"], want["bias"]) < 1e-10


@pytest.mark.parametrize("count", [1, 2, 5, 8])
def test_pairwise_sum_equals_the_plain_sum(count: int, rng: np.random.Generator) -> None:
    terms = [{"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))} for _ in range(count)]
    got = etp.pairwise_sum(terms)
    for key in ("w", "b"):
        np.testing.assert_allclose(got[key], sum(np.asarray(t[key]) for t in terms), rtol=1e-13)
    with pytest.raises(ValueError, match="at least one term"):
        etp.pairwise_sum([])


@pytest.mark.parametrize(
    ("shape", "kept"), [((5, 3, 4), 2), ((2, 3, 4, 6), 2), ((7, 4), 1), ((3, 4), 2), ((200, 3), 1)]
)
def test_sum_leading_axes_equals_numpy(shape: tuple[int, ...], kept: int, rng: np.random.Generator) -> None:
    value = rng.normal(size=shape)
    lead = tuple(range(len(shape) - kept))
    want = value.sum(axis=lead) if lead else value
    got = jax.jit(lambda v: etp.sum_leading_axes(v, kept))(jnp.asarray(value))
    assert got.shape == shape[len(shape) - kept :]
    np.testing.assert_allclose(got, want, rtol=1e-12)
