"""Walking and re-evaluating jaxprs: inlining nested calls, slicing, dependency sets.

The compiler works on one flat jaxpr. Nested ``jit`` calls are inlined
(same semantics), so an ETP primitive inside a jitted helper is found by the
same type-identity test as one at the top level. ``custom_jvp`` /
``custom_vjp`` calls stay opaque (their custom derivative, e.g. a surrogate
spike gradient, is what the trace Jacobians must use) unless they contain an
ETP primitive, in which case they are inlined and a diagnostic says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from etp_primitives import is_etp_primitive, is_gradient_enabled_primitive

from ._compat import ClosedJaxpr, Jaxpr, JaxprEqn, OpenJaxpr, Var, aval_dtype, aval_shape
from ._eval import bind_eqn, eval_eqns, eval_jaxpr_env, is_var, read_atom

__all__ = [
    "CALL_PRIMITIVES",
    "CUSTOM_DERIVATIVE_PRIMITIVES",
    "CONTROL_FLOW_PRIMITIVES",
    "sub_jaxprs",
    "contains_etp",
    "inline_calls",
    "retrace",
    "evaluate_inlined",
    "Converter",
    "EtpBinder",
    "eval_eqns",
    "is_var",
    "forward_labels",
    "is_trainable_etp",
    "custom_call_name",
    "read_atom",
    "bind_eqn",
]

#: Call-like primitives whose body is inlined (same semantics, no custom rules).
CALL_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "remat2"})
#: Calls with custom derivative rules, kept opaque unless they hide an ETP primitive.
CUSTOM_DERIVATIVE_PRIMITIVES = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
#: Structured control flow: the compiler does not look inside for hidden-state updates.
CONTROL_FLOW_PRIMITIVES = frozenset({"scan", "while", "cond"})


def is_trainable_etp(eqn: JaxprEqn) -> bool:
    """An ETP primitive that bounds the ``y -> h`` walk (every ETP primitive but the gradient-enabled ones)."""
    return is_etp_primitive(eqn.primitive) and not is_gradient_enabled_primitive(eqn.primitive)


def sub_jaxprs(eqn: JaxprEqn) -> list[tuple[Jaxpr, Sequence[Any]]]:
    """The ``(jaxpr, consts)`` bodies held in an equation's parameters."""
    found: list[tuple[Jaxpr, Sequence[Any]]] = []
    for value in eqn.params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for item in values:
            if isinstance(item, ClosedJaxpr):
                found.append((item.jaxpr, item.consts))
            elif isinstance(item, Jaxpr):
                found.append((item, ()))
    return found


def contains_etp(jaxpr: Jaxpr) -> bool:
    """Whether ``jaxpr`` (or any body nested in it) binds an ETP primitive."""
    for eqn in jaxpr.eqns:
        if is_etp_primitive(eqn.primitive):
            return True
        if any(contains_etp(sub) for sub, _ in sub_jaxprs(eqn)):
            return True
    return False


def custom_call_name(eqn: JaxprEqn) -> str:
    """The user's name of a ``custom_jvp``/``custom_vjp`` function (from its body's debug info)."""
    for body, _ in sub_jaxprs(eqn):
        source = getattr(getattr(body, "debug_info", None), "func_src_info", None)
        if isinstance(source, str) and source:
            return source.split(" at ")[0]
    return str(eqn.params.get("name", eqn.primitive.name))


def _inline_target(eqn: JaxprEqn, notes: list[str]) -> tuple[Jaxpr, Sequence[Any]] | None:
    name = eqn.primitive.name
    if name in CALL_PRIMITIVES:
        subs = sub_jaxprs(eqn)
        return subs[0] if len(subs) == 1 else None
    if name in CUSTOM_DERIVATIVE_PRIMITIVES:
        subs = [s for s in sub_jaxprs(eqn) if len(s[0].invars) == len(eqn.invars)]
        if subs and contains_etp(subs[0][0]):
            notes.append(custom_call_name(eqn))
            return subs[0]
    return None


#: ``convert(eqn, invals, evaluate) -> outputs or None``: straight-line code for a control-flow equation.
Converter = Callable[[JaxprEqn, Sequence[Any], Callable[..., list[Any]]], Any]


#: ``on_etp(eqn, invals) -> outputs``: how an ETP equation met while evaluating is bound.
EtpBinder = Callable[[JaxprEqn, Sequence[Any]], Sequence[Any]]


