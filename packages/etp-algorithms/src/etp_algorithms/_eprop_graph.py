r"""What e-prop needs from a compiled graph: each unit's observables, their local Jacobians, their learning signals.

A hidden group's transition (the step's equations from the group's old hidden states to its new
ones, cut at the trainable ETP ops, whose outputs :math:`y_r` are held fixed) is the *unit*. Its
*observables* :math:`o` are

* its new hidden states :math:`h^t_s`, and
* every value the transition computes that the rest of the step reads (the *escaping*
  intermediates): :class:`etp_nn.LIF`'s spike :math:`z^t = f(V'^t)`, computed from the potential
  before the reset, which the stored :math:`V^t` does not carry.

For each observable the step gives, per position, the local Jacobians
:math:`J_{o,s'} = \partial o^t/\partial h^{t-1}_{s'}` and :math:`D_{f,o,r} = \partial o^t/\partial y_r^t`
(:func:`local_jacobians`), and in the backward pass the learning signal
:math:`L^t_o = \partial L^t/\partial o^t` within step :math:`t`: for a hidden state the cotangent of
the new state, for an escaping intermediate the cotangent of its uses outside the transition only
(:func:`escaping_cotangents`), so no route is counted twice. An observable is *emitted* when the
step's outputs read it within the step (an escaping intermediate always; a new hidden state when an
equation outside the transition or an output reads it): random feedback goes to those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from etp_compiler import ETraceGraph, NotSupportedError, StatePath, bind_eqn, is_var, read_atom

from ._eprop_loops import loop_observables
from ._hidden_only import output_source, reach

__all__ = ["GroupObservables", "escaping_cotangents", "local_jacobians", "observables_of"]


@dataclass(frozen=True, eq=False)
class GroupObservables:
    """The observables of one hidden group (static).

    Attributes
    ----------
    group : int
        The group's index.
    vars : tuple of Var
        The observables: the group's new hidden states (its ``hidden_paths`` order), then the
        escaping intermediates (step order).
    paths : tuple of (state path or None)
        The hidden path of each observable; ``None`` for an escaping intermediate.
    emitted : tuple of bool
        Whether the step reads the observable outside the group's transition (or returns it).
    relations : tuple of int
        The relations driving the group (their ``y`` are sources of the local Jacobians).
    eqns : tuple of JaxprEqn
        The step's equations from the old hidden states and the relations' outputs to the observables.
    slots : tuple of (int or None)
        For an observable inside a scan kept as a loop (:mod:`etp_algorithms._eprop_loops`), its
        sub-step in the stacked var; ``None`` for the others (``()``: none inside a loop).
    """

    group: int
    vars: tuple[Any, ...]
    paths: tuple[StatePath | None, ...]
    emitted: tuple[bool, ...]
    relations: tuple[int, ...]
    eqns: tuple[Any, ...]
    slice_ids: frozenset[int]
    slots: tuple[int | None, ...] = ()

    @property
    def keys(self) -> tuple[Any, ...]:
        """Each observable's key: its var, or ``(stacked var, sub-step)`` inside a kept loop."""
        slots = self.slots or (None,) * len(self.vars)
        return tuple(v if k is None else (v, k) for v, k in zip(self.vars, slots, strict=True))

    @property
    def intermediates(self) -> tuple[Any, ...]:
        """The escaping intermediates outside kept loops (observables without a hidden path or a slot)."""
        return tuple(k for k, p in zip(self.keys, self.paths, strict=True) if p is None and not isinstance(k, tuple))

    @property
    def loop_keys(self) -> tuple[Any, ...]:
        """The observables inside kept loops, as ``(stacked var, sub-step)``."""
        return tuple(k for k in self.keys if isinstance(k, tuple))


def _text(path: Sequence[Any]) -> str:
    return ".".join(map(str, path))


def _slice(eqns: Sequence[Any], sources: Sequence[Any], targets: Sequence[Any], cut: set[int]) -> list[Any]:
    """The equations on paths from ``sources`` to ``targets`` (equations in ``cut`` pass nothing)."""
    seeds = set(sources)
    reached = reach(eqns, seeds, stop=set(), cut=cut)
    needed = {v for v in targets if is_var(v)}
    chosen = []
    for eqn in reversed(eqns):
        if id(eqn) in cut:
            continue
        # the producer of a source (a kept scan's delta) is not on a path from the sources
        produced = [v for v in eqn.outvars if is_var(v) and v not in seeds]
        if any(v in needed for v in produced) and any(v in reached for v in produced):
            chosen.append(eqn)
            needed.update(v for v in eqn.invars if is_var(v) and v in reached)
    chosen.reverse()
    return chosen


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in var.aval.shape)


