"""Registering ETP primitives: class style, spec style, the built-ins, and the failure modes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_primitives as etp
from etp_primitives._compat import Primitive

RULE_TABLES = {
    "yw_to_w": etp.ETP_RULES_YW_TO_W,
    "xy_to_dw": etp.ETP_RULES_XY_TO_DW,
    "init_drtrl": etp.ETP_RULES_INIT_DRTRL,
    "init_pp": etp.ETP_RULES_INIT_PP,
    "drtrl_seed": etp.ETP_RULES_DRTRL_SEED,
    "drtrl_grad": etp.ETP_RULES_DRTRL_GRAD,
}
ALL_SETS = {
    "ETP_PRIMITIVES": etp.ETP_PRIMITIVES,
    "BATCHED_PRIMITIVES": etp.BATCHED_PRIMITIVES,
    "GRADIENT_ENABLED_PRIMITIVES": etp.GRADIENT_ENABLED_PRIMITIVES,
}
ALL_TABLES = {
    "ETP_RULES_YW_TO_W": etp.ETP_RULES_YW_TO_W,
    "ETP_RULES_XY_TO_DW": etp.ETP_RULES_XY_TO_DW,
    "ETP_RULES_INIT_DRTRL": etp.ETP_RULES_INIT_DRTRL,
    "ETP_RULES_INIT_PP": etp.ETP_RULES_INIT_PP,
    "ETP_RULES_DRTRL_SEED": etp.ETP_RULES_DRTRL_SEED,
    "ETP_RULES_DRTRL_GRAD": etp.ETP_RULES_DRTRL_GRAD,
    "ETP_TRAINABLE_INVARS_FNS": etp.ETP_TRAINABLE_INVARS_FNS,
    "ETP_X_INVAR_INDICES": etp.ETP_X_INVAR_INDICES,
    "ETP_Y_OUTVAR_INDICES": etp.ETP_Y_OUTVAR_INDICES,
    "ETP_PRIMITIVE_SPECS": etp.ETP_PRIMITIVE_SPECS,
}


def _registered_names() -> set[str]:
    return {p.name for p in etp.ETP_PRIMITIVES}


def _registry_sizes() -> dict[str, int]:
    return {k: len(v) for k, v in {**ALL_SETS, **ALL_TABLES}.items()}


def _registries_holding(p: Primitive) -> set[str]:
    return {k for k, v in {**ALL_SETS, **ALL_TABLES}.items() if p in v}


@pytest.fixture
def fresh_name(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Factory of primitive names unique to this test; whatever got registered under them is removed afterwards."""
    base = "etp_test_" + re.sub(r"\W", "_", request.node.name)
    made: list[str] = []

    def make(suffix: str = "p") -> str:
        name = f"{base}_{suffix}"
        made.append(name)
        return name

    yield make
    for name in made:
        if name in _registered_names():
            etp.unregister_primitive(name)


# ------------------------------------------------------- a scaled dense layer


def _scaled_impl(x: jax.Array, w: jax.Array, *bias: jax.Array, scale: float, has_bias: bool) -> jax.Array:
    y = scale * jnp.matmul(x, w)
    if has_bias:
        y = y + jnp.reshape(bias[0], (1,) * (y.ndim - 1) + bias[0].shape)
    return y


def _scaled_ref(x, w, b=None, *, scale):
    y = scale * (x @ w)
    return y if b is None else y + jnp.reshape(b, (1,) * (y.ndim - 1) + b.shape)


def _scaled_layout(params: dict[str, Any]) -> dict[str, int]:
    return {"weight": 1, **({"bias": 2} if params.get("has_bias") else {})}


def _scaled_yw_to_w(hidden_dim, trace, **params):
    out = {"weight": trace["weight"] * hidden_dim[..., None, :]}
    if "bias" in trace:
        out["bias"] = trace["bias"] * hidden_dim
    return out


def _scaled_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    lead = tuple(etp.aval_of(x_var).shape[:-1])
    return {
        key: jnp.zeros((*lead, *etp.aval_of(var).shape, num_hidden_state), etp.aval_of(var).dtype)
        for key, var in weight_vars.items()
    }


