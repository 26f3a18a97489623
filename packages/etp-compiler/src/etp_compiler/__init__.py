"""etp_compiler: from a brainstate model to an :class:`ETraceGraph`, with diagnostics.

Four stages, each a public function with a typed result:

1. :func:`extract_module_info` -> :class:`ModuleInfo` (the traced step, states, var <-> path maps);
2. :func:`find_hidden_groups_from_minfo` -> :class:`HiddenGroup` list (transitions, Jacobian blocks);
3. :func:`find_hidden_param_op_relations_from_minfo` -> :class:`HiddenParamOpRelation` list;
4. :func:`add_hidden_perturbation_from_minfo` -> :class:`HiddenPerturbation`.

:func:`compile_etrace_graph` runs all four and records every decision as a
:class:`CompilationRecord` (``graph.diagnostics``, ``graph.explain()``;
:class:`CompilationReport` summarises a graph as data and text);
:func:`hidden_group_stage` and :func:`relation_stage` return stages 2 and 3's
results together with their records. Every re-evaluation of a jaxpr goes
through :func:`eval_jaxpr` (atoms read with :func:`read_atom`), and
:class:`ModuleInfo` owns the order of the step jaxpr's inputs and outputs
(:meth:`ModuleInfo.flatten_inputs`, :meth:`ModuleInfo.read_outputs`).
"""

# Before anything imports JAX-dependent code: a clear error for an unsupported JAX/brainstate.
from etp_primitives.versions import check_installed as _check_installed

_check_installed("etp-compiler", ("jax", "brainstate", "numpy"))

import sys as _sys
import warnings as _warnings
from importlib.metadata import version as _distribution_version

import jax as _jax

# brainstate 0.5 sets jax_enable_x64 to False when it is first imported: notice a user's float64 lost that way
_x64_asked = bool(_jax.config.read("jax_enable_x64")) and "brainstate" not in _sys.modules

from ._compat import OpenJaxpr
from ._control_flow import ControlFlowPolicy
from ._diagnostics import CompilationRecord, DiagnosticKind, DiagnosticLevel
from ._errors import CompilationError, NotSupportedError
from ._eval import bind_eqn, eval_eqns, eval_jaxpr, is_var, read_atom
from ._graph import (
    ETraceGraph,
    add_hidden_perturbation_from_module,
    add_hidden_perturbation_in_module,
    compile_etrace_graph,
    find_hidden_groups_from_module,
    find_hidden_param_op_relations_from_module,
)
from ._hidden_groups import HiddenGroup, find_hidden_groups_from_minfo, hidden_group_stage
from ._module_info import ModuleInfo, StatePath, WeightLeaf, extract_module_info
from ._perturbation import HiddenPerturbation, add_hidden_perturbation_from_minfo, run_step
from ._reach import reach
from ._relations import (
    HiddenParamOpRelation,
    RelationItem,
    SubStep,
    build_producers,
    find_hidden_param_op_relations_from_minfo,
    relation_stage,
    trace_var_to_params,
)
from ._report import CompilationReport

__version__ = _distribution_version("etp-compiler")

if _x64_asked and not _jax.config.read("jax_enable_x64"):
    _warnings.warn(
        "jax_enable_x64 was True before ETP was imported, and importing brainstate (which ETP uses) set it back "
        "to False, so arrays are float32 from here on. To compute in float64, import ETP (or brainstate) "
        "first and then call jax.config.update('jax_enable_x64', True), or use "
        "brainstate.environ.set(precision=64).",
        UserWarning,
        stacklevel=2,
    )
# one source: the distribution's pyproject

__all__ = [
    "__version__",
    "CompilationError",
    "NotSupportedError",
    "CompilationRecord",
    "CompilationReport",
    "DiagnosticKind",
    "DiagnosticLevel",
    "ETraceGraph",
    "HiddenGroup",
    "HiddenParamOpRelation",
    "SubStep",
    "HiddenPerturbation",
    "ModuleInfo",
    "OpenJaxpr",
    "RelationItem",
    "StatePath",
    "WeightLeaf",
    "build_producers",
    "bind_eqn",
    "ControlFlowPolicy",
    "eval_eqns",
    "eval_jaxpr",
    "is_var",
    "read_atom",
    "reach",
    "add_hidden_perturbation_from_minfo",
    "add_hidden_perturbation_from_module",
    "add_hidden_perturbation_in_module",
    "compile_etrace_graph",
    "extract_module_info",
    "find_hidden_groups_from_minfo",
    "find_hidden_groups_from_module",
    "find_hidden_param_op_relations_from_minfo",
    "find_hidden_param_op_relations_from_module",
    "hidden_group_stage",
    "relation_stage",
    "run_step",
    "trace_var_to_params",
]
