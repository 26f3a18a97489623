r"""Stage 2: groups of hidden states and their transitions :math:`h^{t-1} \to h^t`.

Two hidden states belong to one group when one's old value reaches the
other's new value *without passing through a trainable ETP primitive* (paths
through a trainable op are carried by that op's own eligibility trace, not by
the hidden-to-hidden Jacobian). Groups are the connected components of that
relation, split so that all states of a group share one shape (the per-position
Jacobian blocks are then :math:`S \times S` with :math:`S` the number of states).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import jax
import jax.numpy as jnp

from ._compat import JaxprEqn, OpenJaxpr, Var, aval_shape, new_jaxpr
from ._diagnostics import CompilationRecord, DiagnosticKind, DiagnosticLevel
from ._elementwise import is_positionwise
from ._errors import CompilationError
from ._eval import eval_jaxpr
from ._jaxpr_walk import CONTROL_FLOW_PRIMITIVES, forward_labels, is_trainable_etp, is_var
from ._module_info import ModuleInfo, StatePath
from ._scan_descent import with_twins

__all__ = ["HiddenGroup", "find_hidden_groups_from_minfo", "hidden_group_stage", "slice_between"]


def slice_between(
    eqns: Sequence[JaxprEqn],
    sources: Sequence[Var],
    targets: Sequence[Var],
    cut: Callable[[JaxprEqn], bool] | None = is_trainable_etp,
) -> tuple[list[JaxprEqn], list[Var]]:
    """The equations on paths from ``sources`` to ``targets`` that avoid the equations where ``cut`` holds.

    By default the paths are cut at trainable ETP primitives (their outputs
    are held as constants). Returns the equations (in order) and the free
    variables they read (neither sources nor produced inside): the
    constants of the slice.
    """
    seeds = {v: frozenset({0}) for v in sources}
    reach = forward_labels(eqns, seeds, cut=cut)
    needed = {v for v in targets if is_var(v)}
    chosen: list[JaxprEqn] = []
    for eqn in reversed(eqns):
        if cut is not None and cut(eqn):
            continue
        produces = [v for v in eqn.outvars if is_var(v)]
        if any(v in needed for v in produces) and any(v in reach for v in produces):
            chosen.append(eqn)
            needed.update(v for v in eqn.invars if is_var(v) and v in reach)
    chosen.reverse()
    produced = {v for e in chosen for v in e.outvars if is_var(v)}
    source_set = set(sources)
    consts: list[Var] = []
    seen: set[Var] = set()
    for eqn in chosen:
        for v in eqn.invars:
            if is_var(v) and v not in produced and v not in source_set and v not in seen:
                seen.add(v)
                consts.append(v)
    for v in targets:
        if is_var(v) and v not in produced and v not in source_set and v not in seen:
            seen.add(v)
            consts.append(v)
    return chosen, consts


@dataclass(frozen=True, eq=False)
class HiddenGroup:
    r"""Hidden states whose transition is analysed together.

    Attributes
    ----------
    index : int
        Position in the graph's list of groups.
    hidden_paths : tuple of state paths
        The states, in the order of the state axis of the Jacobian blocks.
    hidden_invars, hidden_outvars : tuple of Var
        Their variables before and after the step in :attr:`ModuleInfo.jaxpr`.
    varshape : tuple of int
        The common shape of the states (batch axes included).
    num_state : int
        :math:`S`, the number of states.
    transition_jaxpr : OpenJaxpr
        :math:`h^{t-1} \mapsto h^t` with every trainable ETP output and every
        other input held as a constant (``constvars``).
    transition_jaxpr_constvars : tuple of Var
        Variables of the step jaxpr whose values the transition needs.
    is_positionwise : bool
        Whether the transition acts position by position (then the Jacobian
        blocks come from one forward-mode product; otherwise they are the
        diagonal blocks of the full Jacobian, at :math:`O(N^2)` cost).
    """

    index: int
    hidden_paths: tuple[StatePath, ...]
    hidden_invars: tuple[Var, ...]
    hidden_outvars: tuple[Var, ...]
    varshape: tuple[int, ...]
    transition_jaxpr: OpenJaxpr
    transition_jaxpr_constvars: tuple[Var, ...]
    is_positionwise: bool
    hidden_states: tuple[Any, ...] = field(default=())

    def dict(self) -> builtins.dict[str, Any]:
        """The fields as a plain ``dict`` (name -> value), e.g. for printing."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def num_state(self) -> int:
        """:math:`S`, the number of hidden states in the group."""
        return len(self.hidden_paths)

    def transition(self, hidden_values: Sequence[jax.Array], const_values: Sequence[jax.Array]) -> list[jax.Array]:
        """Evaluate :math:`h^t` from :math:`h^{t-1}` (``hidden_values``, mantissas) and the constants.

        ``const_values`` are the values of :attr:`transition_jaxpr_constvars`; the same as
        :func:`etp_compiler.eval_jaxpr` ``(transition_jaxpr, const_values, *hidden_values)``.
        """
        return eval_jaxpr(self.transition_jaxpr, const_values, *hidden_values)

    def jacobian_blocks(self, hidden_values: Sequence[jax.Array], const_values: Sequence[jax.Array]) -> jax.Array:
        r"""Per-position blocks :math:`D_{p,ij} = \partial h_i^t[p] / \partial h_j^{t-1}[p]`, shape ``(*varshape, S, S)``."""
        hidden_values = [jnp.asarray(h) for h in hidden_values]

        def step(*hs: jax.Array) -> list[jax.Array]:
            return self.transition(hs, const_values)

        if self.is_positionwise:
            _, linear = jax.linearize(step, *hidden_values)
            columns = []
            for j in range(self.num_state):
                tangent = [jnp.ones_like(h) if i == j else jnp.zeros_like(h) for i, h in enumerate(hidden_values)]
                columns.append(jnp.stack(linear(*tangent), axis=-1))
            return jnp.stack(columns, axis=-1)
        size = int(jnp.size(hidden_values[0]))
        jac = jax.jacfwd(
            lambda *hs: jnp.stack([o.reshape(-1) for o in step(*hs)], 0), argnums=tuple(range(self.num_state))
        )(*hidden_values)
        # jac[j] has shape (S, N, *varshape): the derivative of every output w.r.t. state j.
        diag = jnp.stack(
            [jnp.diagonal(jac_j.reshape(self.num_state, size, size), axis1=1, axis2=2) for jac_j in jac], -1
        )
        return jnp.moveaxis(diag, 0, -2).reshape((*self.varshape, self.num_state, self.num_state))


