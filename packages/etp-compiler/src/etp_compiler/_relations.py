r"""Stage 3: weight -> hidden relations of the ETP primitives.

For each ETP equation :math:`y = \mathrm{op}(x, W)` the compiler

1. resolves every trainable input (``trainable_invars_fn``) back to the
   ParamState leaves it is computed from (masks, sign constraints,
   standardisation and the ``fn`` of ``element_wise`` are followed), and
   keeps that computation as ``weight_fns`` so gradients can be pulled back;
2. walks forward from :math:`y` to the hidden states it reaches, stopping at
   other trainable ETP primitives (the non-parametric-tail rule: a weight
   whose every path to a hidden state crosses another trainable op is
   excluded); ``gradient_enabled`` primitives are walked through;
3. keeps the hidden states whose shape :math:`y` broadcasts to, and builds,
   per connected group, the jaxpr :math:`y \mapsto h` whose forward-mode
   product gives :math:`D_f = \partial h / \partial y`.

Each step is a small function that returns what it found or the
:class:`CompilationRecord` of why the op is left out (``_resolve_weights``,
``_reached_hidden``, ``_shape_checked``, ``_y_to_hidden_maps``, then the
records of an included relation); :func:`relation_stage` runs them over every
equation and returns relations and records in one list, in order.
"""

from __future__ import annotations

import builtins
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from etp_primitives import ETP_X_INVAR_INDICES, ETP_Y_OUTVAR_INDICES, is_etp_primitive, require_rules, trainable_invars
from etp_primitives.extend import ETPRuleError, check_rules

from ._compat import Jaxpr, JaxprEqn, Literal, OpenJaxpr, Var, aval_shape, new_jaxpr
from ._diagnostics import CompilationRecord, DiagnosticKind, DiagnosticLevel
from ._elementwise import is_positionwise
from ._errors import CompilationError
from ._eval import eval_jaxpr, is_var
from ._hidden_groups import HiddenGroup, slice_between
from ._jaxpr_walk import CONTROL_FLOW_PRIMITIVES, contains_etp, forward_labels, is_trainable_etp, sub_jaxprs
from ._module_info import ModuleInfo, StatePath, WeightLeaf
from ._scan_descent import DescentScan, with_twins

__all__ = [
    "HiddenParamOpRelation",
    "SubStep",
    "RelationItem",
    "build_producers",
    "find_hidden_param_op_relations_from_minfo",
    "relation_stage",
    "trace_var_to_params",
]


def _text(path: Sequence[Hashable]) -> str:
    return ".".join(str(p) for p in path)


@dataclass(frozen=True, eq=False)
class SubStep:
    r"""Where a relation sits in a scan propagated without unrolling: sub-step ``index`` of ``length``.

    Attributes
    ----------
    index, length : int
        The sub-step :math:`k` and the trip count :math:`K`.
    delta_var : Var
        The step-jaxpr variable (zeros of shape ``(K, *y.shape)``) added to the op's outputs;
        :math:`D_{f,k} = \partial h^t / \partial \delta_k`.
    x_stack_var, y_stack_var : Var
        The op's inputs and outputs of all sub-steps (leading axis ``K``).
    eqn_inputs : tuple
        For each input of the op's equation (the body's): the step-jaxpr atom it is bound to when it
        is the same in every sub-step (a constant of the scan, or a literal), ``None`` when the loop
        computes it. With ``x_k`` from the stack, this re-evaluates the op of sub-step :math:`k`.
    """

    index: int
    length: int
    delta_var: Var
    x_stack_var: Var
    y_stack_var: Var
    eqn_inputs: tuple[Any, ...] = ()


