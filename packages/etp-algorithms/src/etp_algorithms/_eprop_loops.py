r"""e-prop's observables inside a ``lax.scan`` kept as a loop.

Unrolled, a value that a sub-step's transition computes and the rest of the step reads (the state
:math:`h_k` that :math:`\tanh(h_k)` feeding a recurrent weight inside the loop reads) is an
escaping intermediate of the unit: an observable with its own local Jacobians and learning
signal. A loop hides it, so the compiler keeps every such *boundary value* of the body
(:class:`~etp_compiler.ModuleInfo` ``.descent_scans``: ``boundary_stack_var(i)``, the values of all
sub-steps, and ``boundary_eps_var(i)``, zeros added where the rest of the body reads it). The
observable of sub-step :math:`k` is slot :math:`k` of the stack; its local Jacobians come from the
held loop like the hidden state's; its learning signal is

.. math::

    L^t_{b_k} = \frac{\partial L^t}{\partial \epsilon_{b,k}},

the cotangent of its uses off the transition, as the unrolled step's is. A carried value is one
from the loop's second iteration on: the first reads the step's old state, which the transition
does not compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from etp_compiler import ETraceGraph, NotSupportedError, bind_eqn, eval_eqns, read_atom

__all__ = ["loop_cotangents", "loop_observables"]

#: ``(stacked boundary var, sub-step)``: one observable inside a kept loop.
LoopKey = tuple[Any, int]


def loop_observables(graph: ETraceGraph, label: str) -> dict[int, list[LoopKey]]:
    """``group index -> [(stack var, k)]``: the observables inside kept loops, sub-step-major.

    Raises ``NotSupportedError`` when a loop with boundary values drives more than one hidden
    group (which unit each value belongs to is then not one).
    """
    relations = graph.hidden_param_op_relations
    result: dict[int, list[LoopKey]] = {}
    for scan in graph.module_info.descent_scans:
        if not scan.boundary_carried:
            continue
        deltas = {id(scan.delta_var(r)) for r in range(len(scan.etp_eqns))}
        groups = {
            g.index
            for r in relations
            if r.substep is not None and id(r.substep.delta_var) in deltas
            for g in r.hidden_groups
        }
        if not groups:
            continue
        if len(groups) != 1:
            raise NotSupportedError(
                f"{label}: a lax.scan of length {scan.length} kept as a loop drives hidden groups {sorted(groups)} "
                "and the rest of its body reads values its transition computes; which unit each belongs to is not "
                "one. Unroll it: control_flow=ControlFlowPolicy(scan_descent='unroll')."
            )
        # a carried value's first iteration reads the step's old state: no observable there
        order = range(scan.length - 1, -1, -1) if scan.reverse else range(scan.length)
        keys = [
            (scan.boundary_stack_var(i), k)
            for k in order
            for i, carried in enumerate(scan.boundary_carried)
            if k != scan.first_slot or not carried
        ]
        result.setdefault(groups.pop(), []).extend(keys)
    return result


def loop_cotangents(
    graph: ETraceGraph, keys: Sequence[LoopKey], env: Mapping[Any, Any], output_cotangents: Sequence[Any]
) -> dict[LoopKey, jax.Array]:
    r"""``(stack var, k) ->`` :math:`L^t_{b_k}` (module docstring) from the cotangents of the step's outputs."""
    if not keys:
        return {}
    minfo = graph.module_info
    eps_of = {
        id(scan.boundary_stack_var(i)): scan.boundary_eps_var(i)
        for scan in minfo.descent_scans
        for i in range(len(scan.boundary_carried))
    }
    wanted = {id(eps_of[id(stack)]): eps_of[id(stack)] for stack, _ in keys}  # id(eps var) -> eps var
    floating = [i for i, v in enumerate(minfo.out_vars) if jnp.issubdtype(v.aval.dtype, jnp.inexact)]
    inputs = {v: env[v] for v in (*minfo.jaxpr.constvars, *minfo.jaxpr.invars)}

    def outputs(added: dict[int, Any]) -> list[Any]:
        def bind(eqn: Any, args: Sequence[Any]) -> list[Any]:
            # the loop (and its twin) reads each eps var as an input: the perturbation goes in there
            args = [
                a + added[id(v)] if id(v) in added and v is wanted[id(v)] else a
                for v, a in zip(eqn.invars, args, strict=True)
            ]
            return bind_eqn(eqn, args)

        scope = eval_eqns(minfo.jaxpr.eqns, dict(inputs), bind=bind)
        return [read_atom(scope, minfo.out_vars[i]) for i in floating]

    zeros = {key: jnp.zeros_like(env[eps]) for key, eps in wanted.items()}
    _, pullback = jax.vjp(outputs, zeros)
    cts = [jnp.asarray(output_cotangents[i], dtype=minfo.out_vars[i].aval.dtype) for i in floating]
    (grads,) = pullback(cts)
    return {(stack, k): grads[id(eps_of[id(stack)])][k] for stack, k in keys}
