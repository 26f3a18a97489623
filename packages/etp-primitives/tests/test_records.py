"""One record per primitive: the registries are live, read-only views of it; both eras' rule names; extend."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Set
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_primitives as etp
from etp_primitives import extend

SET_VIEWS = ("ETP_PRIMITIVES", "BATCHED_PRIMITIVES", "GRADIENT_ENABLED_PRIMITIVES")
MAPPING_VIEWS = (
    "ETP_RULES_YW_TO_W",
    "ETP_RULES_XY_TO_DW",
    "ETP_RULES_INIT_DRTRL",
    "ETP_RULES_INIT_PP",
    "ETP_RULES_DRTRL_SEED",
    "ETP_RULES_DRTRL_GRAD",
    "ETP_TRAINABLE_INVARS_FNS",
    "ETP_X_INVAR_INDICES",
    "ETP_Y_OUTVAR_INDICES",
    "ETP_PRIMITIVE_SPECS",
)
RULE_FIELDS = ("yw_to_w", "xy_to_dw", "init_drtrl", "init_pp", "drtrl_seed", "drtrl_grad")
RULE_VIEW = {field: f"ETP_RULES_{field.upper()}" for field in RULE_FIELDS}


@pytest.fixture
def fresh_name(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Names unique to this test; whatever got registered under them is removed afterwards."""
    base = "etp_test_rec_" + re.sub(r"\W", "_", request.node.name)
    made: list[str] = []

    def make(suffix: str = "p") -> str:
        made.append(f"{base}_{suffix}")
        return made[-1]

    yield make
    for name in made:
        if any(p.name == name for p in etp.ETP_PRIMITIVES):
            etp.unregister_primitive(name)