def observables_of(graph: ETraceGraph, label: str = "EProp") -> tuple[GroupObservables, ...]:
    """The :class:`GroupObservables` of every group driven by a relation (graph order of the groups).

    Raises ``NotSupportedError`` for a group with escaping intermediates whose transition is not
    position-wise, or an intermediate not of the group's shape (its local Jacobian is per unit),
    and for a scan kept as a loop whose ops read values it carries, when it drives several groups.
    """
    minfo = graph.module_info
    in_loops = loop_observables(graph, label)
    eqns = list(minfo.held_eqns)  # a scan kept as a loop holds its ops' outputs, as the transition does
    relations = graph.hidden_param_op_relations
    cut = {id(r.eqn) for r in relations}
    outputs = {v for v in minfo.out_vars if is_var(v)}
    for outvars in minfo.state_outvars.values():
        outputs.update(v for v in outvars if is_var(v))
    driving: dict[int, list[int]] = {}
    groups = {}
    for index, relation in enumerate(relations):
        for group in relation.hidden_groups:
            driving.setdefault(group.index, []).append(index)
            groups[group.index] = group
    result = []
    for gindex in sorted(driving):
        group = groups[gindex]
        slice_eqns = list(group.transition_jaxpr.eqns)
        slice_ids = {id(e) for e in slice_eqns}
        hidden_out = list(group.hidden_outvars)
        read_outside = {v for e in eqns if id(e) not in slice_ids for v in e.invars if is_var(v)}
        read_outside |= outputs - set(minfo.hidden_path_to_outvar.values())
        read_outside |= {v for v in minfo.out_vars if is_var(v)}
        escaping = [v for e in slice_eqns for v in e.outvars if is_var(v) and v not in hidden_out and v in read_outside]
        escaping = list(dict.fromkeys(escaping))
        names = ", ".join(_text(p) for p in group.hidden_paths)
        if escaping and not group.is_positionwise:
            raise NotSupportedError(
                f"{label}: the transition of hidden group {gindex} ({names}) mixes positions and computes values "
                "the rest of the step reads (such as a spike); e-prop's eligibility traces are per unit, so that "
                "group is not supported. Keep the neuron dynamics element-wise (weights through ETP ops)."
            )
        looped = in_loops.get(gindex, [])
        if looped and not group.is_positionwise:
            raise NotSupportedError(
                f"{label}: the transition of hidden group {gindex} ({names}) mixes positions and, inside a lax.scan "
                "kept as a loop, feeds values it computes to ETP ops; e-prop's eligibility traces are per unit, so "
                "that group is not supported. Unrolled, the loop may leave separate units: "
                "control_flow=ControlFlowPolicy(scan_descent='unroll')."
            )
        for shape in [*(_shape(v) for v in escaping), *(_shape(v)[1:] for v, _ in looped)]:
            if shape != tuple(group.varshape):
                raise NotSupportedError(
                    f"{label}: hidden group {gindex} ({names}, shape {tuple(group.varshape)}) computes a value of "
                    f"shape {shape} that the rest of the step reads; e-prop needs each unit's observables of "
                    "the unit's shape (one learning signal per unit)."
                )
        obs = [*hidden_out, *escaping, *(v for v, _ in looped)]
        sources = [*group.hidden_invars, *dict.fromkeys(output_source(relations[i]) for i in driving[gindex])]
        local = _slice(eqns, sources, obs, cut)
        n_plain = len(hidden_out) + len(escaping)
        # a value inside a kept loop is read by an ETP op, outside the unit's transition: emitted
        emitted = tuple(v in read_outside for v in obs[:n_plain]) + (True,) * len(looped)
        paths: tuple[StatePath | None, ...] = (*group.hidden_paths, *(None for _ in [*escaping, *looped]))
        slots = (None,) * n_plain + tuple(k for _, k in looped) if looped else ()
        result.append(
            GroupObservables(
                gindex, tuple(obs), paths, emitted, tuple(driving[gindex]), tuple(local), frozenset(slice_ids), slots
            )
        )
    return tuple(result)