@dataclass(frozen=True, eq=False)
class HiddenParamOpRelation:
    r"""An ETP equation whose weights drive hidden states.

    Attributes
    ----------
    primitive : ETPPrimitive
    eqn : JaxprEqn
        The equation in :attr:`ModuleInfo.jaxpr`.
    eqn_params : dict
        Its static parameters (passed to every rule).
    weight_path : state path
        The ParamState of the primary trainable input (``'weight'``, else the first key).
    trainable_vars : dict
        ``trainable key -> Var``: the primitive's trainable inputs.
    trainable_paths : dict
        ``trainable key -> tuple of (state path, leaf key path)``: the ParamState
        leaves each trainable input is computed from.
    weight_fns : dict
        ``trainable key -> (OpenJaxpr, const vars)``: the computation from those
        leaves to the trainable input (invars: the leaves' vars in
        ``trainable_paths`` order).
    x_var, y_var : Var or None
    hidden_groups : tuple of HiddenGroup
        The groups whose states ``y`` reaches.
    connected_hidden_paths : tuple of state paths
    y_to_hidden : dict
        ``group index -> (OpenJaxpr, const vars)``: :math:`y \mapsto h^t` of the group's states.
    y_to_hidden_positionwise : dict
        ``group index -> bool``.
    path_classification : dict
        ``hidden path -> 'all_direct' | 'partly_through_weight'``.
    substep : SubStep or None
        For an op inside a scan propagated without unrolling: which sub-step this relation is
        (``eqn``, ``x_var`` and ``y_var`` are then the body's, ``y_to_hidden`` maps the stacked
        ``delta_var``); ``None`` otherwise.
    """

    primitive: Any
    eqn: JaxprEqn
    eqn_params: dict[str, Any]
    weight_path: StatePath
    trainable_vars: dict[str, Var]
    trainable_paths: dict[str, tuple[WeightLeaf, ...]]
    weight_fns: dict[str, tuple[OpenJaxpr, tuple[Var, ...]]]
    x_var: Var | Literal | None
    y_var: Var
    hidden_groups: tuple[HiddenGroup, ...]
    connected_hidden_paths: tuple[StatePath, ...]
    y_to_hidden: dict[int, tuple[OpenJaxpr, tuple[Var, ...]]] = field(default_factory=dict)
    y_to_hidden_positionwise: dict[int, bool] = field(default_factory=dict)
    path_classification: dict[StatePath, str] = field(default_factory=dict)
    substep: SubStep | None = None

    def hidden_dim(self, group: HiddenGroup, y_value: jax.Array, const_values: Sequence[jax.Array]) -> jax.Array:
        r""":math:`D_f = \partial h^t / \partial y` per position, shape ``(*group.varshape, S)``.

        Exact when the ``y -> h`` map is position-wise (``y`` broadcast onto ``h``).
        ``const_values`` are the values of ``y_to_hidden[group.index][1]``.

        Raises
        ------
        ValueError
            If ``group`` is not one of :attr:`hidden_groups`.
        """
        if group.index not in self.y_to_hidden:
            raise ValueError(
                f"the ETP primitive {getattr(self.primitive, 'name', self.primitive)} (weight={self.weight_path}) "
                f"does not reach hidden group {group.index} ({', '.join(_text(p) for p in group.hidden_paths)}); "
                f"it reaches groups {sorted(self.y_to_hidden)}."
            )
        jaxpr, _ = self.y_to_hidden[group.index]
        if self.substep is not None:
            raise ValueError(
                f"the relation of {getattr(self.primitive, 'name', self.primitive)} (weight={self.weight_path}) is "
                f"sub-step {self.substep.index} of a lax.scan of length {self.substep.length}: its D_f comes from "
                "substep_hidden_dims(group, delta_value, const_values)[index]."
            )

        def y_to_h(y: jax.Array) -> list[jax.Array]:
            return [jnp.broadcast_to(h, group.varshape) for h in eval_jaxpr(jaxpr, const_values, y)]

        _, tangents = jax.jvp(y_to_h, (y_value,), (jnp.ones_like(y_value),))
        return jnp.stack([jnp.broadcast_to(t, group.varshape) for t in tangents], axis=-1)

    def substep_hidden_dims(
        self, group: HiddenGroup, delta_value: jax.Array, const_values: Sequence[jax.Array]
    ) -> jax.Array:
        r""":math:`D_{f,k} = \partial h^t / \partial y_k` of every sub-step, shape ``(K, *group.varshape, S)``.

        For a relation with a :attr:`substep`; ``delta_value`` is the value of its ``delta_var``
        (zeros). When :math:`\delta_k \mapsto h^t` is position-wise and ``y`` has the states' shape,
        one reverse-mode product per state gives every :math:`k` (the cotangent of ones sums over
        positions, each of which only its own position reaches); otherwise one forward-mode product
        per sub-step (a tangent of ones on :math:`\delta_k`), as :meth:`hidden_dim` does per op.
        """
        jaxpr, _ = self.y_to_hidden[group.index]

        def delta_to_h(delta: jax.Array) -> list[jax.Array]:
            return [jnp.broadcast_to(h, group.varshape) for h in eval_jaxpr(jaxpr, const_values, delta)]

        outs, pullback = jax.vjp(delta_to_h, delta_value)
        if self.y_to_hidden_positionwise.get(group.index, False) and delta_value.shape[1:] == group.varshape:
            columns = []
            for s in range(group.num_state):
                cotangent = [jnp.ones_like(o) if i == s else jnp.zeros_like(o) for i, o in enumerate(outs)]
                columns.append(pullback(cotangent)[0])
            return jnp.stack(columns, axis=-1)

        def one(k: jax.Array) -> jax.Array:
            tangent = jnp.zeros_like(delta_value).at[k].set(1)
            _, tangents = jax.jvp(delta_to_h, (delta_value,), (tangent,))
            return jnp.stack(tangents, axis=-1)

        return jax.vmap(one)(jnp.arange(delta_value.shape[0]))

    def dict(self) -> builtins.dict[str, Any]:
        """The fields as a plain ``dict`` (name -> value), e.g. for printing."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_producers(jaxpr: Jaxpr | OpenJaxpr) -> dict[Var, JaxprEqn]:
    """``var -> the equation producing it``, for every variable an equation of ``jaxpr`` produces.

    The inputs of the jaxpr (and its constvars) have no producer; with
    :func:`trace_var_to_params` it tells which ParamState leaves a variable is
    computed from.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from etp_compiler import build_producers
    >>> jaxpr = jax.make_jaxpr(lambda x: jnp.sin(x) * 2.0)(1.0).jaxpr
    >>> producers = build_producers(jaxpr)
    >>> [producers[v].primitive.name for v in (jaxpr.eqns[0].outvars[0], jaxpr.outvars[0])]
    ['sin', 'mul']
    >>> jaxpr.invars[0] in producers
    False
    """
    return {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars if is_var(v)}


def _backward_cone(var: Var, producers: dict[Var, JaxprEqn]) -> tuple[set[Var], list[JaxprEqn]]:
    """Root vars (no producer) that ``var`` depends on, and the producing equations (in jaxpr order later)."""
    roots: set[Var] = set()
    eqns: dict[int, JaxprEqn] = {}
    stack = [var]
    seen: set[Var] = set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        eqn = producers.get(current)
        if eqn is None:
            roots.add(current)
            continue
        eqns[id(eqn)] = eqn
        stack.extend(v for v in eqn.invars if is_var(v))
    return roots, list(eqns.values())


def trace_var_to_params(
    var: Var, producers: dict[Var, JaxprEqn], invar_to_weight_path: dict[Var, WeightLeaf]
) -> tuple[WeightLeaf, ...]:
    """The ParamState leaves that ``var`` is computed from (empty when none).

    ``producers`` is :func:`build_producers` of the step jaxpr,
    ``invar_to_weight_path`` is :attr:`ModuleInfo.invar_to_weight_path`.
    """
    roots, _ = _backward_cone(var, producers)
    return tuple(sorted((invar_to_weight_path[r] for r in roots if r in invar_to_weight_path), key=repr))


# ------------------------------------------------------------------------------------------ the stages

#: What one stage of the relation finder returns: relations and the records of its decisions.
RelationItem = HiddenParamOpRelation | CompilationRecord


class _StepFacts(NamedTuple):
    """What every ETP equation of one step is checked against (computed once per step)."""

    minfo: ModuleInfo
    hid_path_to_group: Mapping[StatePath, HiddenGroup]
    producers: dict[Var, JaxprEqn]
    data_inputs: frozenset[Var]


class _OpSite(NamedTuple):
    """One ETP equation of the step: where it is and how its inputs are laid out."""

    eqn: JaxprEqn
    primitive: Any
    tail: tuple[JaxprEqn, ...]
    order: dict[int, int]
    trainable_atoms: dict[str, Any]
    primary: str
    x_var: Var | Literal | None
    y_var: Var


class _Weights(NamedTuple):
    """The trainable inputs of an op resolved to ParamState leaves."""

    weight_path: StatePath
    trainable_vars: dict[str, Var]
    trainable_paths: dict[str, tuple[WeightLeaf, ...]]
    weight_fns: dict[str, tuple[OpenJaxpr, tuple[Var, ...]]]


class _ScanPlace(NamedTuple):
    """An ETP equation inside a scan propagated without unrolling: the scan and the equation's number."""

    scan: DescentScan
    r: int

    @property
    def delta(self) -> Var:
        return self.scan.delta_var(self.r)


