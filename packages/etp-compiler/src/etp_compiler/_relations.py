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
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from etp_primitives import ETP_X_INVAR_INDICES, ETP_Y_OUTVAR_INDICES, is_etp_primitive, require_rules, trainable_invars

from ._compat import Jaxpr, JaxprEqn, Literal, OpenJaxpr, Var, aval_shape, new_jaxpr
from ._diagnostics import CompilationRecord, DiagnosticKind, DiagnosticLevel
from ._elementwise import is_positionwise
from ._eval import eval_jaxpr, is_var
from ._hidden_groups import HiddenGroup, slice_between
from ._jaxpr_walk import CONTROL_FLOW_PRIMITIVES, contains_etp, forward_labels, is_trainable_etp, sub_jaxprs
from ._module_info import ModuleInfo, StatePath, WeightLeaf

__all__ = [
    "HiddenParamOpRelation",
    "build_producers",
    "find_hidden_param_op_relations_from_minfo",
    "trace_var_to_params",
]


def _text(path: Sequence[Hashable]) -> str:
    return ".".join(str(p) for p in path)


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

        def y_to_h(y: jax.Array) -> list[jax.Array]:
            return [jnp.broadcast_to(h, group.varshape) for h in eval_jaxpr(jaxpr, const_values, y)]

        _, tangents = jax.jvp(y_to_h, (y_value,), (jnp.ones_like(y_value),))
        return jnp.stack([jnp.broadcast_to(t, group.varshape) for t in tangents], axis=-1)


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


