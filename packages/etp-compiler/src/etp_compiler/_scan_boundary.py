"""The values a scan body's transition computes that the rest of the body reads (its *boundary*).

The body's *transition* is its equations on a path from the carried inputs to the carried outputs,
cut at the trainable ETP ops (their outputs held), as the unrolled step's hidden transition is.
A value on that path that an equation off it reads (``tanh(h)`` feeding a recurrent weight reads
``h``) is, unrolled, an escaping intermediate of the unit: e-prop's observable. A carried input
is one from the loop's second iteration on (the first reads the step's old state, which the
transition does not compute).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from ._compat import JaxprEqn, aval_dtype
from ._eval import is_var
from ._jaxpr_walk import is_trainable_etp
from ._reach import reach

__all__ = ["Boundary", "boundary_of"]


@dataclass(frozen=True, eq=False)
class Boundary:
    """One boundary value of a scan body: the var, whether it is a carried input, the equations off the path reading it."""

    var: Any
    carried: bool
    readers: frozenset[int]


def boundary_of(eqns: Sequence[JaxprEqn], carry_in: Sequence[Any], carry_out: Sequence[Any]) -> list[Boundary]:
    """The boundary values of a body (``eqns``, its carried inputs and outputs), in body order."""
    cut = {id(e) for e in eqns if is_trainable_etp(e)}
    forward = reach(eqns, {v for v in carry_in if is_var(v)}, cut=cut)
    backward = {v for v in carry_out if is_var(v)}
    on_path: set[int] = set()
    for eqn in reversed(eqns):
        if id(eqn) in cut:
            continue
        outs = [v for v in eqn.outvars if is_var(v)]
        if any(v in backward for v in outs) and any(v in forward for v in outs):
            on_path.add(id(eqn))
            backward.update(v for v in eqn.invars if is_var(v))
    path = {v for e in eqns if id(e) in on_path for v in e.outvars if is_var(v) and v in backward}
    path |= {v for v in carry_in if is_var(v) and v in backward}
    readers: dict[Any, set[int]] = {}
    for eqn in eqns:
        if id(eqn) in on_path:
            continue
        for v in eqn.invars:
            if is_var(v) and v in path:
                readers.setdefault(v, set()).add(id(eqn))
    carried = {v for v in carry_in if is_var(v)}
    return [
        Boundary(v, v in carried, frozenset(ids))
        for v, ids in readers.items()
        if jnp.issubdtype(aval_dtype(v), jnp.inexact)  # an observable has a learning signal
    ]