class _UnionFind:
    def __init__(self, items: Sequence[StatePath]) -> None:
        self.parent = {item: item for item in items}

    def find(self, item: StatePath) -> StatePath:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: StatePath, b: StatePath) -> None:
        self.parent[self.find(a)] = self.find(b)


def _check_control_flow(minfo: ModuleInfo) -> None:
    """Reject hidden states whose old value passes through lax control flow into their new value."""
    eqns = minfo.jaxpr.eqns
    labels = forward_labels(eqns, {v: frozenset({p}) for p, v in minfo.hidden_path_to_invar.items()})
    descended = {id(s.eqn) for s in minfo.descent_scans}
    flows = [
        (i, e) for i, e in enumerate(eqns) if e.primitive.name in CONTROL_FLOW_PRIMITIVES and id(e) not in descended
    ]
    if not flows:
        return
    # which control-flow equations each var descends from
    through = forward_labels(eqns, {v: frozenset({i}) for i, e in flows for v in e.outvars if is_var(v)})
    for path, out in minfo.hidden_path_to_outvar.items():
        for index in sorted(through.get(out, frozenset())):
            eqn = eqns[index]
            ins: frozenset[StatePath] = frozenset().union(
                *(labels.get(v, frozenset()) for v in eqn.invars if is_var(v))
            )
            if path in ins:
                raise CompilationError(
                    f"hidden state {'.'.join(map(str, path))} is updated inside `{eqn.primitive.name}` "
                    "(jax.lax control flow) that the compiler kept as it is; ETP needs the hidden-state update "
                    "as straight-line code. The compiler if-converts lax.cond and unrolls lax.scan up to "
                    "ControlFlowPolicy.scan_unroll_limit (pass control_flow=ControlFlowPolicy(...)); otherwise "
                    "move the loop outside the model step."
                )


def _connected_components(minfo: ModuleInfo) -> list[list[StatePath]]:
    """The hidden paths, grouped by "one's old value reaches the other's new value avoiding trainable ETP ops"."""
    paths = list(minfo.hidden_path_to_invar)
    seeds = {minfo.hidden_path_to_invar[p]: frozenset({p}) for p in paths}
    labels = forward_labels(minfo.jaxpr.eqns, seeds, cut=is_trainable_etp)
    union = _UnionFind(paths)
    for path in paths:
        for source in labels.get(minfo.hidden_path_to_outvar[path], frozenset()):
            union.union(path, source)
    components: dict[StatePath, list[StatePath]] = {}
    for path in paths:
        components.setdefault(union.find(path), []).append(path)
    return list(components.values())


def _split_by_shape(minfo: ModuleInfo, members: Sequence[StatePath]) -> dict[tuple[int, ...], list[StatePath]]:
    """The members of one component by shape (one group per shape), in first-seen order."""
    by_shape: dict[tuple[int, ...], list[StatePath]] = {}
    for path in members:
        by_shape.setdefault(aval_shape(minfo.hidden_path_to_invar[path]), []).append(path)
    return by_shape


