"""``compile_etrace_graph``: the four stages in one call, and the resulting :class:`ETraceGraph`."""

from __future__ import annotations

import builtins
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import brainstate

from ._control_flow import ControlFlowPolicy
from ._diagnostics import CompilationRecord, DiagnosticKind, DiagnosticLevel, emit_warnings, explain_records
from ._hidden_groups import HiddenGroup, find_hidden_groups_from_minfo, hidden_group_stage
from ._module_info import ModuleInfo, StatePath, extract_module_info
from ._perturbation import HiddenPerturbation, add_hidden_perturbation_from_minfo
from ._relations import HiddenParamOpRelation, find_hidden_param_op_relations_from_minfo, relation_stage

__all__ = [
    "ETraceGraph",
    "compile_etrace_graph",
    "find_hidden_groups_from_module",
    "find_hidden_param_op_relations_from_module",
    "add_hidden_perturbation_from_module",
    "add_hidden_perturbation_in_module",
    "inlined_call_records",
]


class ETraceGraph(NamedTuple):
    """Everything the online learners need about one model step.

    Attributes
    ----------
    module_info : ModuleInfo
    hidden_groups : list of HiddenGroup
    hid_path_to_group : dict
        Hidden path -> its group.
    hidden_param_op_relations : list of HiddenParamOpRelation
        The weight ops that get eligibility traces.
    hidden_perturb : HiddenPerturbation
    diagnostics : tuple of CompilationRecord
        Why each weight op is in or out, and other decisions.
    """

    module_info: ModuleInfo
    hidden_groups: list[HiddenGroup]
    hid_path_to_group: dict[StatePath, HiddenGroup]
    hidden_param_op_relations: list[HiddenParamOpRelation]
    hidden_perturb: HiddenPerturbation
    diagnostics: tuple[CompilationRecord, ...]

    def explain(
        self,
        *,
        weight_path: Sequence[Hashable] | None = None,
        hidden_path: Sequence[Hashable] | None = None,
        kind: DiagnosticKind | Iterable[DiagnosticKind] | None = None,
        file: Any = None,
    ) -> tuple[CompilationRecord, ...]:
        """Print the diagnostics grouped by kind (filtered by weight path, hidden path or kind); return them."""
        return explain_records(self.diagnostics, weight_path=weight_path, hidden_path=hidden_path, kind=kind, file=file)

    def dict(self) -> builtins.dict[str, Any]:
        """The fields as a plain ``dict`` (name -> value), e.g. for printing; as braintrace's ``ETraceGraph.dict``."""
        return {**self._asdict()}


def inlined_call_records(minfo: ModuleInfo) -> list[CompilationRecord]:
    """Stage 1's diagnostics: one warning per ``custom_jvp``/``custom_vjp`` call inlined because it holds an ETP op."""
    return [
        CompilationRecord(
            kind=DiagnosticKind.PRIMITIVE_INSIDE_CONTROL_FLOW,
            level=DiagnosticLevel.WARNING,
            message=(
                f"the custom-derivative function {name!r} contains an ETP primitive; it was inlined, so its "
                "custom derivative rule is not used for the eligibility-trace Jacobians."
            ),
            context={"construct": name},
        )
        for name in minfo.inlined_custom_calls
    ] + [
        CompilationRecord(
            kind=DiagnosticKind.CONTROL_FLOW_CONVERTED,
            level=DiagnosticLevel.INFO,
            message=action,
            context={"construct": action.split(" ", 1)[0]},
        )
        for action in minfo.control_flow_actions
    ]


def compile_etrace_graph(
    model: brainstate.nn.Module,
    *args: Any,
    emit: bool = True,
    control_flow: ControlFlowPolicy | None = None,
    **kwargs: Any,
) -> ETraceGraph:
    """Compile one step of ``model`` into an :class:`ETraceGraph`.

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    *args, **kwargs
        Example inputs of one step.
    emit : bool
        Emit each warning-level diagnostic once as a ``UserWarning``.
    control_flow : ControlFlowPolicy, optional
        What to do with control flow in the step (see :class:`ControlFlowPolicy`); each construct
        converted or left opaque gets a ``CONTROL_FLOW_CONVERTED`` record in the diagnostics.

    Raises
    ------
    CompilationError
        For model structures ETP cannot handle (no hidden state, a hidden
        state updated inside lax control flow, ...), naming the state.
    """
    minfo = extract_module_info(model, *args, control_flow=control_flow, **kwargs)
    records: list[CompilationRecord] = inlined_call_records(minfo)
    group_items = hidden_group_stage(minfo)
    groups = [item for item in group_items if isinstance(item, HiddenGroup)]
    records.extend(item for item in group_items if isinstance(item, CompilationRecord))
    hid_path_to_group = {p: g for g in groups for p in g.hidden_paths}
    relation_items = relation_stage(minfo, hid_path_to_group)
    relations = [item for item in relation_items if isinstance(item, HiddenParamOpRelation)]
    records.extend(item for item in relation_items if isinstance(item, CompilationRecord))
    perturb = add_hidden_perturbation_from_minfo(minfo)
    if emit:
        emit_warnings(records)
    return ETraceGraph(minfo, groups, hid_path_to_group, relations, perturb, tuple(records))


def find_hidden_groups_from_module(
    model: brainstate.nn.Module, *args: Any, **kwargs: Any
) -> tuple[list[HiddenGroup], dict[StatePath, HiddenGroup]]:
    """Stages 1-2 from a model: ``(hidden_groups, hid_path_to_group)``, as braintrace returns them.

    For the :class:`ModuleInfo` too, call :func:`extract_module_info` and
    :func:`find_hidden_groups_from_minfo`.
    """
    return find_hidden_groups_from_minfo(extract_module_info(model, *args, **kwargs))


def find_hidden_param_op_relations_from_module(
    model: brainstate.nn.Module, *args: Any, **kwargs: Any
) -> list[HiddenParamOpRelation]:
    """Stages 1-3 from a model: the relations."""
    minfo = extract_module_info(model, *args, **kwargs)
    _, mapping = find_hidden_groups_from_minfo(minfo)
    return find_hidden_param_op_relations_from_minfo(minfo, mapping)


def add_hidden_perturbation_from_module(model: brainstate.nn.Module, *args: Any, **kwargs: Any) -> HiddenPerturbation:
    """Stages 1 and 4 from a model: the perturbation."""
    return add_hidden_perturbation_from_minfo(extract_module_info(model, *args, **kwargs))


def add_hidden_perturbation_in_module(model: brainstate.nn.Module, *args: Any, **kwargs: Any) -> HiddenPerturbation:
    """Stages 1 and 4 from a model: the perturbation (braintrace's name for :func:`add_hidden_perturbation_from_module`)."""
    return add_hidden_perturbation_from_module(model, *args, **kwargs)