_scaled_xy_to_dw = etp.derive_xy_to_dw(_scaled_impl, _scaled_layout, 0)


@pytest.fixture
def scaled_p(fresh_name) -> etp.ETPPrimitive:
    """Class-style registration of ``scale * (x @ w) (+ b)``, as the documentation shows it."""
    p = etp.register_primitive(fresh_name("scaled_mm"), _scaled_impl, batched=True, trainable_invars_fn=_scaled_layout)
    p.register_etp_rules(
        yw_to_w=_scaled_yw_to_w,
        xy_to_dw=_scaled_xy_to_dw,
        init_drtrl=_scaled_init_drtrl,
        init_pp=etp.init_pp_like_output,
    )
    return p


@pytest.fixture
def data(rng):
    x = jnp.asarray(rng.normal(size=(4, 3)))
    w = jnp.asarray(rng.normal(size=(3, 5)))
    b = jnp.asarray(rng.normal(size=(5,)))
    return x, w, b


# ---------------------------------------------------------------- class style


def test_class_style_identity(scaled_p):
    name = scaled_p.name
    assert name == "etp_test_test_class_style_identity_scaled_mm"
    assert type(scaled_p) is etp.ETPPrimitive
    assert isinstance(scaled_p, Primitive)
    assert repr(scaled_p) == name
    assert str(scaled_p) == name
    assert scaled_p.multiple_results is False


def test_class_style_is_in_every_registry(scaled_p):
    p = scaled_p
    assert etp.is_etp_primitive(p)
    assert etp.is_batched_primitive(p)
    assert not etp.is_gradient_enabled_primitive(p)
    assert _registries_holding(p) == {
        "ETP_PRIMITIVES",
        "BATCHED_PRIMITIVES",
        "ETP_RULES_YW_TO_W",
        "ETP_RULES_XY_TO_DW",
        "ETP_RULES_INIT_DRTRL",
        "ETP_RULES_INIT_PP",
        "ETP_TRAINABLE_INVARS_FNS",
        "ETP_X_INVAR_INDICES",
        "ETP_Y_OUTVAR_INDICES",
    }
    assert etp.get_primitive_spec(p) is None  # class style: no spec
    assert etp.ETP_RULES_YW_TO_W[p] is _scaled_yw_to_w
    assert etp.ETP_RULES_XY_TO_DW[p] is _scaled_xy_to_dw
    assert etp.ETP_RULES_INIT_DRTRL[p] is _scaled_init_drtrl
    assert etp.ETP_RULES_INIT_PP[p] is etp.init_pp_like_output
    assert etp.ETP_X_INVAR_INDICES[p] == 0
    assert etp.ETP_Y_OUTVAR_INDICES[p] == 0
    rules = etp.require_rules(p)
    assert list(rules) == list(etp.RULE_NAMES)
    assert rules["yw_to_w"] is _scaled_yw_to_w
    assert etp.require_rules(p, "xy_to_dw") == {"xy_to_dw": _scaled_xy_to_dw}
    assert etp.trainable_invars(p, {"has_bias": False, "scale": 2.0}) == {"weight": 1}
    assert etp.trainable_invars(p, {"has_bias": True, "scale": 2.0}) == {"weight": 1, "bias": 2}


def test_class_style_bind_and_jit_match_plain_jax(scaled_p, data):
    x, w, b = data
    y = scaled_p.bind(x, w, scale=2.5, has_bias=False)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, _scaled_ref(x, w, scale=2.5), rtol=1e-12)
    y = scaled_p.bind(x, w, b, scale=-0.5, has_bias=True)
    np.testing.assert_allclose(y, _scaled_ref(x, w, b, scale=-0.5), rtol=1e-12)

    f = jax.jit(lambda x, w, b: scaled_p.bind(x, w, b, scale=2.5, has_bias=True))
    np.testing.assert_allclose(f(x, w, b), _scaled_ref(x, w, b, scale=2.5), rtol=1e-12)
    eqns = jax.make_jaxpr(f)(x, w, b).jaxpr.eqns
    inner = eqns[0].params["jaxpr"].jaxpr.eqns if eqns[0].primitive.name in ("pjit", "jit") else eqns
    assert [e.primitive for e in inner] == [scaled_p]
    assert inner[0].params == {"scale": 2.5, "has_bias": True}


