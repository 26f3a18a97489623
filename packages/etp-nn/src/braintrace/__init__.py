"""braintrace: the full-stack import of the ETP libraries.

A thin re-export, no logic: the primitives of :mod:`etp_primitives`, the
compiler stages of :mod:`etp_compiler`, every public name of
:mod:`etp_algorithms` (the learners, :class:`SingleStepData`,
:class:`MultiStepData`, ...) and, as :mod:`braintrace.nn`, the layers of
:mod:`etp_nn`. Each name is the very object of its package.
"""

import warnings as _warnings
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import distribution as _distribution
from importlib.metadata import version as _distribution_version

import etp_algorithms as _etp_algorithms
from etp_algorithms import *  # noqa: F403  # every public name of the learners, whatever etp_algorithms exports
from etp_compiler import (
    CompilationError,
    CompilationRecord,
    ControlFlowPolicy,
    DiagnosticKind,
    DiagnosticLevel,
    ETraceGraph,
    HiddenGroup,
    HiddenParamOpRelation,
    HiddenPerturbation,
    ModuleInfo,
    NotSupportedError,
    add_hidden_perturbation_from_minfo,
    add_hidden_perturbation_from_module,
    add_hidden_perturbation_in_module,
    compile_etrace_graph,
    extract_module_info,
    find_hidden_groups_from_minfo,
    find_hidden_groups_from_module,
    find_hidden_param_op_relations_from_minfo,
    find_hidden_param_op_relations_from_module,
)
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
    einsum,
    element_wise,
    embedding,
    get_primitive_spec,
    grouped_matmul,
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

from . import _etrace_compiler as _etrace_compiler
from . import _etrace_op as _etrace_op
from . import nn as nn

__version__ = _distribution_version("etp-nn")  # one source: the distribution's pyproject


class BraintraceDistributionWarning(UserWarning):
    """Two installed distributions provide the ``braintrace`` import: ours (etp-nn) and another."""


_SHADOW_WARNED = False


def _released_distribution() -> str | None:
    """``name version`` of the released ``braintrace`` distribution when one is installed, else ``None``.

    Looked up by name: ``importlib.metadata.packages_distributions()`` scans every installed
    distribution (seconds on a large environment) and does not see editable installs.
    """
    try:
        dist = _distribution("braintrace")
    except _PackageNotFoundError:
        return None
    return f"braintrace {dist.version}"


def _warn_if_shadowed(other: str | None = None) -> bool:
    """Warn once (``BraintraceDistributionWarning``) when another distribution also provides ``braintrace``.

    ``other``: the other distribution (default: looked up). Returns whether it warned.
    """
    global _SHADOW_WARNED
    other = _released_distribution() if other is None else other
    if other is None or _SHADOW_WARNED:
        return False
    _SHADOW_WARNED = True
    _warnings.warn(
        f"Two installed distributions provide the `braintrace` import: etp-nn {__version__} (the ETP libraries) and "
        f"{other} (the released library). The active one is etp-nn ({__file__}); which one Python imports depends on "
        "the order of sys.path, and installing one over the other mixes their files. Keep them in separate "
        "environments (uninstall one: `pip uninstall braintrace` or `pip uninstall etp-nn`).",
        BraintraceDistributionWarning,
        stacklevel=3,
    )
    return True


_warn_if_shadowed()

__all__ = [
    "__version__",
    "nn",
    "matmul",
    "element_wise",
    "conv",
    "sparse_matmul",
    "lora_matmul",
    "einsum",
    "grouped_matmul",
    "embedding",
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
    "ControlFlowPolicy",
    "CompilationRecord",
    "DiagnosticKind",
    "DiagnosticLevel",
    "ETraceGraph",
    "HiddenGroup",
    "HiddenParamOpRelation",
    "HiddenPerturbation",
    "ModuleInfo",
    "NotSupportedError",
    "add_hidden_perturbation_from_minfo",
    "add_hidden_perturbation_from_module",
    "add_hidden_perturbation_in_module",
    "compile_etrace_graph",
    "extract_module_info",
    "find_hidden_groups_from_minfo",
    "find_hidden_groups_from_module",
    "find_hidden_param_op_relations_from_minfo",
    "find_hidden_param_op_relations_from_module",
]
# the learners: all of etp_algorithms.__all__ (MultiStepData, SingleStepData, D_RTRL, ...), each name once
__all__ += [name for name in _etp_algorithms.__all__ if name != "__version__" and name not in __all__]