def _shape_mismatch_record(
    members: Sequence[StatePath], by_shape: dict[tuple[int, ...], list[StatePath]]
) -> CompilationRecord:
    """The warning for a component whose states have different shapes (split into one group per shape)."""
    return CompilationRecord(
        kind=DiagnosticKind.STATE_MISMATCH,
        level=DiagnosticLevel.WARNING,
        message=(
            "hidden states "
            + ", ".join(f"{'.'.join(map(str, p))} {s}" for s, ps in by_shape.items() for p in ps)
            + " depend on each other but have different shapes; they are put in separate groups and the "
            "cross-dependence is left out of the hidden-to-hidden Jacobian (an approximation)."
        ),
        hidden_paths=tuple(members),
        context={"shapes": {p: s for s, ps in by_shape.items() for p in ps}},
    )


def hidden_group_stage(minfo: ModuleInfo) -> list[HiddenGroup | CompilationRecord]:
    """Stage 2 with its diagnostics: the hidden groups of ``minfo`` and the records of the decisions taken.

    Returns, in the order they were made, the groups (numbered in order) and
    the records of decisions worth knowing (merged groups, states split for
    shape, transitions that are not position-wise), each record just before
    the group it concerns. :func:`find_hidden_groups_from_minfo` keeps the
    groups; :func:`etp_compiler.compile_etrace_graph` keeps both.

    Raises
    ------
    CompilationError
        If a hidden state is updated inside lax control flow.
    """
    _check_control_flow(minfo)
    items: list[HiddenGroup | CompilationRecord] = []
    n_groups = 0
    for members in _connected_components(minfo):
        by_shape = _split_by_shape(minfo, members)
        if len(by_shape) > 1:
            items.append(_shape_mismatch_record(members, by_shape))
        for shape, group_paths in by_shape.items():
            items.extend(_build_group(minfo, n_groups, tuple(group_paths), shape))
            n_groups += 1
    return items


def find_hidden_groups_from_minfo(minfo: ModuleInfo) -> tuple[list[HiddenGroup], dict[StatePath, HiddenGroup]]:
    """Group the hidden states of ``minfo`` and build each group's transition.

    Returns the groups and the map ``hidden path -> group``, as braintrace's
    function of the same name. The diagnostics of this stage are returned by
    :func:`hidden_group_stage`.
    """
    groups = [item for item in hidden_group_stage(minfo) if isinstance(item, HiddenGroup)]
    return groups, {p: g for g in groups for p in g.hidden_paths}


def _merged_record(index: int, paths: tuple[StatePath, ...]) -> CompilationRecord:
    """The note that several states form one group."""
    return CompilationRecord(
        kind=DiagnosticKind.HIDDEN_GROUP_MERGED,
        level=DiagnosticLevel.INFO,
        message=(
            f"hidden states {', '.join('.'.join(map(str, p)) for p in paths)} feed each other within a step "
            f"and form group {index} with {len(paths)} states per position."
        ),
        hidden_paths=paths,
        context={"hidden_group_index": index},
    )


def _not_positionwise_record(index: int, paths: tuple[StatePath, ...]) -> CompilationRecord:
    """The warning that a group's transition mixes positions."""
    return CompilationRecord(
        kind=DiagnosticKind.TRANSITION_NOT_POSITIONWISE,
        level=DiagnosticLevel.WARNING,
        message=(
            f"the transition of hidden group {index} ({', '.join('.'.join(map(str, p)) for p in paths)}) "
            "mixes positions (e.g. a plain matmul of the hidden state); D-RTRL keeps only the diagonal "
            "blocks of its Jacobian (an approximation), computed at O(N^2) cost."
        ),
        hidden_paths=paths,
        context={"hidden_group_index": index},
    )


def _build_group(
    minfo: ModuleInfo, index: int, paths: tuple[StatePath, ...], shape: tuple[int, ...]
) -> list[HiddenGroup | CompilationRecord]:
    """One group, its transition slice, and the records about it (before it)."""
    invars = tuple(minfo.hidden_path_to_invar[p] for p in paths)
    outvars = tuple(minfo.hidden_path_to_outvar[p] for p in paths)
    eqns, consts = slice_between(minfo.jaxpr.eqns, invars, outvars)
    eqns = with_twins(eqns, minfo.descent_scans)
    transition = new_jaxpr(consts, invars, outvars, eqns, f"transition of hidden group {index}")
    positionwise = is_positionwise(eqns, set(invars))
    items: list[HiddenGroup | CompilationRecord] = []
    if len(paths) > 1:
        items.append(_merged_record(index, paths))
    if not positionwise:
        items.append(_not_positionwise_record(index, paths))
    items.append(
        HiddenGroup(
            index=index,
            hidden_paths=paths,
            hidden_invars=invars,
            hidden_outvars=outvars,
            varshape=shape,
            transition_jaxpr=transition,
            transition_jaxpr_constvars=tuple(consts),
            is_positionwise=positionwise,
            hidden_states=tuple(minfo.hidden_states[p] for p in paths),
        )
    )
    return items