def test_class_style_grad_matches_plain_jax(scaled_p, data):
    x, w, b = data

    def loss(x, w, b):
        return jnp.sum(jnp.sin(scaled_p.bind(x, w, b, scale=1.5, has_bias=True)))

    def ref(x, w, b):
        return jnp.sum(jnp.sin(_scaled_ref(x, w, b, scale=1.5)))

    got = jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
    want = jax.grad(ref, argnums=(0, 1, 2))(x, w, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-12)
    # grad w.r.t. the weight alone, under jit, and the marker survives in the forward pass.
    g_w = jax.jit(jax.grad(loss, argnums=1))(x, w, b)
    np.testing.assert_allclose(g_w, want[1], rtol=1e-12)
    grad_jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=1))(x, w, b)
    assert any(e.primitive is scaled_p for e in grad_jaxpr.jaxpr.eqns)


def test_class_style_vmap_matches_plain_jax(scaled_p, data, rng):
    x, w, b = data
    xs = jnp.asarray(rng.normal(size=(6, 4, 3)))
    ws = jnp.asarray(rng.normal(size=(6, 3, 5)))
    f = lambda x, w: scaled_p.bind(x, w, b, scale=0.75, has_bias=True)  # noqa: E731
    g = lambda x, w: _scaled_ref(x, w, b, scale=0.75)  # noqa: E731
    np.testing.assert_allclose(jax.vmap(f, in_axes=(0, None))(xs, w), jax.vmap(g, in_axes=(0, None))(xs, w), rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(f, in_axes=(None, 0))(x, ws), jax.vmap(g, in_axes=(None, 0))(x, ws), rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(f, in_axes=(1, 0))(xs.transpose(1, 0, 2), ws), jax.vmap(g)(xs, ws), rtol=1e-12)
    # composition: jit(grad(vmap))
    h = jax.jit(jax.grad(lambda w: jnp.sum(jax.vmap(f, in_axes=(0, None))(xs, w) ** 2)))
    r = jax.grad(lambda w: jnp.sum(jax.vmap(g, in_axes=(0, None))(xs, w) ** 2))
    np.testing.assert_allclose(h(w), r(w), rtol=1e-12)


def test_class_style_jvp_matches_plain_jax(scaled_p, data, rng):
    x, w, b = data
    tx, tw, tb = (jnp.asarray(rng.normal(size=a.shape)) for a in (x, w, b))
    f = lambda x, w, b: scaled_p.bind(x, w, b, scale=3.0, has_bias=True)  # noqa: E731
    g = lambda x, w, b: _scaled_ref(x, w, b, scale=3.0)  # noqa: E731
    y, ty = jax.jvp(f, (x, w, b), (tx, tw, tb))
    y_ref, ty_ref = jax.jvp(g, (x, w, b), (tx, tw, tb))
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    np.testing.assert_allclose(ty, ty_ref, rtol=1e-12)
    # only the weight is perturbed (the other tangents are symbolic zeros)
    _, ty_w = jax.jvp(lambda w: f(x, w, b), (w,), (tw,))
    np.testing.assert_allclose(ty_w, 3.0 * (x @ tw), rtol=1e-12)


def test_class_style_rules_are_usable(scaled_p, data, rng):
    x, w, b = data
    params = {"scale": 2.0, "has_bias": True}
    hd = jnp.asarray(rng.normal(size=(4, 5)))
    dw = etp.require_rules(scaled_p)["xy_to_dw"](x, hd, {"weight": w, "bias": b}, **params)
    _, pullback = jax.vjp(lambda w, b: _scaled_ref(x, w, b, scale=2.0), w, b)
    ref_w, ref_b = pullback(hd)
    np.testing.assert_allclose(dw["weight"], ref_w, rtol=1e-12)
    np.testing.assert_allclose(dw["bias"], ref_b, rtol=1e-12)
    # batched and no drtrl_seed rule: the seed is the per-sample xy_to_dw.
    seed = etp.drtrl_seed(scaled_p, x, hd, {"weight": w}, {"scale": 2.0, "has_bias": False})
    np.testing.assert_allclose(seed["weight"], 2.0 * x[:, :, None] * hd[:, None, :], rtol=1e-12)


