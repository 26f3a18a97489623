"""Structural dependence in a step jaxpr: which variables a set of variables reaches.

A ``lax.scan`` is followed inside, its carried values to a fixpoint, so an equation of its body can
be cut like one of the step (an ETP op inside a scan propagated without unrolling is cut exactly as
its unrolled copies would be). Any other equation with sub-jaxprs passes dependence from every
input to every output (conservative).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ._compat import JaxprEqn, scan_layout
from ._eval import is_var
from ._jaxpr_walk import sub_jaxprs

__all__ = ["reach"]


def reach(
    eqns: Iterable[JaxprEqn], seeds: Iterable[Any], *, stop: Any = frozenset(), cut: Any = frozenset()
) -> set[Any]:
    """The variables that depend on ``seeds`` (the seeds included).

    Parameters
    ----------
    eqns : iterable of JaxprEqn
        Equations in order.
    seeds : iterable of Var
    stop : set of Var
        Variables that pass nothing on (they are reached, their users are not through them).
    cut : set of int
        ``id`` of equations that pass nothing on, inside scan bodies too.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from etp_compiler import reach
    >>> closed = jax.make_jaxpr(lambda a, b: (jnp.sin(a), b * 2.0))(1.0, 2.0)
    >>> jaxpr = closed.jaxpr
    >>> out_a, out_b = jaxpr.outvars
    >>> reached = reach(jaxpr.eqns, {jaxpr.invars[0]})
    >>> out_a in reached, out_b in reached
    (True, False)
    """
    reached = set(seeds)
    for eqn in eqns:
        if id(eqn) in cut:
            continue
        hit = [is_var(v) and v in reached and v not in stop for v in eqn.invars]
        if not any(hit):
            continue
        if eqn.primitive.name == "scan":
            flags = _scan_outputs(eqn, hit, cut)
            reached.update(v for v, f in zip(eqn.outvars, flags, strict=True) if f and is_var(v))
        else:
            reached.update(v for v in eqn.outvars if is_var(v))
    return reached


def _scan_outputs(eqn: JaxprEqn, hit: Sequence[bool], cut: Any) -> list[bool]:
    """Which outputs of a scan its reached inputs reach, through the body and the carried values."""
    (body, _), *_ = sub_jaxprs(eqn)
    n_consts, n_carry = scan_layout(eqn.params)
    flags = list(hit)
    while True:
        inner = reach(body.eqns, {v for v, f in zip(body.invars, flags, strict=True) if f}, cut=cut)
        out = [is_var(v) and v in inner for v in body.outvars]
        carried = [flags[n_consts + j] or out[j] for j in range(n_carry)]
        if carried == flags[n_consts : n_consts + n_carry]:
            return out
        flags[n_consts : n_consts + n_carry] = carried