def _step_facts(minfo: ModuleInfo, hid_path_to_group: Mapping[StatePath, HiddenGroup]) -> _StepFacts:
    """The producer map and the data inputs (arguments and old hidden values) of the step."""
    data = frozenset(minfo.hidden_path_to_invar.values()) | frozenset(minfo.arg_invars)
    return _StepFacts(minfo, hid_path_to_group, build_producers(minfo.jaxpr), data)


def _control_flow_record(eqn: JaxprEqn) -> CompilationRecord | None:
    """The warning for lax control flow that hides an ETP primitive (the compiler does not look inside)."""
    if eqn.primitive.name not in CONTROL_FLOW_PRIMITIVES or not any(contains_etp(s) for s, _ in sub_jaxprs(eqn)):
        return None
    return CompilationRecord(
        kind=DiagnosticKind.PRIMITIVE_INSIDE_CONTROL_FLOW,
        level=DiagnosticLevel.WARNING,
        message=(
            f"an ETP primitive sits inside `{eqn.primitive.name}` (jax.lax control flow); the compiler "
            "does not look inside, so its weight gets no eligibility trace (instantaneous gradient only)."
        ),
        context={"construct": eqn.primitive.name},
    )


def _op_site(jaxpr: Jaxpr, index: int, order: dict[int, int]) -> _OpSite:
    """The layout of the ETP equation ``jaxpr.eqns[index]`` (after checking that its primitive has all rules)."""
    eqn = jaxpr.eqns[index]
    primitive = eqn.primitive
    require_rules(primitive)
    layout = trainable_invars(primitive, eqn.params)
    x_index = ETP_X_INVAR_INDICES.get(primitive)
    return _OpSite(
        eqn=eqn,
        primitive=primitive,
        tail=tuple(jaxpr.eqns[index + 1 :]),
        order=order,
        trainable_atoms={k: eqn.invars[i] for k, i in layout.items()},
        primary="weight" if "weight" in layout else next(iter(layout)),
        x_var=eqn.invars[x_index] if x_index is not None else None,
        y_var=eqn.outvars[ETP_Y_OUTVAR_INDICES.get(primitive, 0)],
    )


