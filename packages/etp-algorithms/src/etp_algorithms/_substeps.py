r"""Re-running a step with the output of an op inside a kept scan changed.

An ETP op inside a ``lax.scan`` that the compiler keeps as a loop (a relation with a
:class:`etp_compiler.SubStep`) has no equation of its own per sub-step in the step jaxpr: one body
equation serves all :math:`K` sub-steps. Its output of sub-step :math:`k` enters the loop as
:math:`y_k + \delta_k`, with :math:`\delta` (``SubStep.delta_var``, zeros) a scanned input of the
loop. A learner that re-evaluates the step with :math:`y_k` changed by :math:`\Delta` (to
differentiate with respect to it, or to put another trainable input into that sub-step's op) adds
:math:`\Delta` to slot :math:`k` of :math:`\delta` instead: :func:`shifted_bind`.

A trainable input :math:`\theta` of sub-step :math:`k` enters the same way, to first order:
:math:`\Delta = \mathrm{op}(x_k, \theta) - \mathrm{op}(x_k, \theta^t)` at this step's :math:`x_k`
(:func:`output_shift`). At this step's inputs the value and the first derivatives (with respect to
:math:`\theta` and to the old hidden states) are those of the unrolled step, which is where the
learners differentiate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import etp_primitives as etp
from etp_compiler import ETraceGraph, HiddenParamOpRelation, NotSupportedError, bind_eqn, read_atom

from ._executor import StepValues

__all__ = ["EqnBinder", "output_shift", "shifted_bind", "substep_output"]

EqnBinder = Callable[[Any, Sequence[Any]], list[Any]]


def substep_output(
    relation: HiddenParamOpRelation,
    env: Mapping[Any, Any],
    trainable: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """The op's output of the relation's sub-step at this step's ``x_k`` (``env``: the step's values), with some
    trainable inputs replaced.

    Raises ``NotSupportedError`` for an input of the op (other than ``x``) that the loop computes.
    """
    sub = relation.substep
    if sub is None:
        raise ValueError(f"the relation of weight {relation.weight_path} is not inside a scan kept as a loop.")
    trainable = trainable or {}
    eqn = relation.eqn
    layout = {i: key for key, i in etp.trainable_invars(eqn.primitive, eqn.params).items()}
    x_index = etp.ETP_X_INVAR_INDICES.get(eqn.primitive)
    args = []
    for i, atom in enumerate(sub.eqn_inputs):
        if i in layout and layout[i] in trainable:
            args.append(trainable[layout[i]])
        elif i == x_index:
            args.append(env[sub.x_stack_var][sub.index])
        elif atom is not None:
            args.append(read_atom(env, atom))
        else:
            raise NotSupportedError(
                f"the ETP primitive {eqn.primitive.name} of weight {'.'.join(map(str, relation.weight_path))} inside "
                f"a lax.scan of length {sub.length} reads input {i}, which the loop computes; its sub-step cannot be "
                "re-evaluated on its own. Unroll the loop (ControlFlowPolicy(scan_descent='unroll'))."
            )
    y_index = etp.ETP_Y_OUTVAR_INDICES.get(eqn.primitive, 0)
    y: jax.Array = bind_eqn(eqn, args)[y_index]
    return y


def output_shift(relation: HiddenParamOpRelation, values: StepValues, trainable: Mapping[str, jax.Array]) -> jax.Array:
    r""":math:`\mathrm{op}(x_k, \theta) - \mathrm{op}(x_k, \theta^t)`: the change of the sub-step's output."""
    return substep_output(relation, values.env, trainable) - substep_output(relation, values.env)


def _delta_sites(graph: ETraceGraph) -> dict[int, list[tuple[int, int]]]:
    """``id(delta var) -> [(id(scan equation), input position)]``: each kept scan of the step, and its twin."""
    deltas = {
        id(r.substep.delta_var): r.substep.delta_var for r in graph.hidden_param_op_relations if r.substep is not None
    }
    minfo = graph.module_info
    sites: dict[int, list[tuple[int, int]]] = {}
    for eqn in dict.fromkeys((*minfo.jaxpr.eqns, *minfo.held_eqns)):
        for position, v in enumerate(eqn.invars):
            if id(v) in deltas and deltas[id(v)] is v:
                sites.setdefault(id(v), []).append((id(eqn), position))
    return sites


def shifted_bind(graph: ETraceGraph, shifts: Mapping[int, jax.Array], bind: EqnBinder = bind_eqn) -> EqnBinder:
    """A binder for :func:`etp_compiler.eval_eqns` that adds ``shifts[index]`` to the output of relation ``index``.

    It acts on the step's equations and on :attr:`etp_compiler.ModuleInfo.held_eqns` alike.

    Every key must be a relation with a sub-step; its shift has the op's output shape.
    """
    sites = _delta_sites(graph)
    relations = graph.hidden_param_op_relations
    plan: dict[int, list[tuple[int, int, jax.Array]]] = {}
    for index, shift in shifts.items():
        sub = relations[index].substep
        if sub is None:
            raise ValueError(f"shifted_bind: relation {index} is not inside a scan kept as a loop.")
        for eqn_id, position in sites[id(sub.delta_var)]:
            plan.setdefault(eqn_id, []).append((position, sub.index, shift))

    def shifted(eqn: Any, args: Sequence[Any]) -> list[Any]:
        entries = plan.get(id(eqn))
        if entries:
            args = list(args)
            for position, k, shift in entries:
                delta = jnp.asarray(args[position])
                args[position] = delta.at[k].add(jnp.asarray(shift, delta.dtype))
        return bind(eqn, args)

    return shifted