def local_jacobians(
    graph: ETraceGraph, obs: GroupObservables, env: Mapping[Any, Any]
) -> tuple[list[list[jax.Array]], list[dict[int, jax.Array]]]:
    r"""Per observable :math:`o`: ``J[o][s']`` :math:`= \partial o/\partial h_{s'}^{t-1}` and ``Df[o][r]``
    :math:`= \partial o/\partial y_r`, per position (each of the group's shape), at this step's values ``env``."""
    group = next(g for r in graph.hidden_param_op_relations for g in r.hidden_groups if g.index == obs.group)
    relations = graph.hidden_param_op_relations
    hidden_in = list(group.hidden_invars)
    # an op inside a scan kept as a loop: its y_k is slot k of the loop's delta
    y_sources = list(dict.fromkeys(output_source(relations[i]) for i in obs.relations))
    sources = [*hidden_in, *y_sources]

    def local(*values: Any) -> list[Any]:
        scope = dict(env)
        for var, value in zip(sources, values, strict=True):
            scope[var] = value
        for eqn in obs.eqns:
            outs = bind_eqn(eqn, [read_atom(scope, v) for v in eqn.invars])
            for var, value in zip(eqn.outvars, outs, strict=True):
                if is_var(var):
                    scope[var] = value
        slots = obs.slots or (None,) * len(obs.vars)
        return [
            jnp.broadcast_to(read_atom(scope, v) if k is None else read_atom(scope, v)[k], group.varshape)
            for v, k in zip(obs.vars, slots, strict=True)
        ]

    primals = [jnp.asarray(env[v]) for v in sources]
    _, linear = jax.linearize(local, *primals)

    def column(k: int, slot: int | None = None) -> Any:
        tangent = [jnp.zeros_like(p) for p in primals]
        tangent[k] = jnp.ones_like(primals[k]) if slot is None else tangent[k].at[slot].set(1)
        return linear(*tangent)

    n_state = len(hidden_in)
    by_state = [column(s) for s in range(n_state)]
    by_relation = {}
    for r in obs.relations:
        sub = relations[r].substep
        by_relation[r] = column(
            n_state + y_sources.index(output_source(relations[r])), None if sub is None else sub.index
        )
    J = [[by_state[s][o] for s in range(n_state)] for o in range(len(obs.vars))]
    Df = [{r: by_relation[r][o] for r in obs.relations} for o in range(len(obs.vars))]
    return J, Df


def escaping_cotangents(
    graph: ETraceGraph, all_obs: Sequence[GroupObservables], env: Mapping[Any, Any], output_cotangents: Sequence[Any]
) -> dict[Any, jax.Array]:
    r"""``intermediate var ->`` :math:`\partial L^t/\partial o^t` through its uses outside its group's transition,
    from the cotangents of the step's outputs (a VJP of the equations downstream of those uses)."""
    minfo = graph.module_info
    owner = {v: obs for obs in all_obs for v in obs.intermediates}
    if not owner:
        return {}
    eqns = list(minfo.held_eqns)
    changed: set[Any] = set()
    downstream = []
    for eqn in eqns:
        if any(is_var(v) and ((v in owner and id(eqn) not in owner[v].slice_ids) or v in changed) for v in eqn.invars):
            downstream.append(eqn)
            changed.update(v for v in eqn.outvars if is_var(v))
    floating = [i for i, v in enumerate(minfo.out_vars) if jnp.issubdtype(v.aval.dtype, jnp.inexact)]
    keys = list(owner)

    def outputs(deltas: list[Any]) -> list[Any]:
        delta = dict(zip(keys, deltas, strict=True))
        scope = dict(env)
        for eqn in downstream:
            args = []
            for v in eqn.invars:
                value = read_atom(scope, v)
                if is_var(v) and v in delta and id(eqn) not in owner[v].slice_ids:
                    value = value + delta[v]
                args.append(value)
            for var, value in zip(eqn.outvars, bind_eqn(eqn, args), strict=True):
                if is_var(var):
                    scope[var] = value
        result = []
        for i in floating:
            v = minfo.out_vars[i]
            value = read_atom(scope, v)
            result.append(value + delta[v] if is_var(v) and v in delta else value)
        return result

    zeros = [jnp.zeros(_shape(v), v.aval.dtype) for v in keys]
    _, pullback = jax.vjp(outputs, zeros)
    cts = [jnp.asarray(output_cotangents[i], dtype=minfo.out_vars[i].aval.dtype) for i in floating]
    (grads,) = pullback(cts)
    return dict(zip(keys, grads, strict=True))
