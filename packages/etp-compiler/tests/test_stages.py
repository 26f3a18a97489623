"""Stage functions return their records; braintrace 0.2.8 names (two-value groups, ``*_in_module``, ``.dict()``)."""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compiler_testing import compile_quiet

import etp_compiler
import etp_primitives as etp
from etp_compiler import (
    CompilationRecord,
    DiagnosticKind,
    ETraceGraph,
    HiddenGroup,
    HiddenParamOpRelation,
    HiddenPerturbation,
    NotSupportedError,
)


class Mixed(brainstate.nn.Module):
    """Expected, by construction:

    * groups: ``(v, a)`` merged (each reads the other's old value) and not position-wise
      (``v @ mix``); ``(o,)`` alone (it reads ``v`` only through the trainable op of ``r``);
    * relations, in equation order: ``w`` drives ``v`` through ``@ mix`` (not position-wise);
      ``wide``'s output, shape ``(3,)``, does not broadcast to ``a`` ``(4,)`` (dropped);
      ``r`` drives ``o``; ``ro`` reaches no hidden state (a readout).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mix = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)))
        self.w = brainstate.ParamState(jnp.ones((3, 4)) * 0.3)
        self.r = brainstate.ParamState(jnp.ones((4, 2)) * 0.2)
        self.ro = brainstate.ParamState(jnp.ones((2, 5)) * 0.1)
        self.wide = brainstate.ParamState(jnp.ones((3, 3)) * 0.1)
        self.v = brainstate.HiddenState(jnp.linspace(-1.0, 1.0, 4))
        self.a = brainstate.HiddenState(jnp.linspace(0.5, -0.4, 4))
        self.o = brainstate.HiddenState(jnp.zeros(2))

    def update(self, x: Any) -> Any:
        v = jnp.tanh(self.v.value @ self.mix) * self.a.value + etp.matmul(x, self.w.value) @ self.mix
        self.a.value = 0.5 * self.a.value + jnp.cos(self.v.value) + etp.matmul(x, self.wide.value).sum()
        self.v.value = v
        self.o.value = 0.9 * self.o.value + etp.matmul(v, self.r.value)
        return etp.matmul(self.o.value, self.ro.value)


@pytest.fixture
def minfo() -> etp_compiler.ModuleInfo:
    return etp_compiler.extract_module_info(Mixed(), jnp.ones(3))


def _kinds(items: list[Any]) -> list[Any]:
    return [item.kind if isinstance(item, CompilationRecord) else type(item).__name__ for item in items]


def test_hidden_group_stage_returns_each_group_after_its_records(minfo: etp_compiler.ModuleInfo) -> None:
    items = etp_compiler.hidden_group_stage(minfo)
    assert _kinds(items) == [
        DiagnosticKind.HIDDEN_GROUP_MERGED,
        DiagnosticKind.TRANSITION_NOT_POSITIONWISE,
        "HiddenGroup",
        "HiddenGroup",
    ]
    merged, mixing, first, second = items
    assert isinstance(first, HiddenGroup) and isinstance(second, HiddenGroup)
    assert set(first.hidden_paths) == {("v",), ("a",)} and second.hidden_paths == (("o",),)
    assert [first.index, second.index] == [0, 1]
    assert isinstance(merged, CompilationRecord) and isinstance(mixing, CompilationRecord)
    assert merged.context["hidden_group_index"] == mixing.context["hidden_group_index"] == 0
    groups, mapping = etp_compiler.find_hidden_groups_from_minfo(minfo)
    assert [g.hidden_paths for g in groups] == [first.hidden_paths, second.hidden_paths]
    assert mapping == {p: g for g in groups for p in g.hidden_paths}


def test_relation_stage_returns_relations_and_the_records_of_each_decision(minfo: etp_compiler.ModuleInfo) -> None:
    _, mapping = etp_compiler.find_hidden_groups_from_minfo(minfo)
    items = etp_compiler.relation_stage(minfo, mapping)
    by_weight = [(item.kind if isinstance(item, CompilationRecord) else "relation", item.weight_path) for item in items]
    assert by_weight == [
        (DiagnosticKind.TRANSITION_NOT_POSITIONWISE, ("w",)),
        (DiagnosticKind.RELATION_INCLUDED, ("w",)),
        ("relation", ("w",)),
        (DiagnosticKind.RELATION_EXCLUDED_SHAPE_MISMATCH, ("wide",)),
        (DiagnosticKind.RELATION_INCLUDED, ("r",)),
        ("relation", ("r",)),
        (DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL, ("ro",)),
    ]
    relations = etp_compiler.find_hidden_param_op_relations_from_minfo(minfo, mapping)
    assert [r.weight_path for r in relations] == [r.weight_path for r in items if isinstance(r, HiddenParamOpRelation)]


def test_compile_keeps_every_stage_record_in_order() -> None:
    model = Mixed()
    graph = compile_quiet(model, jnp.ones(3))
    minfo = etp_compiler.extract_module_info(model, jnp.ones(3))
    group_items = etp_compiler.hidden_group_stage(minfo)
    _, mapping = etp_compiler.find_hidden_groups_from_minfo(minfo)
    relation_items = etp_compiler.relation_stage(minfo, mapping)
    expected = [r for r in [*group_items, *relation_items] if isinstance(r, CompilationRecord)]
    assert [(r.kind, r.message) for r in graph.diagnostics] == [(r.kind, r.message) for r in expected]


def test_find_hidden_groups_from_module_returns_two_values_as_braintrace() -> None:
    result = etp_compiler.find_hidden_groups_from_module(Mixed(), jnp.ones(3))
    assert isinstance(result, tuple) and len(result) == 2
    groups, mapping = result
    assert all(isinstance(g, HiddenGroup) for g in groups)
    assert set(mapping) == {("v",), ("a",), ("o",)}


def test_add_hidden_perturbation_in_module_is_the_from_module_stage() -> None:
    model = Mixed()
    x = jnp.linspace(-1.0, 1.0, 3)
    ours = etp_compiler.add_hidden_perturbation_in_module(model, x)
    reference = etp_compiler.add_hidden_perturbation_from_module(model, x)
    assert isinstance(ours, HiddenPerturbation)
    assert ours.perturb_hidden_paths == reference.perturb_hidden_paths
    minfo = etp_compiler.extract_module_info(model, x)
    invals = minfo.current_inputs(x)
    deltas = [jnp.full(s.value.shape, 0.1 * (i + 1)) for i, s in enumerate(ours.perturb_hidden_states)]
    got = etp_compiler.eval_jaxpr(ours.perturb_jaxpr.jaxpr, ours.perturb_jaxpr.consts, *invals, *deltas)
    want = jax.core.eval_jaxpr(reference.perturb_jaxpr.jaxpr, reference.perturb_jaxpr.consts, *invals, *deltas)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def _assert_fields(record: Any, fields: list[str]) -> None:
    as_dict = record.dict()
    assert type(as_dict) is dict and list(as_dict) == fields
    assert all(as_dict[name] is getattr(record, name) for name in fields)


def test_dict_of_every_record_holds_its_fields() -> None:
    graph = compile_quiet(Mixed(), jnp.ones(3))
    _assert_fields(graph, list(ETraceGraph._fields))
    _assert_fields(graph.hidden_perturb, list(HiddenPerturbation._fields))
    _assert_fields(graph.module_info, list(etp_compiler.ModuleInfo._fields))
    group_fields = [
        "index",
        "hidden_paths",
        "hidden_invars",
        "hidden_outvars",
        "varshape",
        "transition_jaxpr",
        "transition_jaxpr_constvars",
        "is_positionwise",
        "hidden_states",
    ]
    for group in graph.hidden_groups:
        _assert_fields(group, group_fields)
    relation_fields = [
        "primitive",
        "eqn",
        "eqn_params",
        "weight_path",
        "trainable_vars",
        "trainable_paths",
        "weight_fns",
        "x_var",
        "y_var",
        "hidden_groups",
        "connected_hidden_paths",
        "y_to_hidden",
        "y_to_hidden_positionwise",
        "path_classification",
        "substep",
    ]
    for relation in graph.hidden_param_op_relations:
        _assert_fields(relation, relation_fields)
    assert graph.dict()["hidden_groups"] is graph.hidden_groups


def test_not_supported_error_is_exported_and_a_not_implemented_error() -> None:
    assert "NotSupportedError" in etp_compiler.__all__
    assert issubclass(NotSupportedError, NotImplementedError)
    with pytest.raises(NotImplementedError, match="multi-step"):
        raise NotSupportedError("no multi-step windows")


def test_build_producers_is_public_and_the_braintrace_helpers_use_it(minfo: etp_compiler.ModuleInfo) -> None:
    from braintrace._etrace_compiler.hid_param_op import _build_producer_map, _trace_var_to_param

    producers = etp_compiler.build_producers(minfo.jaxpr)
    assert "build_producers" in etp_compiler.__all__
    assert _build_producer_map(minfo.jaxpr) == producers
    (relation,) = [
        r
        for r in etp_compiler.find_hidden_param_op_relations_from_minfo(
            minfo, etp_compiler.find_hidden_groups_from_minfo(minfo)[1]
        )
        if r.weight_path == ("r",)
    ]
    assert producers[relation.y_var] is relation.eqn
    w_var = minfo.weight_path_to_invars[("r",)][0]
    assert _trace_var_to_param(relation.trainable_vars["weight"], producers, minfo.invar_to_weight_path) == (
        ("r",),
        (),
    )
    assert w_var not in producers