def find_hidden_param_op_relations_from_minfo(
    minfo: ModuleInfo,
    hid_path_to_group: dict[StatePath, HiddenGroup],
    records: list[CompilationRecord] | None = None,
) -> list[HiddenParamOpRelation]:
    """Find every ETP relation of ``minfo``; record why each weight op is in or out.

    Raises
    ------
    ValueError
        If an ETP primitive of the model lacks one of the four ETP rules
        (named by :func:`etp_primitives.require_rules`).
    """
    records = records if records is not None else []
    jaxpr = minfo.jaxpr
    producers = build_producers(jaxpr)
    order = {id(e): i for i, e in enumerate(jaxpr.eqns)}
    hidden_inputs = set(minfo.hidden_path_to_invar.values())
    arg_inputs = set(minfo.arg_invars)
    outvar_to_path = minfo.outvar_to_hidden_path
    relations: list[HiddenParamOpRelation] = []

    for eqn in jaxpr.eqns:
        if eqn.primitive.name in CONTROL_FLOW_PRIMITIVES and any(contains_etp(s) for s, _ in sub_jaxprs(eqn)):
            records.append(
                CompilationRecord(
                    kind=DiagnosticKind.PRIMITIVE_INSIDE_CONTROL_FLOW,
                    level=DiagnosticLevel.WARNING,
                    message=(
                        f"an ETP primitive sits inside `{eqn.primitive.name}` (jax.lax control flow); the compiler "
                        "does not look inside, so its weight gets no eligibility trace (instantaneous gradient only)."
                    ),
                    context={"construct": eqn.primitive.name},
                )
            )
        if not is_etp_primitive(eqn.primitive):
            continue
        primitive = eqn.primitive
        require_rules(primitive)
        layout = trainable_invars(primitive, eqn.params)
        trainable_atoms = {k: eqn.invars[i] for k, i in layout.items()}
        primary = "weight" if "weight" in layout else next(iter(layout))
        x_index = ETP_X_INVAR_INDICES.get(primitive)
        x_var = eqn.invars[x_index] if x_index is not None else None
        y_var = eqn.outvars[ETP_Y_OUTVAR_INDICES.get(primitive, 0)]

        # 1. trainable inputs -> ParamState leaves
        trainable_paths: dict[str, tuple[WeightLeaf, ...]] = {}
        weight_fns: dict[str, tuple[OpenJaxpr, tuple[Var, ...]]] = {}
        problem = None
        trainable_vars: dict[str, Var] = {}
        for key, var in trainable_atoms.items():
            if not is_var(var):
                problem = f"its trainable input {key!r} is a literal constant"
                break
            trainable_vars[key] = var
            roots, cone = _backward_cone(var, producers)
            leaves = [r for r in roots if r in minfo.invar_to_weight_path]
            data = [r for r in roots if r in hidden_inputs or r in arg_inputs]
            if not leaves:
                problem = (
                    f"its trainable input {key!r} does not come from any brainstate.ParamState (it is a constant or "
                    "a non-parameter state); store the weight in a ParamState to learn it"
                )
                break
            if data:
                problem = (
                    f"its trainable input {key!r} depends on the model input or a hidden state, not on ParamStates "
                    "alone, so it is not a parameter the trace rules can handle"
                )
                break
            leaves.sort(key=lambda v: repr(minfo.invar_to_weight_path[v]))
            trainable_paths[key] = tuple(minfo.invar_to_weight_path[v] for v in leaves)
            cone.sort(key=lambda e: order[id(e)])
            # the whole computation from the leaves (not cut at ETP primitives: it is a weight transformation)
            fn_eqns, fn_consts = slice_between(cone, leaves, [var], cut=None)
            weight_fns[key] = (new_jaxpr(fn_consts, leaves, [var], fn_eqns, f"weight {key!r}"), tuple(fn_consts))
        weight_path: StatePath = trainable_paths[primary][0][0] if primary in trainable_paths else ()
        if problem is not None:
            records.append(
                CompilationRecord(
                    kind=DiagnosticKind.RELATION_EXCLUDED_NO_PARAMSTATE,
                    level=DiagnosticLevel.WARNING,
                    message=f"ETP primitive {primitive.name} is excluded from ETP: {problem}.",
                    primitive=primitive,
                    weight_path=weight_path or None,
                )
            )
            continue

        # 2. forward walk from y: direct reach (cut at trainable ETP ops) and reach through other weights
        direct = forward_labels(jaxpr.eqns[order[id(eqn)] + 1 :], {y_var: frozenset({0})}, cut=is_trainable_etp)
        anyway = forward_labels(jaxpr.eqns[order[id(eqn)] + 1 :], {y_var: frozenset({0})})
        reached_direct = [outvar_to_path[v] for v in outvar_to_path if v in direct]
        reached_any = [outvar_to_path[v] for v in outvar_to_path if v in anyway]
        if not reached_direct:
            kind = (
                DiagnosticKind.RELATION_EXCLUDED_WEIGHT_TO_WEIGHT
                if reached_any
                else DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL
            )
            message = (
                f"ETP primitive {primitive.name} (weight={weight_path}) reaches a hidden state only through another "
                "trainable ETP primitive. Per the non-parametric-tail invariant this weight is excluded from ETP and "
                "gets its instantaneous gradient; rewire the model so its output flows directly into a hidden state "
                "to give it an eligibility trace."
                if reached_any
                else f"ETP primitive {primitive.name} (weight={weight_path}) has no connected hidden states. It will "
                "be treated as a non-temporal parameter (exact instantaneous gradient, e.g. a readout)."
            )
            records.append(
                CompilationRecord(
                    kind=kind,
                    level=DiagnosticLevel.WARNING,
                    message=message,
                    primitive=primitive,
                    weight_path=weight_path,
                    hidden_paths=tuple(reached_any) or None,
                )
            )
            continue

        # 3. shape compatibility, per hidden state
        y_shape = aval_shape(y_var)
        kept: list[StatePath] = []
        for path in reached_direct:
            h_shape = aval_shape(minfo.hidden_path_to_outvar[path])
            try:
                compatible = np.broadcast_shapes(y_shape, h_shape) == h_shape
            except ValueError:
                compatible = False
            if compatible:
                kept.append(path)
            else:
                records.append(
                    CompilationRecord(
                        kind=DiagnosticKind.RELATION_EXCLUDED_SHAPE_MISMATCH,
                        level=DiagnosticLevel.WARNING,
                        message=(
                            f"ETP primitive {primitive.name} (weight={weight_path}) output of shape {y_shape} does "
                            f"not broadcast to hidden state {_text(path)} of shape {h_shape}; that connection is "
                            "dropped (give each unit of the hidden state its own op output, e.g. one layer per gate)."
                        ),
                        primitive=primitive,
                        weight_path=weight_path,
                        hidden_paths=(path,),
                    )
                )
        if not kept:
            continue
        groups = tuple(dict.fromkeys(hid_path_to_group[p] for p in kept))
        classification = {
            p: (
                "all_direct"
                if p not in _through_weight(jaxpr, eqn, order, y_var, outvar_to_path)
                else "partly_through_weight"
            )
            for p in kept
        }
        y_to_hidden: dict[int, tuple[OpenJaxpr, tuple[Var, ...]]] = {}
        positionwise: dict[int, bool] = {}
        tail = jaxpr.eqns[order[id(eqn)] + 1 :]
        for group in groups:
            fn_eqns, fn_consts = slice_between(tail, [y_var], list(group.hidden_outvars))
            y_to_hidden[group.index] = (
                new_jaxpr(fn_consts, [y_var], group.hidden_outvars, fn_eqns, f"y -> hidden group {group.index}"),
                tuple(fn_consts),
            )
            positionwise[group.index] = is_positionwise(fn_eqns, {y_var})
            if not positionwise[group.index]:
                records.append(
                    CompilationRecord(
                        kind=DiagnosticKind.TRANSITION_NOT_POSITIONWISE,
                        level=DiagnosticLevel.WARNING,
                        message=(
                            f"the path from ETP primitive {primitive.name} (weight={weight_path}) to hidden group "
                            f"{group.index} mixes positions; its D_f is approximated by a forward-mode product."
                        ),
                        primitive=primitive,
                        weight_path=weight_path,
                        hidden_paths=group.hidden_paths,
                    )
                )
        bounded = [p for p, c in classification.items() if c != "all_direct"]
        if bounded:
            records.append(
                CompilationRecord(
                    kind=DiagnosticKind.TRANSITION_TAIL_BOUNDED,
                    level=DiagnosticLevel.INFO,
                    message=(
                        f"ETP primitive {primitive.name} (weight={weight_path}) also reaches "
                        f"{', '.join(_text(p) for p in bounded)} through another trainable ETP primitive; those paths "
                        "are cut at that primitive (its own trace carries them)."
                    ),
                    primitive=primitive,
                    weight_path=weight_path,
                    hidden_paths=tuple(bounded),
                )
            )
        records.append(
            CompilationRecord(
                kind=DiagnosticKind.RELATION_INCLUDED,
                level=DiagnosticLevel.INFO,
                message=f"{primitive.name}({weight_path}) -> {[g.index for g in groups]}",
                primitive=primitive,
                weight_path=weight_path,
                hidden_paths=tuple(kept),
                context={
                    "hidden_group_indices": tuple(g.index for g in groups),
                    "path_classification": classification,
                },
            )
        )
        relations.append(
            HiddenParamOpRelation(
                primitive=primitive,
                eqn=eqn,
                eqn_params=dict(eqn.params),
                weight_path=weight_path,
                trainable_vars=trainable_vars,
                trainable_paths=trainable_paths,
                weight_fns=weight_fns,
                x_var=x_var,
                y_var=y_var,
                hidden_groups=groups,
                connected_hidden_paths=tuple(kept),
                y_to_hidden=y_to_hidden,
                y_to_hidden_positionwise=positionwise,
                path_classification=classification,
            )
        )
    return relations


def _through_weight(
    jaxpr: Jaxpr, eqn: JaxprEqn, order: dict[int, int], y_var: Var, outvar_to_path: dict[Var, StatePath]
) -> set[StatePath]:
    """Hidden paths that ``y`` reaches via at least one trainable ETP primitive."""
    tail = jaxpr.eqns[order[id(eqn)] + 1 :]
    labels = forward_labels(tail, {y_var: frozenset({"y"})})
    # mark outputs of trainable ETP ops fed by y, then see which hidden outvars they reach
    seeds = {
        v: frozenset({"w"})
        for e in tail
        if is_trainable_etp(e) and any(is_var(i) and i in labels for i in e.invars)
        for v in e.outvars
    }
    via = forward_labels(tail, seeds)
    return {p for v, p in outvar_to_path.items() if v in via}
