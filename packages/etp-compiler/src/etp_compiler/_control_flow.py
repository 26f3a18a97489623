r"""Control flow inside a model's step: what the compiler does with ``cond``, ``scan`` and ``while``.

The compiler reads one straight-line step. A ``lax.cond`` / ``lax.switch`` whose operands carry a
hidden state, or whose branches hold an ETP primitive, is *if-converted*: every branch is traced
and the outputs are selected by the branch index (``lax.select_n``), the same values as the
``cond``. A ``lax.scan`` (``brainstate.transform.for_loop``) of sub-steps is *unrolled* up to
``scan_unroll_limit`` iterations, so the hidden-to-hidden Jacobian of the whole step is composed
over the sub-steps and every ETP op inside is an equation of its own (a weight used in every
sub-step becomes one relation per sub-step; their traces sum to the weight's). A longer scan is
kept as a loop and the same quantities are read off it (``scan_descent='auto'``, see
:mod:`etp_compiler._scan_descent`). A
``lax.while_loop`` with a data-dependent trip count cannot be differentiated in reverse mode,
which a learner's step needs, so one that carries a hidden state or holds an ETP op is refused
(``fori_loop`` with static bounds is a ``scan`` already). Control flow that touches neither is
left as it is.

Converting changes the program, not its values: the converted step computes what the original
does (a ``cond`` then evaluates every branch, so the step costs the sum of the branches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from ._compat import ClosedJaxpr, Jaxpr, JaxprEqn, aval_dtype, aval_shape, scan_layout
from ._errors import CompilationError
from ._eval import is_var
from ._jaxpr_walk import CONTROL_FLOW_PRIMITIVES, contains_etp, evaluate_inlined, forward_labels, retrace, sub_jaxprs
from ._scan_descent import descended_scan

__all__ = ["ControlFlowPolicy", "convert_control_flow", "convert_step_control_flow"]

_COND = ("convert", "error")
_WHILE = ("error", "opaque-fwd")
_ETP_INSIDE = ("error", "instantaneous")
_SCAN_DESCENT = ("auto", "unroll", "error")


@dataclass(frozen=True)
class ControlFlowPolicy:
    """What the compiler does with each control-flow construct of a step (braintrace 0.2.8's names).

    Parameters
    ----------
    cond : {'convert', 'error'}
        A ``lax.cond`` / ``lax.switch`` touching a hidden state or holding an ETP op: if-convert it
        (every branch traced, outputs selected), or refuse it.
    scan_unroll_limit : int
        A ``lax.scan`` (``for_loop``) touching a hidden state or holding an ETP op is unrolled when its
        length is at most this.
    while_hidden : {'error', 'opaque-fwd'}
        A ``lax.while_loop`` touching a hidden state or holding an ETP op is refused: the learner's
        step is differentiated in reverse mode, which a data-dependent loop does not allow, so
        ``'opaque-fwd'`` (braintrace's forward-mode treatment) is refused with the same message.
    etp_in_control_flow : {'error', 'instantaneous'}
        An ETP op inside a construct that is not converted (a scan above the limit with
        ``scan_descent='error'``...): refuse, or leave the construct opaque so that the op's weight
        gets its instantaneous gradient only.
    scan_descent : {'auto', 'unroll', 'error'}
        A scan above ``scan_unroll_limit`` that touches a hidden state or holds an ETP op:
        ``'auto'`` keeps the loop and propagates the traces through it (see
        :mod:`etp_compiler._scan_descent`: one relation per sub-step, the values of the unrolled
        step); ``'unroll'`` unrolls it anyway; ``'error'`` refuses it with a message giving its
        length and the limit.
    fixpoint_iteration_limit : int
        Accepted for braintrace compatibility (its fixed-point solver); unused here.

    Examples
    --------
    >>> from etp_compiler import ControlFlowPolicy
    >>> ControlFlowPolicy(scan_unroll_limit=32).scan_unroll_limit
    32
    """

    cond: str = "convert"
    scan_unroll_limit: int = 16
    while_hidden: str = "opaque-fwd"
    etp_in_control_flow: str = "error"
    scan_descent: str = "auto"
    fixpoint_iteration_limit: int = 64

    def __post_init__(self) -> None:
        for name, allowed in (
            ("cond", _COND),
            ("while_hidden", _WHILE),
            ("etp_in_control_flow", _ETP_INSIDE),
            ("scan_descent", _SCAN_DESCENT),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ControlFlowPolicy: {name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("scan_unroll_limit", "fixpoint_iteration_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ControlFlowPolicy: {name} must be a non-negative int, got {value!r}.")


Evaluate = Callable[..., list[Any]]


def _body(closed: Any) -> tuple[Jaxpr, Sequence[Any]]:
    return (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())


def _touching(what: str) -> str:
    return f"a `{what}` in the model's step carries a hidden state or holds an ETP primitive"


def convert_control_flow(
    eqn: JaxprEqn,
    invals: Sequence[Any],
    evaluate: Evaluate,
    policy: ControlFlowPolicy,
    actions: list[str],
    touches_hidden: bool = True,
) -> list[Any] | None:
    """The outputs of a relevant control-flow equation computed by straight-line code, or ``None`` to keep it.

    ``evaluate(jaxpr, consts, args)`` evaluates a body (inlining what it holds); ``actions`` gets one
    line per construct converted or left opaque (for the diagnostics). ``touches_hidden``: whether the
    construct carries a hidden state (else it only holds an ETP op).
    """
    name = eqn.primitive.name
    opaque_ok = not touches_hidden and policy.etp_in_control_flow == "instantaneous"
    if name == "cond":
        if policy.cond == "error":
            raise CompilationError(
                f"{_touching('lax.cond')}, and ControlFlowPolicy(cond='error') refuses it; use cond='convert' "
                "(if-conversion) or write the switch with jnp.where."
            )
        branches = [_body(b) for b in eqn.params["branches"]]
        index, operands = invals[0], list(invals[1:])
        outs = [evaluate(jaxpr, consts, operands) for jaxpr, consts in branches]
        which = jnp.clip(jnp.asarray(index, jnp.int32), 0, len(branches) - 1)
        actions.append(f"lax.cond with {len(branches)} branches: if-converted (every branch traced, outputs selected)")
        return [jax.lax.select_n(which, *values) for values in zip(*outs, strict=True)]
    if name == "scan":
        length = int(eqn.params["length"])
        if length > policy.scan_unroll_limit and policy.scan_descent == "auto":
            return descended_scan(eqn, invals, evaluate, actions)
        if length > policy.scan_unroll_limit and policy.scan_descent == "error":
            if opaque_ok:
                actions.append(f"lax.scan of length {length}: left opaque, its ETP ops get instantaneous gradients")
                return None
            raise CompilationError(
                f"{_touching('lax.scan')} of length {length}, above ControlFlowPolicy.scan_unroll_limit="
                f"{policy.scan_unroll_limit}, and scan_descent='error' refuses it; raise the limit, use "
                "scan_descent='auto' (propagate the traces through the scan) or 'unroll', or move the loop out of "
                "the step."
            )
        return _unrolled_scan(eqn, invals, evaluate, actions)
    if name == "while":
        if opaque_ok:
            actions.append("lax.while_loop: left opaque, its ETP ops get instantaneous gradients")
            return None
        raise CompilationError(
            f"{_touching('lax.while_loop')}: a learner differentiates its step in reverse mode, which a loop with "
            "a data-dependent trip count does not allow (ControlFlowPolicy.while_hidden="
            f"{policy.while_hidden!r}). Use a fixed trip count (lax.fori_loop with static bounds, or "
            "brainstate.transform.for_loop), which the compiler unrolls."
        )
    return None


def _unrolled_scan(eqn: JaxprEqn, invals: Sequence[Any], evaluate: Evaluate, actions: list[str]) -> list[Any]:
    params = eqn.params
    length, reverse = int(params["length"]), bool(params["reverse"])
    n_consts, n_carry = scan_layout(params)
    jaxpr, consts = _body(params["jaxpr"])
    const_vals, carry = list(invals[:n_consts]), list(invals[n_consts : n_consts + n_carry])
    xs = list(invals[n_consts + n_carry :])
    ys: list[list[Any]] = [[] for _ in range(len(jaxpr.outvars) - n_carry)]
    for i in reversed(range(length)) if reverse else range(length):
        out = evaluate(jaxpr, consts, [*const_vals, *carry, *(x[i] for x in xs)])
        carry = list(out[:n_carry])
        for slot, y in zip(ys, out[n_carry:], strict=True):
            slot.append(y)
    stacked = []
    for slot, var in zip(ys, jaxpr.outvars[n_carry:], strict=True):
        if reverse:
            slot.reverse()
        stacked.append(jnp.stack(slot) if slot else jnp.zeros((0, *aval_shape(var)), aval_dtype(var)))
    actions.append(f"lax.scan of length {length}: unrolled (the sub-steps composed into the step)")
    return [*carry, *stacked]


def convert_step_control_flow(
    closed: ClosedJaxpr, own_outputs: Mapping[int, int] | None, policy: ControlFlowPolicy | None
) -> tuple[ClosedJaxpr, list[str]]:
    """The step jaxpr (calls already inlined) with its relevant control flow converted, and what was done.

    A top-level construct is relevant when an input carries a hidden state's old value (dependency
    labels from the hidden-state invars, the inputs of ``own_outputs``) or a body holds an ETP
    primitive. Inside a converted body, constructs holding an ETP op follow the policy, and the others
    are converted where they can be (every ``cond``, a ``scan`` within the limit) and kept otherwise;
    the hidden-group stage still refuses a hidden state whose update passes through one kept.
    Without relevant control flow the jaxpr is returned as it is.
    """
    policy = ControlFlowPolicy() if policy is None else policy
    jaxpr = closed.jaxpr
    flows = [e for e in jaxpr.eqns if e.primitive.name in CONTROL_FLOW_PRIMITIVES]
    if not flows:
        return closed, []
    hidden_inputs = {jaxpr.invars[i] for i in set((own_outputs or {}).values())}
    labels = forward_labels(jaxpr.eqns, {v: frozenset({"hidden"}) for v in hidden_inputs})
    top_level = {id(e) for e in jaxpr.eqns}
    relevant: dict[int, bool] = {}
    for eqn in flows:
        touches = any(is_var(v) and labels.get(v) for v in eqn.invars)
        if touches or any(contains_etp(body) for body, _ in sub_jaxprs(eqn)):
            relevant[id(eqn)] = touches
    if not relevant:
        return closed, []
    actions: list[str] = []

    def convert(eqn: JaxprEqn, invals: Sequence[Any], evaluate: Evaluate) -> list[Any] | None:
        key = id(eqn)
        if key in relevant:
            return convert_control_flow(eqn, invals, evaluate, policy, actions, relevant[key])
        if key in top_level:
            return None  # touches no hidden state and holds no ETP op: left as it is
        if any(contains_etp(body) for body, _ in sub_jaxprs(eqn)):
            return convert_control_flow(eqn, invals, evaluate, policy, actions, touches_hidden=False)
        name = eqn.primitive.name
        if name == "cond" or (name == "scan" and int(eqn.params["length"]) <= policy.scan_unroll_limit):
            return convert_control_flow(eqn, invals, evaluate, policy, actions, touches_hidden=False)
        return None

    notes: list[str] = []
    flat = retrace(
        closed, own_outputs, lambda args: evaluate_inlined(closed.jaxpr, closed.consts, args, notes, convert)
    )
    return flat, actions