def test_default_trainable_invars_without_fn(fresh_name):
    p = etp.register_primitive(fresh_name(), lambda x, w: x @ w)
    assert type(p) is etp.ETPPrimitive
    assert etp.ETP_TRAINABLE_INVARS_FNS[p] is etp.default_trainable_invars
    assert etp.trainable_invars(p, {}) == {"weight": 1}
    assert etp.trainable_invars(p, {"has_bias": True}) == {"weight": 1}
    assert etp.ETP_X_INVAR_INDICES[p] == 0
    assert etp.ETP_Y_OUTVAR_INDICES[p] == 0
    assert not etp.is_batched_primitive(p)
    assert not etp.is_gradient_enabled_primitive(p)
    # no rules yet
    for table in RULE_TABLES.values():
        assert p not in table


def test_register_rules_one_by_one(fresh_name):
    p = etp.register_primitive(fresh_name(), lambda x, w: x @ w, batched=True)
    fns = {name: (lambda *a, _n=name, **k: _n) for name in RULE_TABLES}
    for name, fn in fns.items():
        getattr(p, f"register_{name}")(fn)
    for name, table in RULE_TABLES.items():
        assert table[p] is fns[name]
    # re-registering a rule replaces it
    new = lambda *a, **k: "new"  # noqa: E731
    p.register_yw_to_w(new)
    assert etp.ETP_RULES_YW_TO_W[p] is new


# ----------------------------------------------------------------- spec style


def _affine_impl(w: jax.Array, *bias: jax.Array, has_bias: bool = False) -> jax.Array:
    return w + bias[0] if has_bias else jnp.asarray(w)


def _affine_layout(params: dict[str, Any]) -> dict[str, int]:
    return {"weight": 0, **({"bias": 1} if params.get("has_bias") else {})}


def _affine_yw_to_w(hidden_dim, trace, **params):
    return {k: v * hidden_dim for k, v in trace.items()}


def _affine_xy_to_dw(x, hidden_dim, weights, **params):
    return {k: hidden_dim for k in weights}


def _affine_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    return {k: jnp.zeros((*etp.aval_of(v).shape, num_hidden_state)) for k, v in weight_vars.items()}


def _affine_seed(x, hidden_dim, weights, **params):
    return {k: hidden_dim for k in weights}


def _affine_grad(x, cotangent, trace, weights, **params):
    return {k: cotangent * v for k, v in trace.items()}


def _affine_spec(name: str, **overrides: Any) -> etp.ETPPrimitiveSpec:
    fields: dict[str, Any] = dict(
        name=name,
        impl=_affine_impl,
        yw_to_w=_affine_yw_to_w,
        xy_to_dw=_affine_xy_to_dw,
        init_drtrl=_affine_init_drtrl,
        init_pp=etp.init_pp_like_output,
        trainable_invars_fn=_affine_layout,
        x_invar_index=None,
        y_outvar_index=0,
        batched=False,
        gradient_enabled=True,
        drtrl_seed=_affine_seed,
        drtrl_grad=_affine_grad,
    )
    fields.update(overrides)
    return etp.ETPPrimitiveSpec(**fields)