def evaluate_inlined(
    jaxpr: Jaxpr | OpenJaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    notes: list[str],
    convert: Converter | None = None,
    on_etp: EtpBinder | None = None,
) -> list[Any]:
    """:func:`eval_jaxpr` with nested calls inlined (their bodies evaluated equation by equation).

    With ``convert``, each control-flow equation is first offered to it (it returns the outputs of
    straight-line code, or ``None`` to keep the equation). With ``on_etp``, every ETP equation met
    (at any depth of inlining, and inside bodies ``convert`` evaluates) is bound by it; the bodies
    ``convert`` evaluates may give their own ``on_etp``.
    """

    def evaluate(
        body: Jaxpr | OpenJaxpr,
        body_consts: Sequence[Any],
        body_args: Sequence[Any],
        body_on_etp: EtpBinder | None = None,
    ) -> list[Any]:
        return evaluate_inlined(body, body_consts, body_args, notes, convert, body_on_etp or on_etp)

    def bind(eqn: JaxprEqn, invals: Sequence[Any]) -> Sequence[Any]:
        if convert is not None and eqn.primitive.name in CONTROL_FLOW_PRIMITIVES:
            outs = convert(eqn, invals, evaluate)
            if outs is not None:
                return list(outs)
        if on_etp is not None and is_etp_primitive(eqn.primitive):
            return on_etp(eqn, invals)
        target = _inline_target(eqn, notes)
        return bind_eqn(eqn, invals) if target is None else evaluate(target[0], target[1], invals)

    env = eval_jaxpr_env(jaxpr, consts, *args, bind=bind)
    return [read_atom(env, v) for v in jaxpr.outvars]


def inline_calls(closed: ClosedJaxpr, own_outputs: Mapping[int, int] | None = None) -> tuple[ClosedJaxpr, list[str]]:
    """Re-trace ``closed`` with nested ``jit`` calls (and ETP-holding custom-derivative calls) inlined.

    Returns the flat jaxpr, whose invars and outvars correspond position by
    position to the original's, and the names of custom-derivative calls that
    had to be inlined because they contain ETP primitives.

    ``own_outputs`` maps output positions (hidden states) to the input
    position of the same state. Each such output is made the result of its
    own equation (a ``copy`` is added) when it would otherwise be another
    input of the step or the same variable as an earlier such output, so
    that every hidden state's new value is produced by a distinct equation
    (where its perturbation is added). An output that is its own input, or a
    constant, is left as is (the caller rejects those).
    """
    notes: list[str] = []
    flat = retrace(closed, own_outputs, lambda args: evaluate_inlined(closed.jaxpr, closed.consts, args, notes))
    return flat, notes


def retrace(
    closed: ClosedJaxpr, own_outputs: Mapping[int, int] | None, evaluate: Callable[[Sequence[Any]], list[Any]]
) -> ClosedJaxpr:
    """Trace ``evaluate`` (a re-evaluation of ``closed``) on ``closed``'s input shapes into a new jaxpr.

    The invars and outvars correspond position by position to ``closed``'s; ``own_outputs`` is as in
    :func:`inline_calls` (each hidden state's new value made the result of its own equation).
    """
    avals = [
        jax.ShapeDtypeStruct(aval_shape(v), aval_dtype(v), weak_type=getattr(v.aval, "weak_type", False))
        for v in closed.jaxpr.invars
    ]

    def flat_fn(*args: Any) -> list[Any]:
        outs = evaluate(args)
        seen: set[int] = set()
        for out_index, in_index in sorted((own_outputs or {}).items()):
            value = outs[out_index]
            if not isinstance(value, jax.core.Tracer) or value is args[in_index]:
                continue
            if id(value) in seen or any(value is arg for arg in args):
                value = jax.lax.copy_p.bind(value)
                outs[out_index] = value
            seen.add(id(value))
        return outs

    return jax.make_jaxpr(flat_fn)(*avals)


def forward_labels(
    eqns: Sequence[JaxprEqn],
    seeds: dict[Var, frozenset[Any]],
    *,
    cut: Callable[[JaxprEqn], bool] | None = None,
) -> dict[Var, frozenset[Any]]:
    """Propagate labels forward: each var gets the union of the labels of the vars it depends on.

    Equations for which ``cut(eqn)`` is true pass no labels to their outputs
    (the ``y -> h`` walk stops at a trainable ETP primitive).
    """
    labels: dict[Var, frozenset[Any]] = dict(seeds)
    empty: frozenset[Any] = frozenset()
    for eqn in eqns:
        if cut is not None and cut(eqn):
            continue
        union = empty.union(*(labels.get(v, empty) for v in eqn.invars if isinstance(v, Var)))
        if union:
            for var in eqn.outvars:
                if is_var(var):
                    labels[var] = labels.get(var, empty) | union
    return labels
