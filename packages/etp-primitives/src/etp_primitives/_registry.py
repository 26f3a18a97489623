"""Global registries of ETP primitives and their rules.

Every registry is keyed by the primitive object itself: the compiler finds ETP
operations in a jaxpr by type identity (``eqn.primitive in ETP_PRIMITIVES``),
never by matching names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._compat import Primitive
    from ._spec import ETPPrimitiveSpec

__all__ = [
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
]

Rule = Callable[..., Any]

#: Every registered ETP primitive.
ETP_PRIMITIVES: set[Primitive] = set()
#: Primitives whose ``x`` carries leading batch axes (``etp_mm``, ``etp_conv``, ...).
BATCHED_PRIMITIVES: set[Primitive] = set()
#: Identity-like primitives the compiler walks through on ``y -> h`` (``etp_elemwise``).
GRADIENT_ENABLED_PRIMITIVES: set[Primitive] = set()

#: ``yw_to_w(hidden_dim, trace, **params) -> trace``: D-RTRL propagation factor.
ETP_RULES_YW_TO_W: dict[Primitive, Rule] = {}
#: ``xy_to_dw(x, hidden_dim, weights, **params) -> dW``: VJP w.r.t. the trainable inputs.
ETP_RULES_XY_TO_DW: dict[Primitive, Rule] = {}
#: ``init_drtrl(x_var, y_var, weight_vars, num_hidden_state) -> {key: zeros}``.
ETP_RULES_INIT_DRTRL: dict[Primitive, Rule] = {}
#: ``init_pp(x_var, y_var, weight_vars, num_hidden_state) -> zeros``.
ETP_RULES_INIT_PP: dict[Primitive, Rule] = {}
#: Optional ``drtrl_seed(x, hidden_dim, weights, **params) -> trace`` (see :mod:`etp_primitives._trace`).
ETP_RULES_DRTRL_SEED: dict[Primitive, Rule] = {}
#: Optional ``drtrl_grad(x, cotangent, trace, weights, **params) -> dW``.
ETP_RULES_DRTRL_GRAD: dict[Primitive, Rule] = {}

#: ``params -> {trainable_key: invar_index}`` per primitive.
ETP_TRAINABLE_INVARS_FNS: dict[Primitive, Callable[[dict[str, Any]], dict[str, int]]] = {}
#: Position of the non-trainable input ``x`` in ``eqn.invars`` (``None``: no input).
ETP_X_INVAR_INDICES: dict[Primitive, int | None] = {}
#: Position of ``y`` in ``eqn.outvars``.
ETP_Y_OUTVAR_INDICES: dict[Primitive, int] = {}
#: The spec each primitive was registered from, when it came through a spec.
ETP_PRIMITIVE_SPECS: dict[Primitive, ETPPrimitiveSpec] = {}


def is_etp_primitive(primitive: object) -> bool:
    """Return whether ``primitive`` is a registered ETP primitive."""
    return primitive in ETP_PRIMITIVES


def is_batched_primitive(primitive: object) -> bool:
    """Return whether ``primitive`` was registered with ``batched=True``."""
    return primitive in BATCHED_PRIMITIVES


def is_gradient_enabled_primitive(primitive: object) -> bool:
    """Return whether ``primitive`` was registered with ``gradient_enabled=True``."""
    return primitive in GRADIENT_ENABLED_PRIMITIVES