def test_spec_style_registration(fresh_name):
    spec = _affine_spec(fresh_name())
    p = etp.register_primitive_spec(spec)
    assert type(p) is etp.ETPPrimitive
    assert p.name == spec.name and repr(p) == spec.name
    assert etp.get_primitive_spec(p) is spec
    assert etp.ETP_PRIMITIVE_SPECS[p] is spec
    assert _registries_holding(p) == set(ALL_SETS) - {"BATCHED_PRIMITIVES"} | set(ALL_TABLES)
    assert etp.is_gradient_enabled_primitive(p)
    assert p in etp.GRADIENT_ENABLED_PRIMITIVES
    assert not etp.is_batched_primitive(p)
    assert p in etp.ETP_X_INVAR_INDICES and etp.ETP_X_INVAR_INDICES[p] is None
    assert etp.ETP_Y_OUTVAR_INDICES[p] == 0
    for rule in ("yw_to_w", "xy_to_dw", "init_drtrl", "init_pp", "drtrl_seed", "drtrl_grad"):
        assert RULE_TABLES[rule][p] is getattr(spec, rule), rule
    assert etp.ETP_TRAINABLE_INVARS_FNS[p] is _affine_layout
    assert etp.require_rules(p) == {n: getattr(spec, n) for n in etp.RULE_NAMES}
    # the primitive works
    w, b = jnp.arange(3.0), jnp.ones(3)
    np.testing.assert_allclose(p.bind(w, b, has_bias=True), w + b)
    np.testing.assert_allclose(jax.jit(lambda w: p.bind(w, has_bias=False))(w), w)
    np.testing.assert_allclose(jax.grad(lambda w: jnp.sum(p.bind(w, has_bias=False) ** 2))(w), 2 * w)


def test_spec_trainable_layout(fresh_name):
    spec = _affine_spec(fresh_name())
    assert spec.resolve_trainable_invars({"has_bias": False}) == {"weight": 0}
    assert spec.resolve_trainable_invars({"has_bias": True}) == {"weight": 0, "bias": 1}
    assert spec.weight_invar_index == 0
    layout = spec.resolve_trainable_invars({"has_bias": True})
    layout["weight"] = 99  # a fresh dict each call
    assert spec.resolve_trainable_invars({"has_bias": True}) == {"weight": 0, "bias": 1}
    p = etp.register_primitive_spec(spec)
    assert etp.trainable_invars(p, {"has_bias": True}) == {"weight": 0, "bias": 1}

    no_weight = _affine_spec(fresh_name("q"), trainable_invars_fn=lambda params: {"lora_b": 1, "lora_a": 2})
    assert no_weight.weight_invar_index == 1  # first key when there is no 'weight'