def _resolve_input(facts: _StepFacts, site: _OpSite, key: str, atom: Any) -> str | tuple[list[Var], list[JaxprEqn]]:
    """The ParamState leaf vars and the equations that compute one trainable input, or why there are none."""
    if not is_var(atom):
        return f"its trainable input {key!r} is a literal constant"
    roots, cone = _backward_cone(atom, facts.producers)
    leaves = [r for r in roots if r in facts.minfo.invar_to_weight_path]
    if not leaves:
        return (
            f"its trainable input {key!r} does not come from any brainstate.ParamState (it is a constant or "
            "a non-parameter state); store the weight in a ParamState to learn it"
        )
    if any(r in facts.data_inputs for r in roots):
        return (
            f"its trainable input {key!r} depends on the model input or a hidden state, not on ParamStates "
            "alone, so it is not a parameter the trace rules can handle"
        )
    leaves.sort(key=lambda v: repr(facts.minfo.invar_to_weight_path[v]))
    cone.sort(key=lambda e: site.order[id(e)])
    return leaves, cone


def _resolve_weights(facts: _StepFacts, site: _OpSite) -> _Weights | CompilationRecord:
    """Step 1: every trainable input back to its ParamState leaves and the weight transform, or the exclusion."""
    weights = _Weights((), {}, {}, {})
    for key, atom in site.trainable_atoms.items():
        resolved = _resolve_input(facts, site, key, atom)
        if isinstance(resolved, str):
            return CompilationRecord(
                kind=DiagnosticKind.RELATION_EXCLUDED_NO_PARAMSTATE,
                level=DiagnosticLevel.WARNING,
                message=f"ETP primitive {site.primitive.name} is excluded from ETP: {resolved}.",
                primitive=site.primitive,
                weight_path=_primary_path(site, weights) or None,
            )
        leaves, cone = resolved
        weights.trainable_vars[key] = atom
        weights.trainable_paths[key] = tuple(facts.minfo.invar_to_weight_path[v] for v in leaves)
        # the whole computation from the leaves (not cut at ETP primitives: it is a weight transformation)
        fn_eqns, fn_consts = slice_between(cone, leaves, [atom], cut=None)
        weights.weight_fns[key] = (new_jaxpr(fn_consts, leaves, [atom], fn_eqns, f"weight {key!r}"), tuple(fn_consts))
    return weights._replace(weight_path=_primary_path(site, weights))


