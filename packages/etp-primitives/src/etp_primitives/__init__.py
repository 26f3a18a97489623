"""etp_primitives: JAX primitives that mark weight operations for eligibility-trace propagation.

A parameter takes part in online learning exactly when it flows through one
of these primitives. Each primitive behaves like the plain JAX op it wraps
under every transformation, and carries the ETP rules that the compiler and
the learning algorithms use to build and contract eligibility traces.

The top level holds the operations, the built-in primitives and the
registration functions; :mod:`etp_primitives.extend` is the door for rule and
primitive authors (registries, predicates, rule helpers and the rule
contract), whose names stay importable from here as well.
"""

# Before anything imports JAX-dependent code: a clear error for an unsupported JAX/brainstate.
from .versions import check_installed as _check_installed

_check_installed("etp-primitives", ("jax", "saiunit", "numpy"))

from importlib.metadata import version as _distribution_version

from . import extend as extend
from ._primitive import (
    ETPPrimitive,
    default_trainable_invars,
    get_primitive_spec,
    register_primitive,
    register_primitive_spec,
    set_batching_rule,
    unregister_primitive,
)
from ._spec import ETPPrimitiveSpec

# Rule and primitive authors' names: documented in etp_primitives.extend, importable from here too
# (the seed documents use them from the top level).
from .extend import (
    BATCHED_PRIMITIVES,
    ETP_PRIMITIVE_SPECS,
    ETP_PRIMITIVES,
    ETP_RULES_DRTRL_GRAD,
    ETP_RULES_DRTRL_SEED,
    ETP_RULES_INIT_DRTRL,
    ETP_RULES_INIT_PP,
    ETP_RULES_XY_TO_DW,
    ETP_RULES_YW_TO_W,
    ETP_TRAINABLE_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    ETP_Y_OUTVAR_INDICES,
    GRADIENT_ENABLED_PRIMITIVES,
    RULE_NAMES,
    aval_of,
    derive_xy_to_dw,
    drtrl_grad,
    drtrl_seed,
    init_pp_like_output,
    is_batched_primitive,
    is_etp_primitive,
    is_gradient_enabled_primitive,
    pairwise_sum,
    require_rules,
    sum_leading_axes,
    trainable_invars,
)
from .ops import (
    EMBEDDING_MODES,
    EinsumLayout,
    SparseStructure,
    conv,
    einsum,
    einsum_layout,
    element_wise,
    embedding,
    etp_conv_p,
    etp_einsum_p,
    etp_elemwise_p,
    etp_embedding_p,
    etp_grouped_mm_p,
    etp_grouped_mv_p,
    etp_lora_mm_p,
    etp_lora_mv_p,
    etp_mm_p,
    etp_mv_p,
    etp_sp_mm_p,
    etp_sp_mv_p,
    grouped_matmul,
    lora_matmul,
    matmul,
    sparse_matmul,
)

__version__ = _distribution_version("etp-primitives")  # one source: the distribution's pyproject

__all__ = [
    "__version__",
    # user-facing functions
    "matmul",
    "element_wise",
    "conv",
    "sparse_matmul",
    "lora_matmul",
    "einsum",
    "grouped_matmul",
    "embedding",
    "SparseStructure",
    "EinsumLayout",
    "einsum_layout",
    "EMBEDDING_MODES",
    # built-in primitives
    "etp_mm_p",
    "etp_mv_p",
    "etp_elemwise_p",
    "etp_conv_p",
    "etp_sp_mm_p",
    "etp_sp_mv_p",
    "etp_lora_mm_p",
    "etp_lora_mv_p",
    "etp_einsum_p",
    "etp_grouped_mm_p",
    "etp_grouped_mv_p",
    "etp_embedding_p",
    # registration
    "ETPPrimitive",
    "register_primitive",
    "unregister_primitive",
    "set_batching_rule",
    "default_trainable_invars",
    "ETPPrimitiveSpec",
    "register_primitive_spec",
    "get_primitive_spec",
    # registries and predicates: live, read-only views of the primitive records (documented in
    # etp_primitives.extend, listed here too because `from etp_primitives import *` re-exports them
    # in braintrace._etrace_op, where the seed documents import them)
    "ETP_PRIMITIVES",
    "BATCHED_PRIMITIVES",
    "GRADIENT_ENABLED_PRIMITIVES",
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
    "is_etp_primitive",
    "is_batched_primitive",
    "is_gradient_enabled_primitive",
    # rule helpers (documented in etp_primitives.extend)
    "RULE_NAMES",
    "require_rules",
    "trainable_invars",
    "drtrl_seed",
    "drtrl_grad",
    "sum_leading_axes",
    "pairwise_sum",
    "aval_of",
    "init_pp_like_output",
    "derive_xy_to_dw",
]
