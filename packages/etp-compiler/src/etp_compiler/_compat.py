"""The one place where etp_compiler touches JAX internals (jaxpr types)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend.core import ClosedJaxpr, DebugInfo, Jaxpr, JaxprEqn, Literal, Var

__all__ = ["ClosedJaxpr", "Jaxpr", "JaxprEqn", "Literal", "Var", "new_jaxpr", "aval_shape", "aval_dtype"]


def new_jaxpr(
    constvars: Sequence[Var], invars: Sequence[Var], outvars: Sequence[Any], eqns: Sequence[JaxprEqn], name: str
) -> Jaxpr:
    """A :class:`Jaxpr` built from pieces of another, with the debug info recent JAX versions require."""
    return Jaxpr(
        list(constvars),
        list(invars),
        list(outvars),
        list(eqns),
        debug_info=DebugInfo("etp_compiler", name, None, None),
    )


def aval_shape(atom: Any) -> tuple[int, ...]:
    """The shape of a jaxpr variable or literal."""
    return tuple(atom.aval.shape)


def aval_dtype(atom: Any) -> Any:
    """The dtype of a jaxpr variable or literal."""
    return atom.aval.dtype