def _primary_path(site: _OpSite, weights: _Weights) -> StatePath:
    """The ParamState of the primary trainable input (``()`` while it is not resolved)."""
    leaves = weights.trainable_paths.get(site.primary)
    return leaves[0][0] if leaves else ()


def _scan_outputs_reached(place: _ScanPlace, cut: Any) -> dict[Var, frozenset[Any]]:
    """The outputs of the scan that the op's delta reaches inside the loop (carried values followed)."""
    scan = place.scan
    body = scan.body
    start = body.invars[scan.n_consts + scan.n_carry + scan.n_xs + place.r]
    seeds = {start: frozenset({0})}
    while True:
        labels = forward_labels(body.eqns, seeds, cut=cut)
        carried = {
            body.invars[scan.n_consts + j]: frozenset({0})
            for j, v in enumerate(body.outvars[: scan.n_carry])
            if is_var(v) and v in labels
        }
        if set(carried) <= set(seeds):
            break
        seeds.update(carried)
    return {
        out: frozenset({0}) for out, v in zip(scan.eqn.outvars, body.outvars, strict=True) if is_var(v) and v in labels
    }


def _reached_hidden(
    facts: _StepFacts, site: _OpSite, place: _ScanPlace | None = None
) -> tuple[list[StatePath], list[StatePath]]:
    """Step 2: the hidden states ``y`` reaches avoiding trainable ETP ops, and those it reaches at all."""
    if place is None:
        seeds = {site.y_var: frozenset({0})}
        direct = forward_labels(site.tail, seeds, cut=is_trainable_etp)
        anyway = forward_labels(site.tail, seeds)
    else:
        direct = forward_labels(site.tail, _scan_outputs_reached(place, is_trainable_etp), cut=is_trainable_etp)
        anyway = forward_labels(site.tail, _scan_outputs_reached(place, None))
    outvar_to_path = facts.minfo.outvar_to_hidden_path
    return [p for v, p in outvar_to_path.items() if v in direct], [p for v, p in outvar_to_path.items() if v in anyway]


def _unreached_record(site: _OpSite, weights: _Weights, reached_any: Sequence[StatePath]) -> CompilationRecord:
    """The exclusion of an op that reaches no hidden state directly (weight-to-weight or non-temporal)."""
    name, weight_path = site.primitive.name, weights.weight_path
    if reached_any:
        kind = DiagnosticKind.RELATION_EXCLUDED_WEIGHT_TO_WEIGHT
        message = (
            f"ETP primitive {name} (weight={weight_path}) reaches a hidden state only through another "
            "trainable ETP primitive. Per the non-parametric-tail invariant this weight is excluded from ETP and "
            "gets its instantaneous gradient; rewire the model so its output flows directly into a hidden state "
            "to give it an eligibility trace."
        )
    else:
        kind = DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL
        message = (
            f"ETP primitive {name} (weight={weight_path}) has no connected hidden states. It will "
            "be treated as a non-temporal parameter (exact instantaneous gradient, e.g. a readout)."
        )
    return CompilationRecord(
        kind=kind,
        level=DiagnosticLevel.WARNING,
        message=message,
        primitive=site.primitive,
        weight_path=weight_path,
        hidden_paths=tuple(reached_any) or None,
    )


