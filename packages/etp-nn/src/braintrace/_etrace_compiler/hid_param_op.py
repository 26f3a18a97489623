"""``braintrace._etrace_compiler.hid_param_op``: relation finding and the helpers to debug it."""

from __future__ import annotations

from typing import Any

from etp_compiler import (
    HiddenParamOpRelation,
    build_producers,
    find_hidden_param_op_relations_from_minfo,
    trace_var_to_params,
)

__all__ = [
    "HiddenParamOpRelation",
    "find_hidden_param_op_relations_from_minfo",
    "_build_producer_map",
    "_trace_var_to_param",
]


def _build_producer_map(jaxpr: Any) -> dict[Any, Any]:
    """``var -> the equation producing it`` for a jaxpr (:func:`etp_compiler.build_producers`)."""
    return build_producers(jaxpr)


def _trace_var_to_param(var: Any, producers: dict[Any, Any], invar_to_weight_path: dict[Any, Any]) -> Any:
    """``(ParamState path, leaf key path)`` that ``var`` is computed from, or ``None`` if none.

    When several leaves feed ``var`` (e.g. weight and gain) the first is returned;
    :func:`etp_compiler.trace_var_to_params` returns them all.
    """
    leaves = trace_var_to_params(var, producers, invar_to_weight_path)
    return leaves[0] if leaves else None