def _impl(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(x, w)


def _yw(hidden_dim: jax.Array, trace: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    return {"weight": trace["weight"] * hidden_dim[..., None, :]}


def _other_yw(hidden_dim: jax.Array, trace: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    return {"weight": 2.0 * trace["weight"] * hidden_dim[..., None, :]}


_xy = etp.derive_xy_to_dw(_impl, etp.default_trainable_invars, 0)


def _init(x_var: Any, y_var: Any, weight_vars: Any, n: int) -> dict[str, jax.Array]:
    return {"weight": jnp.zeros((*etp.aval_of(weight_vars["weight"]).shape, n))}


def _spec(name: str, **overrides: Any) -> etp.ETPPrimitiveSpec:
    fields: dict[str, Any] = dict(
        name=name, impl=_impl, yw_to_w=_yw, xy_to_dw=_xy, init_drtrl=_init, init_pp=etp.init_pp_like_output
    )
    fields.update(overrides)
    return etp.ETPPrimitiveSpec(**fields)


def _holding(p: Any) -> set[str]:
    return {name for name in (*SET_VIEWS, *MAPPING_VIEWS) if p in getattr(etp, name)}


# ------------------------------------------------------------------------------------ the views


def test_views_are_set_and_mapping_views_of_one_table() -> None:
    for name in SET_VIEWS:
        view = getattr(etp, name)
        assert isinstance(view, Set) and isinstance(view, extend.RegistrySet), name
        assert not isinstance(view, set), name  # not a mutable set any more
    for name in MAPPING_VIEWS:
        view = getattr(etp, name)
        assert isinstance(view, Mapping) and isinstance(view, extend.RegistryMapping), name
        assert not isinstance(view, dict), name
    # every view agrees with the records, entry by entry
    for p in etp.ETP_PRIMITIVES:
        record = extend.get_primitive_record(p)
        assert record is not None and record.name == p.name
        assert (p in etp.BATCHED_PRIMITIVES) is record.batched
        assert (p in etp.GRADIENT_ENABLED_PRIMITIVES) is record.gradient_enabled
        for field, view in RULE_VIEW.items():
            rule = getattr(record, field)
            assert (p in getattr(etp, view)) is (rule is not None), (p, field)
            if rule is not None:
                assert getattr(etp, view)[p] is rule
        assert etp.ETP_TRAINABLE_INVARS_FNS[p] is record.trainable_invars_fn
        assert etp.ETP_X_INVAR_INDICES[p] == record.x_invar_index
        assert etp.ETP_Y_OUTVAR_INDICES[p] == record.y_outvar_index


def test_views_are_live(fresh_name) -> None:
    sizes = {name: len(getattr(etp, name)) for name in (*SET_VIEWS, *MAPPING_VIEWS)}
    p = etp.register_primitive(fresh_name(), _impl, batched=True)
    assert _holding(p) == {
        "ETP_PRIMITIVES",
        "BATCHED_PRIMITIVES",
        "ETP_TRAINABLE_INVARS_FNS",
        "ETP_X_INVAR_INDICES",
        "ETP_Y_OUTVAR_INDICES",
    }
    assert p in list(etp.ETP_PRIMITIVES) and p in etp.ETP_X_INVAR_INDICES.keys()
    p.register_yw_to_w(_yw)
    assert etp.ETP_RULES_YW_TO_W[p] is _yw and etp.ETP_RULES_YW_TO_W.get(p) is _yw
    assert p not in etp.ETP_RULES_XY_TO_DW and etp.ETP_RULES_XY_TO_DW.get(p) is None
    with pytest.raises(KeyError):
        etp.ETP_RULES_XY_TO_DW[p]
    p.register_etp_rules(xy_to_dw=_xy, init_drtrl=_init, init_pp=etp.init_pp_like_output)
    grown = {name: len(getattr(etp, name)) for name in sizes}
    assert {name for name in sizes if grown[name] == sizes[name] + 1} == _holding(p)
    assert all(grown[name] == sizes[name] for name in sizes if name not in _holding(p))
    etp.unregister_primitive(p)
    assert _holding(p) == set()
    assert {name: len(getattr(etp, name)) for name in sizes} == sizes


def test_set_operations_give_plain_frozensets() -> None:
    builtins = {etp.etp_mm_p, etp.etp_elemwise_p}
    assert builtins & etp.GRADIENT_ENABLED_PRIMITIVES == {etp.etp_elemwise_p}
    both = etp.BATCHED_PRIMITIVES & etp.ETP_PRIMITIVES
    assert type(both) is frozenset and etp.etp_mm_p in both and etp.etp_mv_p not in both
    assert builtins <= etp.ETP_PRIMITIVES and etp.ETP_PRIMITIVES >= builtins
    assert etp.etp_mv_p in etp.ETP_PRIMITIVES - etp.BATCHED_PRIMITIVES
    assert etp.ETP_PRIMITIVES.copy() == set(etp.ETP_PRIMITIVES)
    assert dict(etp.ETP_RULES_YW_TO_W) == etp.ETP_RULES_YW_TO_W.copy()
    assert sorted(p.name for p in etp.ETP_RULES_YW_TO_W.keys()) == sorted(p.name for p in etp.ETP_RULES_YW_TO_W)
    assert "etp_mm" in repr(etp.ETP_PRIMITIVES) and "read-only" in repr(etp.ETP_RULES_XY_TO_DW)


def test_non_primitives_are_in_no_view() -> None:
    for key in (jax.lax.add_p, "etp_mm", None, 3, [1]):
        assert not etp.is_etp_primitive(key)
        assert not etp.is_batched_primitive(key)
        assert key not in etp.ETP_PRIMITIVES
        assert key not in etp.ETP_RULES_YW_TO_W
    with pytest.raises(KeyError):
        etp.ETP_X_INVAR_INDICES[jax.lax.add_p]


_READ_ONLY = r"read-only view.*register_primitive.*register_primitive_spec"


@pytest.mark.parametrize("name", SET_VIEWS)
def test_set_views_refuse_writes(name: str) -> None:
    view = getattr(etp, name)
    before = set(view)
    for write in (
        lambda: view.add(jax.lax.add_p),
        lambda: view.discard(etp.etp_mm_p),
        lambda: view.remove(etp.etp_mm_p),
        lambda: view.pop(),
        lambda: view.clear(),
        lambda: view.update({jax.lax.add_p}),
    ):
        with pytest.raises(TypeError, match=re.escape(name) + ".*" + _READ_ONLY):
            write()
    with pytest.raises(TypeError, match=_READ_ONLY):
        view |= {jax.lax.add_p}
    with pytest.raises(TypeError, match=_READ_ONLY):
        view -= {etp.etp_mm_p}
    assert set(getattr(etp, name)) == before


@pytest.mark.parametrize("name", MAPPING_VIEWS)
def test_mapping_views_refuse_writes(name: str) -> None:
    view = getattr(etp, name)
    before = dict(view)
    for write in (
        lambda: view.__setitem__(jax.lax.add_p, None),
        lambda: view.__delitem__(etp.etp_mm_p),
        lambda: view.pop(etp.etp_mm_p),
        lambda: view.popitem(),
        lambda: view.clear(),
        lambda: view.update({jax.lax.add_p: None}),
        lambda: view.setdefault(jax.lax.add_p, None),
    ):
        with pytest.raises(TypeError, match=re.escape(name) + ".*" + _READ_ONLY):
            write()
    with pytest.raises(TypeError, match=_READ_ONLY):
        view[etp.etp_mm_p] = None
    assert dict(getattr(etp, name)) == before


def test_unregister_removes_the_one_record(fresh_name) -> None:
    p = etp.register_primitive_spec(_spec(fresh_name(), batched=True, gradient_enabled=True, drtrl_seed=_xy))
    assert _holding(p) == set(SET_VIEWS) | set(MAPPING_VIEWS) - {"ETP_RULES_DRTRL_GRAD"}
    etp.unregister_primitive(p.name)
    assert _holding(p) == set()
    assert extend.get_primitive_record(p) is None and etp.get_primitive_spec(p) is None
    with pytest.raises(ValueError, match=r"not registered.*register_primitive"):
        p.register_yw_to_w(_yw)  # the record is gone: its rules cannot come back on their own
    assert _holding(p) == set()


# ------------------------------------------------------------------------------------ records


def test_class_style_builds_the_same_record_as_a_spec(fresh_name) -> None:
    layout = etp.default_trainable_invars
    p = etp.register_primitive(fresh_name("cls"), _impl, batched=True, trainable_invars_fn=layout)
    p.register_etp_rules(yw_to_w=_yw, xy_to_dw=_xy, init_drtrl=_init, init_pp=etp.init_pp_like_output)
    spec = _spec(fresh_name("spec"), batched=True, trainable_invars_fn=layout)
    q = etp.register_primitive_spec(spec)
    record = extend.get_primitive_record(p)
    assert isinstance(record, etp.ETPPrimitiveSpec)
    assert dataclasses.replace(record, name=spec.name) == spec  # field for field
    assert extend.get_primitive_record(q) is spec and etp.get_primitive_spec(q) is spec
    assert etp.get_primitive_spec(p) is None  # class style: registered from no spec
    assert p not in etp.ETP_PRIMITIVE_SPECS and etp.ETP_PRIMITIVE_SPECS[q] is spec


def test_rule_registration_replaces_the_record_and_is_atomic(fresh_name) -> None:
    p = etp.register_primitive_spec(_spec(fresh_name()))
    first = extend.get_primitive_record(p)
    p.register_yw_to_w(_other_yw)
    second = extend.get_primitive_record(p)
    assert second is not first and second.yw_to_w is _other_yw and second.xy_to_dw is _xy
    assert etp.get_primitive_spec(p) is second and etp.ETP_RULES_YW_TO_W[p] is _other_yw
    with pytest.raises(TypeError, match=r"init_pp.*callable"):
        p.register_etp_rules(yw_to_w=_yw, init_pp=3)
    assert extend.get_primitive_record(p) is second  # nothing installed


def test_spec_defaults_for_optional_fields(fresh_name) -> None:
    spec = etp.ETPPrimitiveSpec(fresh_name(), _impl, _yw, _xy, _init, etp.init_pp_like_output)
    assert spec.trainable_invars_fn is etp.default_trainable_invars
    assert spec.x_invar_index == 0 and spec.y_outvar_index == 0
    assert spec.resolve_trainable_invars({}) == {"weight": 1}
    with pytest.raises(TypeError, match=r"ETPPrimitiveSpec.*init_pp must be callable.*NoneType"):
        etp.register_primitive_spec(dataclasses.replace(spec, init_pp=None))
    assert spec.name not in {p.name for p in etp.ETP_PRIMITIVES}


# ------------------------------------------------------------------------- both eras' rule names


def test_dt_to_t_and_yw_to_w_are_one_rule_on_the_primitive(fresh_name) -> None:
    p = etp.register_primitive(fresh_name("a"), _impl)
    p.register_dt_to_t(_yw)
    assert etp.ETP_RULES_YW_TO_W[p] is _yw
    assert etp.require_rules(p, "dt_to_t") == {"dt_to_t": _yw}
    assert etp.require_rules(p, "yw_to_w") == {"yw_to_w": _yw}
    p.register_etp_rules(dt_to_t=_other_yw)
    assert etp.ETP_RULES_YW_TO_W[p] is _other_yw
    p.register_etp_rules(yw_to_w=_yw, dt_to_t=_yw)  # the same function twice is fine
    assert extend.get_primitive_record(p).dt_to_t is _yw
    with pytest.raises(TypeError, match=r"etp_test_rec.*both yw_to_w= and dt_to_t="):
        p.register_etp_rules(yw_to_w=_yw, dt_to_t=_other_yw)
    assert etp.ETP_RULES_YW_TO_W[p] is _yw
    with pytest.raises(TypeError, match=re.escape(repr(p.name)) + r".*dt_to_t rule must be callable.*int"):
        p.register_dt_to_t(3)
    with pytest.raises(TypeError, match=r"dt_to_t rule must be callable"):
        p.register_etp_rules(dt_to_t="nope")


def test_dt_to_t_in_a_spec(fresh_name) -> None:
    spec = etp.ETPPrimitiveSpec(
        name=fresh_name(),
        impl=_impl,
        dt_to_t=_yw,
        xy_to_dw=_xy,
        init_drtrl=_init,
        init_pp=etp.init_pp_like_output,
        batched=True,
    )
    assert spec.yw_to_w is _yw and spec.dt_to_t is _yw
    assert dataclasses.replace(spec, yw_to_w=_other_yw).dt_to_t is _other_yw
    p = etp.register_primitive_spec(spec)
    assert etp.require_rules(p) == {
        "yw_to_w": _yw,
        "xy_to_dw": _xy,
        "init_drtrl": _init,
        "init_pp": etp.init_pp_like_output,
    }
    assert _spec(fresh_name("same"), dt_to_t=_yw).yw_to_w is _yw
    with pytest.raises(TypeError, match=r"ETPPrimitiveSpec 'etp_test_rec.*both yw_to_w= and dt_to_t="):
        _spec(fresh_name("both"), dt_to_t=_other_yw)
    # dt_to_t works end to end: the rules of a dt_to_t spec drive the D-RTRL helpers
    x, w, d = jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.arange(8.0).reshape(2, 4)
    seed = etp.drtrl_seed(p, x, d, {"weight": w}, {})
    grad = etp.drtrl_grad(p, x, jnp.ones((2, 4)), seed, {"weight": w}, {})
    np.testing.assert_allclose(grad["weight"], x.T @ d, rtol=1e-12)


def test_require_rules_names_and_optional_rules() -> None:
    rules = etp.require_rules(etp.etp_mm_p, "drtrl_seed", "drtrl_grad")
    assert rules == {
        "drtrl_seed": etp.ETP_RULES_DRTRL_SEED[etp.etp_mm_p],
        "drtrl_grad": etp.ETP_RULES_DRTRL_GRAD[etp.etp_mm_p],
    }
    with pytest.raises(ValueError, match=r"'etp_elemwise' has no drtrl_seed rule"):
        etp.require_rules(etp.etp_elemwise_p, "drtrl_seed")
    with pytest.raises(ValueError, match=r"unknown ETP rule name.*bogus.*dt_to_t"):
        etp.require_rules(etp.etp_mm_p, "bogus")


# ------------------------------------------------------------------------------------- extend


EXTEND_NAMES = {
    "ETP_PRIMITIVES", "BATCHED_PRIMITIVES", "GRADIENT_ENABLED_PRIMITIVES", "ETP_RULES_YW_TO_W",
    "ETP_RULES_XY_TO_DW", "ETP_RULES_INIT_DRTRL", "ETP_RULES_INIT_PP", "ETP_RULES_DRTRL_SEED",
    "ETP_RULES_DRTRL_GRAD", "ETP_TRAINABLE_INVARS_FNS", "ETP_X_INVAR_INDICES", "ETP_Y_OUTVAR_INDICES",
    "ETP_PRIMITIVE_SPECS", "is_etp_primitive", "is_batched_primitive", "is_gradient_enabled_primitive",
    "RULE_NAMES", "RULE_ALIASES", "require_rules", "trainable_invars", "drtrl_seed", "drtrl_grad",
    "pairwise_sum", "sum_leading_axes", "aval_of", "init_pp_like_output", "derive_xy_to_dw",
    "get_primitive_spec", "get_primitive_record", "ETPPrimitiveSpec", "register_primitive",
    "register_primitive_spec", "unregister_primitive", "ETPPrimitive", "set_batching_rule",
}  # fmt: skip


def test_extend_holds_what_rule_authors_need() -> None:
    assert EXTEND_NAMES <= set(extend.__all__)
    assert len(extend.__all__) == len(set(extend.__all__))
    for name in extend.__all__:
        assert hasattr(extend, name), name
    # the same objects as the top level (backward compatibility: the seeds import them from there)
    for name in EXTEND_NAMES - {"get_primitive_record", "RULE_ALIASES"}:
        assert getattr(etp, name) is getattr(extend, name), name
    assert etp.extend is extend
    assert extend.RULE_ALIASES == {"dt_to_t": "yw_to_w"}
    assert extend.RULE_NAMES == ("yw_to_w", "xy_to_dw", "init_drtrl", "init_pp")


def test_extend_documents_the_rule_contract() -> None:
    doc = extend.__doc__ or ""
    for signature in (
        "yw_to_w(hidden_dim, trace, **params)",
        "dt_to_t",
        "xy_to_dw(x, hidden_dim, weights, **params)",
        "init_drtrl(x_var, y_var, weight_vars, num_hidden_state)",
        "init_pp(x_var, y_var, weight_vars, num_hidden_state)",
        "drtrl_seed(x, hidden_dim, weights, **params)",
        "drtrl_grad(x, cotangent, trace, weights, **params)",
        "trainable_invars_fn(params)",
    ):
        assert signature in doc, signature
    assert "ES-D-RTRL" in doc and "math::" in doc


def test_top_level_all_keeps_ops_spec_and_registration() -> None:
    for name in (
        "matmul", "element_wise", "conv", "sparse_matmul", "lora_matmul", "SparseStructure",
        "ETPPrimitiveSpec", "register_primitive_spec", "get_primitive_spec", "ETPPrimitive",
        "register_primitive", "unregister_primitive", "set_batching_rule",
    ):  # fmt: skip
        assert name in etp.__all__, name
    for name in etp.__all__:
        assert hasattr(etp, name), name