def _shape_checked(
    facts: _StepFacts, site: _OpSite, weights: _Weights, reached: Sequence[StatePath]
) -> list[StatePath | CompilationRecord]:
    """Step 3: the reached hidden states ``y`` broadcasts to, and a record for each one it does not."""
    y_shape = aval_shape(site.y_var)
    items: list[StatePath | CompilationRecord] = []
    for path in reached:
        h_shape = aval_shape(facts.minfo.hidden_path_to_outvar[path])
        try:
            compatible = np.broadcast_shapes(y_shape, h_shape) == h_shape
        except ValueError:
            compatible = False
        if compatible:
            items.append(path)
            continue
        items.append(
            CompilationRecord(
                kind=DiagnosticKind.RELATION_EXCLUDED_SHAPE_MISMATCH,
                level=DiagnosticLevel.WARNING,
                message=(
                    f"ETP primitive {site.primitive.name} (weight={weights.weight_path}) output of shape {y_shape} "
                    f"does not broadcast to hidden state {_text(path)} of shape {h_shape}; that connection is "
                    "dropped (give each unit of the hidden state its own op output, e.g. one layer per gate)."
                ),
                primitive=site.primitive,
                weight_path=weights.weight_path,
                hidden_paths=(path,),
            )
        )
    return items


def _classify_paths(facts: _StepFacts, site: _OpSite, kept: Sequence[StatePath]) -> dict[StatePath, str]:
    """``hidden path -> 'all_direct' | 'partly_through_weight'`` (whether some path crosses another trainable op)."""
    labels = forward_labels(site.tail, {site.y_var: frozenset({"y"})})
    # mark outputs of trainable ETP ops fed by y, then see which hidden outvars they reach
    seeds = {
        v: frozenset({"w"})
        for e in site.tail
        if is_trainable_etp(e) and any(is_var(i) and i in labels for i in e.invars)
        for v in e.outvars
    }
    via = forward_labels(site.tail, seeds)
    through = {p for v, p in facts.minfo.outvar_to_hidden_path.items() if v in via}
    return {p: "partly_through_weight" if p in through else "all_direct" for p in kept}


def _y_to_hidden_maps(
    facts: _StepFacts, site: _OpSite, weights: _Weights, groups: Sequence[HiddenGroup], place: _ScanPlace | None
) -> tuple[dict[int, tuple[OpenJaxpr, tuple[Var, ...]]], dict[int, bool], list[CompilationRecord]]:
    """Step 4: per reached group, the slice :math:`y \\mapsto h`, whether it is position-wise, and the warnings.

    For an op inside a scan propagated without unrolling (``place``), the slice starts at the op's
    stacked ``delta`` input of the scan. Every rewritten scan in a slice is its twin (held ETP outputs).
    """
    source, tail = (site.y_var, site.tail) if place is None else (place.delta, (place.scan.eqn, *site.tail))
    y_to_hidden: dict[int, tuple[OpenJaxpr, tuple[Var, ...]]] = {}
    positionwise: dict[int, bool] = {}
    records: list[CompilationRecord] = []
    for group in groups:
        fn_eqns, fn_consts = slice_between(tail, [source], list(group.hidden_outvars))
        fn_eqns = with_twins(fn_eqns, facts.minfo.descent_scans)
        name = f"y -> hidden group {group.index}"
        y_to_hidden[group.index] = (
            new_jaxpr(fn_consts, [source], group.hidden_outvars, fn_eqns, name),
            tuple(fn_consts),
        )
        positionwise[group.index] = is_positionwise(fn_eqns, {source})
        if not positionwise[group.index]:
            records.append(
                CompilationRecord(
                    kind=DiagnosticKind.TRANSITION_NOT_POSITIONWISE,
                    level=DiagnosticLevel.WARNING,
                    message=(
                        f"the path from ETP primitive {site.primitive.name} (weight={weights.weight_path}) to hidden "
                        f"group {group.index} mixes positions; its D_f is approximated by a forward-mode product."
                    ),
                    primitive=site.primitive,
                    weight_path=weights.weight_path,
                    hidden_paths=group.hidden_paths,
                )
            )
    return y_to_hidden, positionwise, records


def _tail_bounded_record(
    site: _OpSite, weights: _Weights, classification: Mapping[StatePath, str]
) -> CompilationRecord | None:
    """The note that some of the op's paths are cut at another trainable op (``None`` when none is)."""
    bounded = [p for p, c in classification.items() if c != "all_direct"]
    if not bounded:
        return None
    return CompilationRecord(
        kind=DiagnosticKind.TRANSITION_TAIL_BOUNDED,
        level=DiagnosticLevel.INFO,
        message=(
            f"ETP primitive {site.primitive.name} (weight={weights.weight_path}) also reaches "
            f"{', '.join(_text(p) for p in bounded)} through another trainable ETP primitive; those paths "
            "are cut at that primitive (its own trace carries them)."
        ),
        primitive=site.primitive,
        weight_path=weights.weight_path,
        hidden_paths=tuple(bounded),
    )


