"""The one place where etp_compiler touches JAX and brainstate internals (jaxpr types, state tracing).

JAX 0.11 merged ``ClosedJaxpr`` into ``Jaxpr``: a jaxpr now carries its constants' values,
its ``constvars`` are exactly the inputs with values attached, and a jaxpr built with
constvars but without values treats them as leading ``invars``. The compiler cuts jaxprs
out of a traced step whose constants are bound only when the slice is evaluated, so it keeps
them in :class:`OpenJaxpr`, which holds constvars and invars apart on every JAX version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import brainstate
from jax.extend.core import DebugInfo, Jaxpr, JaxprEqn, Literal, Var

# isort: off
# jax < 0.11: a class of its own; jax >= 0.11: an alias of Jaxpr that type checkers do not see as exported
from jax.extend.core import ClosedJaxpr  # type: ignore[attr-defined, unused-ignore]

# isort: on

__all__ = [
    "scan_layout",
    "ClosedJaxpr",
    "Jaxpr",
    "JaxprEqn",
    "Literal",
    "OpenJaxpr",
    "Var",
    "aval_dtype",
    "aval_shape",
    "new_jaxpr",
    "replace_params",
    "trace_stateful",
]


@dataclass(frozen=True, eq=False)
class OpenJaxpr:
    """A slice of a traced step: equations, with constant inputs bound only at evaluation.

    Evaluate it with :meth:`evaluate` (constants' values, then arguments); ``str()`` prints
    it as a JAX jaxpr whose leading inputs are the constvars, and :meth:`as_jaxpr` returns
    that jaxpr, which ``jax.core.eval_jaxpr(j, [], *consts, *args)`` evaluates on every
    JAX version.

    Attributes
    ----------
    constvars : tuple of Var
        Inputs that are constants of the slice (values of the enclosing step).
    invars : tuple of Var
        The slice's arguments.
    outvars : tuple
        Its results (variables or literals).
    eqns : tuple of JaxprEqn
        Its equations, in evaluation order.
    name : str
        What the slice computes (shown in error messages and printouts).
    """

    constvars: tuple[Var, ...]
    invars: tuple[Var, ...]
    outvars: tuple[Any, ...]
    eqns: tuple[JaxprEqn, ...]
    name: str

    def as_jaxpr(self) -> Jaxpr:
        """A JAX :class:`~jax.extend.core.Jaxpr` with the constvars as its leading inputs."""
        return Jaxpr(
            [],
            [*self.constvars, *self.invars],
            list(self.outvars),
            list(self.eqns),
            debug_info=DebugInfo("etp_compiler", self.name, None, None),
        )

    def evaluate(self, consts: Sequence[Any], *args: Any) -> list[Any]:
        """The slice's results for the constants' values ``consts`` and the arguments ``args``.

        The same as :func:`etp_compiler.eval_jaxpr` ``(self, consts, *args)``.

        Raises
        ------
        TypeError
            If the numbers of constants or arguments differ from the slice's (the message names it).
        """
        from ._eval import eval_jaxpr  # the evaluator imports this module

        return eval_jaxpr(self, consts, *args)

    def __str__(self) -> str:
        return str(self.as_jaxpr())

    def __repr__(self) -> str:
        return (
            f"OpenJaxpr({self.name!r}: {len(self.constvars)} constvars, {len(self.invars)} invars, "
            f"{len(self.outvars)} outvars, {len(self.eqns)} eqns)"
        )


def new_jaxpr(
    constvars: Sequence[Var], invars: Sequence[Var], outvars: Sequence[Any], eqns: Sequence[JaxprEqn], name: str
) -> OpenJaxpr:
    """An :class:`OpenJaxpr` built from pieces of a traced step."""
    return OpenJaxpr(tuple(constvars), tuple(invars), tuple(outvars), tuple(eqns), name)


def aval_shape(atom: Any) -> tuple[int, ...]:
    """The shape of a jaxpr variable or literal."""
    return tuple(atom.aval.shape)


def aval_dtype(atom: Any) -> Any:
    """The dtype of a jaxpr variable or literal."""
    return atom.aval.dtype


def trace_stateful(model: Any, *args: Any, **kwargs: Any) -> tuple[Any, ClosedJaxpr, tuple[Any, ...], set[int], Any]:
    """Trace one call of ``model`` with brainstate's state tracing.

    Returns ``(the StatefulFunction, closed jaxpr, states in input order, ids of the states written,
    output treedef)``;
    the jaxpr's inputs are the arguments' leaves then every state's leaves, its outputs the
    call's outputs then the written states' new leaves.
    """
    stateful_fn = brainstate.transform.StatefulFunction(model)
    traced = stateful_fn.get_jaxpr(*args, **kwargs)
    states = tuple(stateful_fn.get_states(*args, **kwargs))
    write_ids = {id(s) for s in stateful_fn.get_write_states(*args, **kwargs)}
    return stateful_fn, traced, states, write_ids, stateful_fn.get_out_treedef(*args, **kwargs)


def replace_params(eqn: JaxprEqn, **params: Any) -> JaxprEqn:
    """``eqn`` with some of its parameters replaced (same inputs, outputs and primitive)."""
    replaced: JaxprEqn = eqn.replace(params={**eqn.params, **params})
    return replaced


def scan_layout(params: Any) -> tuple[int, int]:
    """``(number of constants, number of carry values)`` of a ``scan`` equation, from its parameters.

    jax <= 0.10 stores ``num_consts`` / ``num_carry``; jax 0.12 stores the groups of its inputs
    (constants, carry, scanned) as ``ft_in``, one entry per input.
    """
    if "num_consts" in params:
        return int(params["num_consts"]), int(params["num_carry"])
    groups = params["ft_in"]
    # a jax FlatTree iterates over its leaves; unpack() gives its three groups (each sized by its leaves)
    consts, carry, _ = groups.unpack() if hasattr(groups, "unpack") else groups
    return len(consts), len(carry)