def test_spec_is_frozen(fresh_name):
    name = fresh_name()
    spec = _affine_spec(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.batched = True  # type: ignore[misc]
    assert spec.name == name and spec.batched is False


def test_spec_defaults(fresh_name):
    spec = etp.ETPPrimitiveSpec(
        name=fresh_name(),
        impl=lambda x, w: x @ w,
        yw_to_w=_scaled_yw_to_w,
        xy_to_dw=_scaled_xy_to_dw,
        init_drtrl=_scaled_init_drtrl,
        init_pp=etp.init_pp_like_output,
        trainable_invars_fn=lambda params: {"weight": 1},
        x_invar_index=0,
    )
    assert spec.y_outvar_index == 0
    assert spec.batched is False and spec.gradient_enabled is False
    assert spec.drtrl_seed is None and spec.drtrl_grad is None
    p = etp.register_primitive_spec(spec)
    assert p not in etp.BATCHED_PRIMITIVES and p not in etp.GRADIENT_ENABLED_PRIMITIVES
    assert p not in etp.ETP_RULES_DRTRL_SEED and p not in etp.ETP_RULES_DRTRL_GRAD
    etp.require_rules(p)


# ------------------------------------------------------------------ built-ins

LAYOUT_MM = ({"weight": 1}, {"weight": 1, "bias": 2})
LAYOUT_LORA = ({"lora_b": 1, "lora_a": 2}, {"lora_b": 1, "lora_a": 2, "bias": 3})
BUILTINS = [
    # name, primitive, batched, layout without/with bias, x_invar_index, weight_invar_index, has seed/grad rules
    ("etp_mm", etp.etp_mm_p, True, LAYOUT_MM, 0, 1, True),
    ("etp_mv", etp.etp_mv_p, False, LAYOUT_MM, 0, 1, True),
    ("etp_elemwise", etp.etp_elemwise_p, False, ({"weight": 0}, {"weight": 0}), None, 0, False),
    ("etp_conv", etp.etp_conv_p, True, LAYOUT_MM, 0, 1, True),
    ("etp_sp_mm", etp.etp_sp_mm_p, True, LAYOUT_MM, 0, 1, True),
    ("etp_sp_mv", etp.etp_sp_mv_p, False, LAYOUT_MM, 0, 1, True),
    ("etp_lora_mm", etp.etp_lora_mm_p, True, LAYOUT_LORA, 0, 1, True),
    ("etp_lora_mv", etp.etp_lora_mv_p, False, LAYOUT_LORA, 0, 1, True),
]
BUILTIN_PRIMITIVES = {b[1] for b in BUILTINS}


@pytest.mark.parametrize(
    ("name", "p", "batched", "layouts", "x_index", "weight_index", "has_seed_grad"),
    BUILTINS,
    ids=[b[0] for b in BUILTINS],
)
def test_builtin(name, p, batched, layouts, x_index, weight_index, has_seed_grad):
    assert type(p) is etp.ETPPrimitive
    assert p.name == name and repr(p) == name
    assert etp.is_etp_primitive(p)
    assert [q for q in etp.ETP_PRIMITIVES if q.name == name] == [p]
    spec = etp.get_primitive_spec(p)
    assert spec is not None and spec.name == name
    assert isinstance(spec, etp.ETPPrimitiveSpec)
    rules = etp.require_rules(p)
    assert set(rules) == set(etp.RULE_NAMES)
    assert all(callable(r) for r in rules.values())
    assert rules == {n: getattr(spec, n) for n in etp.RULE_NAMES}
    assert etp.is_batched_primitive(p) is batched and spec.batched is batched
    assert etp.is_gradient_enabled_primitive(p) is (name == "etp_elemwise")
    assert spec.gradient_enabled is (name == "etp_elemwise")
    no_bias, with_bias = layouts
    assert etp.trainable_invars(p, {"has_bias": False}) == no_bias
    assert etp.trainable_invars(p, {"has_bias": True}) == with_bias
    assert spec.resolve_trainable_invars({"has_bias": False}) == no_bias
    assert spec.resolve_trainable_invars({"has_bias": True}) == with_bias
    assert spec.weight_invar_index == weight_index
    assert etp.ETP_X_INVAR_INDICES[p] == x_index and spec.x_invar_index == x_index
    assert etp.ETP_Y_OUTVAR_INDICES[p] == 0
    assert (p in etp.ETP_RULES_DRTRL_SEED) is has_seed_grad
    assert (p in etp.ETP_RULES_DRTRL_GRAD) is has_seed_grad


def test_builtin_set():
    names = {p.name for p in BUILTIN_PRIMITIVES}
    assert names == {
        "etp_mm",
        "etp_mv",
        "etp_elemwise",
        "etp_conv",
        "etp_sp_mm",
        "etp_sp_mv",
        "etp_lora_mm",
        "etp_lora_mv",
    }
    assert BUILTIN_PRIMITIVES <= etp.ETP_PRIMITIVES
    assert BUILTIN_PRIMITIVES & etp.GRADIENT_ENABLED_PRIMITIVES == {etp.etp_elemwise_p}
    assert {p.name for p in BUILTIN_PRIMITIVES & etp.BATCHED_PRIMITIVES} == {
        "etp_mm",
        "etp_conv",
        "etp_sp_mm",
        "etp_lora_mm",
    }
    assert etp.etp_elemwise_p.name == "etp_elemwise"
    assert etp.ETP_X_INVAR_INDICES[etp.etp_elemwise_p] is None


# --------------------------------------------------------------------- errors


def test_duplicate_name_raises(fresh_name):
    name = fresh_name()
    p = etp.register_primitive(name, lambda x, w: x @ w)
    sizes = _registry_sizes()
    with pytest.raises(ValueError, match=re.escape(repr(name)) + r".*already registered"):
        etp.register_primitive(name, lambda x, w: x @ w, batched=True)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        etp.register_primitive_spec(_affine_spec(name))
    assert _registry_sizes() == sizes
    assert [q for q in etp.ETP_PRIMITIVES if q.name == name] == [p]
    assert not etp.is_batched_primitive(p)


def test_duplicate_builtin_name_raises():
    sizes = _registry_sizes()
    with pytest.raises(ValueError, match=r"'etp_mm'.*already registered"):
        etp.register_primitive("etp_mm", lambda x, w: x @ w)
    assert _registry_sizes() == sizes
    assert [q for q in etp.ETP_PRIMITIVES if q.name == "etp_mm"] == [etp.etp_mm_p]


@pytest.mark.parametrize("bad", ["", None, 3])
def test_bad_name_raises(bad):
    with pytest.raises(ValueError, match=r"register_primitive.*name"):
        etp.register_primitive(bad, lambda x: x)


def test_non_callable_impl_raises(fresh_name):
    name = fresh_name()
    sizes = _registry_sizes()
    with pytest.raises(TypeError, match=re.escape(f"register_primitive({name!r})") + r".*impl_fn.*callable.*int"):
        etp.register_primitive(name, 3)
    with pytest.raises(TypeError, match=r"trainable_invars_fn.*callable.*dict"):
        etp.register_primitive(name, lambda x, w: x @ w, trainable_invars_fn={"weight": 1})
    assert name not in _registered_names()
    assert _registry_sizes() == sizes


@pytest.mark.parametrize(
    ("kwargs", "what"), [({"x_invar_index": -1}, "x_invar_index"), ({"y_outvar_index": -1}, "y_outvar_index")]
)
def test_negative_index_raises(fresh_name, kwargs, what):
    name = fresh_name()
    with pytest.raises(ValueError, match=what):
        etp.register_primitive(name, lambda x, w: x @ w, **kwargs)
    assert name not in _registered_names()


@pytest.mark.parametrize("rule", list(RULE_TABLES))
def test_non_callable_rule_raises(fresh_name, rule):
    p = etp.register_primitive(fresh_name(), lambda x, w: x @ w)
    with pytest.raises(TypeError, match=re.escape(repr(p.name)) + f".*{rule}.*callable.*str"):
        getattr(p, f"register_{rule}")("not a function")
    with pytest.raises(TypeError, match=re.escape(repr(p.name)) + f".*{rule}.*callable"):
        p.register_etp_rules(**{rule: 42})
    assert p not in RULE_TABLES[rule]


@pytest.mark.parametrize(
    "field", ["impl", "yw_to_w", "xy_to_dw", "init_drtrl", "init_pp", "trainable_invars_fn", "drtrl_seed", "drtrl_grad"]
)
def test_spec_with_non_callable_rule_registers_nothing(fresh_name, field):
    name = fresh_name()
    spec = _affine_spec(name, **{field: "oops"})
    names_before, sizes = _registered_names(), _registry_sizes()
    with pytest.raises(TypeError, match=re.escape(repr(name)) + f".*{field}.*callable"):
        etp.register_primitive_spec(spec)
    assert name not in _registered_names()
    assert _registered_names() == names_before
    assert _registry_sizes() == sizes
    # the name is still free
    p = etp.register_primitive_spec(_affine_spec(name))
    assert etp.get_primitive_spec(p).name == name


def test_register_primitive_spec_rejects_non_spec():
    with pytest.raises(TypeError, match=r"register_primitive_spec.*ETPPrimitiveSpec.*dict"):
        etp.register_primitive_spec({"name": "x"})


def test_require_rules_missing_names_them(fresh_name):
    p = etp.register_primitive(fresh_name(), lambda x, w: x @ w)
    p.register_etp_rules(yw_to_w=_scaled_yw_to_w, init_pp=etp.init_pp_like_output)
    with pytest.raises(ValueError) as info:
        etp.require_rules(p)
    msg = str(info.value)
    assert repr(p.name) in msg, msg
    listed = re.search(r"has no (.*?) rules?\b", msg)
    assert listed is not None, msg
    assert {s.strip() for s in listed.group(1).split(",")} == {"xy_to_dw", "init_drtrl"}, msg
    # asking for present rules only succeeds; for one absent rule, it is named
    assert etp.require_rules(p, "yw_to_w", "init_pp") == {
        "yw_to_w": _scaled_yw_to_w,
        "init_pp": etp.init_pp_like_output,
    }
    with pytest.raises(ValueError, match=re.escape(repr(p.name)) + r".*init_drtrl"):
        etp.require_rules(p, "init_drtrl")


def test_require_rules_with_no_rules(fresh_name):
    p = etp.register_primitive(fresh_name(), lambda x, w: x @ w)
    with pytest.raises(ValueError) as info:
        etp.require_rules(p)
    msg = str(info.value)
    assert repr(p.name) in msg
    for rule in etp.RULE_NAMES:
        assert rule in msg


def test_require_rules_on_non_etp_primitive():
    with pytest.raises(ValueError, match=r"'add'.*not a registered ETP primitive"):
        etp.require_rules(jax.lax.add_p)
    assert not etp.is_etp_primitive(jax.lax.add_p)
    assert not etp.is_batched_primitive(jax.lax.add_p)
    assert not etp.is_gradient_enabled_primitive(jax.lax.add_p)
    with pytest.raises(ValueError, match=r"'add'"):
        etp.trainable_invars(jax.lax.add_p, {})


def test_require_rules_unknown_rule_name():
    with pytest.raises(ValueError, match=r"bogus"):
        etp.require_rules(etp.etp_mm_p, "bogus")


@pytest.mark.parametrize("by", ["name", "object"])
def test_unregister_removes_everywhere_and_frees_the_name(fresh_name, by):
    name = fresh_name()
    spec = _affine_spec(name, batched=True, gradient_enabled=True)
    p = etp.register_primitive_spec(spec)
    assert _registries_holding(p) == set(ALL_SETS) | set(ALL_TABLES)
    etp.unregister_primitive(name if by == "name" else p)
    assert _registries_holding(p) == set()
    assert name not in _registered_names()
    assert etp.get_primitive_spec(p) is None
    with pytest.raises(ValueError, match=r"not a registered ETP primitive"):
        etp.require_rules(p)
    # the name can be registered again, as a new primitive
    q = etp.register_primitive(name, lambda x, w: x @ w)
    assert q is not p and q.name == name
    assert _registries_holding(q) == {
        "ETP_PRIMITIVES",
        "ETP_TRAINABLE_INVARS_FNS",
        "ETP_X_INVAR_INDICES",
        "ETP_Y_OUTVAR_INDICES",
    }
    np.testing.assert_allclose(q.bind(jnp.ones((2, 3)), jnp.ones((3, 4))), jnp.full((2, 4), 3.0))
    # a second unregister of the old object fails: it is no longer registered
    with pytest.raises(ValueError, match=r"unregister_primitive"):
        etp.unregister_primitive(p)


def test_unregister_unknown_raises():
    with pytest.raises(ValueError, match=r"unregister_primitive.*'etp_test_no_such_primitive'"):
        etp.unregister_primitive("etp_test_no_such_primitive")
    with pytest.raises(ValueError, match=r"unregister_primitive"):
        etp.unregister_primitive(jax.lax.add_p)


# --------------------------------------------------------- impl returns tuple


def _tuple_impl(x, w):
    return x @ w, x


def test_tuple_impl_raises_under_tracing(fresh_name):
    p = etp.register_primitive(fresh_name(), _tuple_impl)
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    pattern = re.escape(repr(p.name)) + r".*single array.*tuple"
    with pytest.raises(TypeError, match=pattern):
        jax.make_jaxpr(p.bind)(x, w)
    with pytest.raises(TypeError, match=pattern):
        jax.jit(p.bind)(x, w)


def test_tuple_impl_raises_at_eager_bind(fresh_name):
    p = etp.register_primitive(fresh_name(), _tuple_impl)
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    with pytest.raises(TypeError, match=re.escape(repr(p.name)) + r".*single array.*tuple"):
        p.bind(x, w)