def _included_record(
    site: _OpSite,
    weights: _Weights,
    groups: Sequence[HiddenGroup],
    kept: Sequence[StatePath],
    classification: dict[StatePath, str],
    place: _ScanPlace | None = None,
) -> CompilationRecord:
    """The record of an included relation: which groups it drives and how each path is classified."""
    where = ""
    if place is not None:
        where = (
            f" (inside a lax.scan of length {place.scan.length}, propagated through the scan without unrolling: "
            "one relation per sub-step)"
        )
    return CompilationRecord(
        kind=DiagnosticKind.RELATION_INCLUDED,
        level=DiagnosticLevel.INFO,
        message=f"{site.primitive.name}({weights.weight_path}) -> {[g.index for g in groups]}{where}",
        primitive=site.primitive,
        weight_path=weights.weight_path,
        hidden_paths=tuple(kept),
        context={"hidden_group_indices": tuple(g.index for g in groups), "path_classification": classification},
    )


def _check_site_rules(site: _OpSite, weights: _Weights, groups: Sequence[HiddenGroup]) -> None:
    """The primitive's rules on this equation's shapes (a custom rule's mistake named here, not inside a learner)."""
    for num_state in sorted({g.num_state for g in groups}):
        try:
            check_rules(site.primitive, site.x_var, site.y_var, weights.trainable_vars, site.eqn.params, num_state)
        except ETPRuleError as error:
            raise CompilationError(
                f"{error} (the equation of weight {weights.weight_path}, feeding hidden groups of {num_state} "
                "state(s); the rule contract is in etp_primitives.extend)"
            ) from error


def _relation_items(facts: _StepFacts, site: _OpSite, place: _ScanPlace | None = None) -> list[RelationItem]:
    """One ETP equation through the stages: its relation(s) and records, or the records of its exclusion.

    An equation inside a scan propagated without unrolling (``place``) gives one relation per sub-step.
    """
    weights = _resolve_weights(facts, site)
    if isinstance(weights, CompilationRecord):
        return [weights]
    reached_direct, reached_any = _reached_hidden(facts, site, place)
    if not reached_direct:
        return [_unreached_record(site, weights, reached_any)]
    checked = _shape_checked(facts, site, weights, reached_direct)
    items: list[RelationItem] = [r for r in checked if isinstance(r, CompilationRecord)]
    kept = [p for p in checked if not isinstance(p, CompilationRecord)]
    if not kept:
        return items
    groups = tuple(dict.fromkeys(facts.hid_path_to_group[p] for p in kept))
    classification = _classify_paths(facts, site, kept)
    y_to_hidden, positionwise, map_records = _y_to_hidden_maps(facts, site, weights, groups, place)
    items.extend(map_records)
    bounded = _tail_bounded_record(site, weights, classification)
    if bounded is not None:
        items.append(bounded)
    items.append(_included_record(site, weights, groups, kept, classification, place))
    _check_site_rules(site, weights, groups)
    substeps: list[SubStep | None] = [None]
    if place is not None:
        scan, r = place.scan, place.r
        inputs = tuple(_scan_constant(scan, v) for v in site.eqn.invars)
        substeps = [
            SubStep(k, scan.length, place.delta, scan.x_stack_var(r), scan.y_stack_var(r), inputs)
            for k in range(scan.length)
        ]
    items.extend(
        HiddenParamOpRelation(
            primitive=site.primitive,
            eqn=site.eqn,
            eqn_params=dict(site.eqn.params),
            weight_path=weights.weight_path,
            trainable_vars=weights.trainable_vars,
            trainable_paths=weights.trainable_paths,
            weight_fns=weights.weight_fns,
            x_var=site.x_var,
            y_var=site.y_var,
            hidden_groups=groups,
            connected_hidden_paths=tuple(kept),
            y_to_hidden=y_to_hidden,
            y_to_hidden_positionwise=positionwise,
            path_classification=classification,
            substep=substep,
        )
        for substep in substeps
    )
    return items


def _scan_constant(scan: DescentScan, atom: Any) -> Any:
    """The step-jaxpr atom a body input is bound to when it is a constant of the scan (or a literal), else None."""
    if not is_var(atom):
        return atom
    at = scan.body_position(atom)
    return scan.eqn.invars[at] if at is not None and at < scan.n_consts else None


