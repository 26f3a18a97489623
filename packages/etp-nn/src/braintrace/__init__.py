"""braintrace: the full-stack import of the ETP libraries.

A thin re-export, no logic: the primitives of :mod:`etp_primitives` now, and
the compiler, algorithms and layers as those packages grow.
"""

from etp_primitives import (
    BATCHED_PRIMITIVES,
    ETP_PRIMITIVE_SPECS,
    ETP_PRIMITIVES,
    ETP_RULES_INIT_DRTRL,
    ETP_RULES_INIT_PP,
    ETP_RULES_XY_TO_DW,
    ETP_RULES_YW_TO_W,
    GRADIENT_ENABLED_PRIMITIVES,
    ETPPrimitive,
    ETPPrimitiveSpec,
    SparseStructure,
    conv,
    element_wise,
    get_primitive_spec,
    is_batched_primitive,
    is_etp_primitive,
    is_gradient_enabled_primitive,
    lora_matmul,
    matmul,
    register_primitive,
    register_primitive_spec,
    sparse_matmul,
    unregister_primitive,
)

from etp_compiler import (
    CompilationError,
    CompilationRecord,
    DiagnosticKind,
    DiagnosticLevel,
    ETraceGraph,
    HiddenGroup,
    HiddenParamOpRelation,
    HiddenPerturbation,
    ModuleInfo,
    add_hidden_perturbation_from_minfo,
    add_hidden_perturbation_from_module,
    compile_etrace_graph,
    extract_module_info,
    find_hidden_groups_from_minfo,
    find_hidden_groups_from_module,
    find_hidden_param_op_relations_from_minfo,
    find_hidden_param_op_relations_from_module,
)

from . import _etrace_compiler as _etrace_compiler
from . import _etrace_op as _etrace_op
from . import nn as nn

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "nn",
    "matmul",
    "element_wise",
    "conv",
    "sparse_matmul",
    "lora_matmul",
    "SparseStructure",
    "ETPPrimitive",
    "ETPPrimitiveSpec",
    "register_primitive",
    "register_primitive_spec",
    "unregister_primitive",
    "get_primitive_spec",
    "ETP_PRIMITIVES",
    "BATCHED_PRIMITIVES",
    "GRADIENT_ENABLED_PRIMITIVES",
    "ETP_RULES_YW_TO_W",
    "ETP_RULES_XY_TO_DW",
    "ETP_RULES_INIT_DRTRL",
    "ETP_RULES_INIT_PP",
    "ETP_PRIMITIVE_SPECS",
    "is_etp_primitive",
    "is_batched_primitive",
    "is_gradient_enabled_primitive",
    "CompilationError",
    "CompilationRecord",
    "DiagnosticKind",
    "DiagnosticLevel",
    "ETraceGraph",
    "HiddenGroup",
    "HiddenParamOpRelation",
    "HiddenPerturbation",
    "ModuleInfo",
    "add_hidden_perturbation_from_minfo",
    "add_hidden_perturbation_from_module",
    "compile_etrace_graph",
    "extract_module_info",
    "find_hidden_groups_from_minfo",
    "find_hidden_groups_from_module",
    "find_hidden_param_op_relations_from_minfo",
    "find_hidden_param_op_relations_from_module",
]