def _descent_items(facts: _StepFacts, scan: DescentScan, position: int, order: dict[int, int]) -> list[RelationItem]:
    """The relations (one per sub-step) and records of the ETP equations inside a scan kept as a loop.

    The records come first; the relations are in sub-step-major order (sub-step 0's ops in body
    order, then sub-step 1's...), the order unrolling the loop gives them.
    """
    items: list[RelationItem] = []
    per_op: list[list[HiddenParamOpRelation]] = []
    for r, eqn in enumerate(scan.etp_eqns):
        require_rules(eqn.primitive)
        layout = trainable_invars(eqn.primitive, eqn.params)
        atoms: dict[str, Any] = {}
        inside = []
        for key, i in layout.items():
            outer = _scan_constant(scan, eqn.invars[i])
            if outer is None:
                inside.append(key)
            else:
                atoms[key] = outer
        x_index = ETP_X_INVAR_INDICES.get(eqn.primitive)
        site = _OpSite(
            eqn=eqn,
            primitive=eqn.primitive,
            tail=tuple(facts.minfo.jaxpr.eqns[position + 1 :]),
            order=order,
            trainable_atoms=atoms,
            primary="weight" if "weight" in layout else next(iter(layout)),
            x_var=eqn.invars[x_index] if x_index is not None else None,
            y_var=eqn.outvars[ETP_Y_OUTVAR_INDICES.get(eqn.primitive, 0)],
        )
        if inside:
            items.append(
                CompilationRecord(
                    kind=DiagnosticKind.RELATION_EXCLUDED_NO_PARAMSTATE,
                    level=DiagnosticLevel.WARNING,
                    message=(
                        f"ETP primitive {eqn.primitive.name} inside a lax.scan of length {scan.length} is excluded "
                        f"from ETP: its trainable input(s) {inside} are computed in the loop from the values it "
                        "carries or scans; only a weight that is the same in every sub-step gets a trace."
                    ),
                    primitive=eqn.primitive,
                )
            )
            continue
        found = _relation_items(facts, site, _ScanPlace(scan, r))
        items.extend(i for i in found if isinstance(i, CompilationRecord))
        per_op.append([i for i in found if isinstance(i, HiddenParamOpRelation)])
    items.extend(relations[k] for k in range(scan.length) for relations in per_op if relations)
    return items


def relation_stage(minfo: ModuleInfo, hid_path_to_group: Mapping[StatePath, HiddenGroup]) -> list[RelationItem]:
    """Stage 3 with its diagnostics: every ETP relation of ``minfo`` and the records of why each op is in or out.

    Returns, in equation order, the :class:`HiddenParamOpRelation` of each
    included op (after the records about it) and the records of the excluded
    ones. :func:`find_hidden_param_op_relations_from_minfo` keeps the relations;
    :func:`etp_compiler.compile_etrace_graph` keeps both.

    Raises
    ------
    ValueError
        If an ETP primitive of the model lacks one of the four ETP rules
        (named by :func:`etp_primitives.require_rules`).
    """
    facts = _step_facts(minfo, hid_path_to_group)
    jaxpr = minfo.jaxpr
    order = {id(e): i for i, e in enumerate(jaxpr.eqns)}
    items: list[RelationItem] = []
    descended = {id(scan.eqn): scan for scan in minfo.descent_scans}
    for index, eqn in enumerate(jaxpr.eqns):
        if id(eqn) in descended:
            items.extend(_descent_items(facts, descended[id(eqn)], index, order))
            continue
        flow = _control_flow_record(eqn)
        if flow is not None:
            items.append(flow)
        if is_etp_primitive(eqn.primitive):
            items.extend(_relation_items(facts, _op_site(jaxpr, index, order)))
    return items


def find_hidden_param_op_relations_from_minfo(
    minfo: ModuleInfo, hid_path_to_group: Mapping[StatePath, HiddenGroup]
) -> list[HiddenParamOpRelation]:
    """Find every ETP relation of ``minfo`` (the diagnostics are returned by :func:`relation_stage`).

    Raises
    ------
    ValueError
        If an ETP primitive of the model lacks one of the four ETP rules
        (named by :func:`etp_primitives.require_rules`).
    """
    return [item for item in relation_stage(minfo, hid_path_to_group) if isinstance(item, HiddenParamOpRelation)]
