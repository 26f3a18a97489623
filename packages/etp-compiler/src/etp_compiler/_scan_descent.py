r"""A ``lax.scan`` of sub-steps propagated without unrolling ("scan descent").

A scan above ``ControlFlowPolicy.scan_unroll_limit`` stays a scan. It is rewritten so that the
trace quantities of every ETP op inside can be read off one evaluation of the loop:

* each trainable ETP equation :math:`y_k = \mathrm{op}(x_k, W)` of the body gets an extra scanned
  input :math:`\delta_k` (zeros, shape ``(K, *y.shape)``) added to its output, and its input and
  output become two extra stacked outputs :math:`(x_k)_k`, :math:`(y_k)_k` of the scan;
* loop-invariant equations of the body (a weight's mask, its sign constraint...) are hoisted
  before the loop, so every trainable input inside is a constant of the scan;
* a *twin* of the rewritten equation, with every trainable ETP output inside held
  (``stop_gradient``), replaces it in the slices the compiler cuts out of the step (the hidden
  transition, the ``y -> h`` maps): held outputs are what the hidden-to-hidden Jacobian of an
  unrolled step holds too.

For sub-step :math:`k`, :math:`D_{f,k} = \partial h^t/\partial y_k` is then
:math:`\partial h^t/\partial\delta_k`: all :math:`K` of them come from one reverse-mode product
per hidden state through the twin (exact when :math:`\delta_k \mapsto h^t` is position-wise),
and :math:`D = \partial h^t/\partial h^{t-1}` from the twin's forward-mode product. The values are
those of the unrolled step, while the step keeps one loop of :math:`K` iterations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from etp_primitives import ETP_X_INVAR_INDICES, ETP_Y_OUTVAR_INDICES, is_etp_primitive

from ._compat import Jaxpr, JaxprEqn, Var, aval_dtype, aval_shape, new_jaxpr, replace_params, scan_layout
from ._errors import CompilationError
from ._eval import bind_eqn, eval_jaxpr_env, is_var, read_atom
from ._jaxpr_walk import contains_etp, is_trainable_etp, sub_jaxprs
from ._scan_boundary import Boundary, boundary_of

__all__ = ["DescentScan", "descent_scans", "descended_scan", "with_twins"]

#: The name of the rewritten body; :func:`descent_scans` finds the rewritten scans by it.
_BODY_NAME = "_etp_scan_descent_body"

_ACTIVE: list[int] = []


@contextlib.contextmanager
def _descending() -> Iterator[None]:
    _ACTIVE.append(1)
    try:
        yield
    finally:
        _ACTIVE.pop()


def _body(closed: Any) -> tuple[Jaxpr, Sequence[Any]]:
    return (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())


def _hoistable(eqn: JaxprEqn) -> bool:
    if is_etp_primitive(eqn.primitive) or getattr(eqn, "effects", None):
        return False
    return not any(contains_etp(sub) for sub, _ in sub_jaxprs(eqn))


def _split_invariant(jaxpr: Jaxpr, n_consts: int) -> tuple[list[JaxprEqn], list[JaxprEqn]]:
    """The body's equations that read neither the carry nor the scanned inputs (hoisted), and the rest."""
    variant = set(jaxpr.invars[n_consts:])
    hoisted: list[JaxprEqn] = []
    kept: list[JaxprEqn] = []
    for eqn in jaxpr.eqns:
        if any(is_var(v) and v in variant for v in eqn.invars) or not _hoistable(eqn):
            kept.append(eqn)
            variant.update(v for v in eqn.outvars if is_var(v))
        else:
            hoisted.append(eqn)
    return hoisted, kept


def _shapes(carry: Sequence[Any], x_shapes: Sequence[Any], xs: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Shape-only stand-ins of the carry and of one slice of the scanned inputs."""
    return (
        [jax.ShapeDtypeStruct(jnp.shape(c), jnp.result_type(c)) for c in carry],
        [jax.ShapeDtypeStruct(shape, jnp.result_type(x)) for shape, x in zip(x_shapes, xs, strict=True)],
    )


class _Recorder:
    """Binds the body's ETP equations: adds each trainable output's delta and records its ``x`` and ``y``."""

    def __init__(self, deltas: Sequence[Any] | None) -> None:
        self.deltas = deltas
        self.records: list[tuple[Any, Any]] = []

    def __call__(self, eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
        outs = bind_eqn(eqn, invals)
        if not is_trainable_etp(eqn):
            return outs
        y_index = ETP_Y_OUTVAR_INDICES.get(eqn.primitive, 0)
        x_index = ETP_X_INVAR_INDICES.get(eqn.primitive)
        y = outs[y_index]
        x = invals[x_index] if x_index is not None else jnp.zeros((), aval_dtype(eqn.outvars[y_index]))
        if self.deltas is not None:
            outs[y_index] = y + self.deltas[len(self.records)]
        self.records.append((x, y))
        return outs


Evaluate = Callable[..., list[Any]]


def descended_scan(eqn: JaxprEqn, invals: Sequence[Any], evaluate: Evaluate, actions: list[str]) -> list[Any]:
    """The outputs of ``eqn`` (a scan) computed by the rewritten scan of the module docstring.

    ``evaluate(jaxpr, consts, args, on_etp)`` evaluates a body with nested control flow converted.

    Raises
    ------
    CompilationError
        For a scan propagated this way inside another one.
    """
    params = eqn.params
    length, reverse = int(params["length"]), bool(params["reverse"])
    if _ACTIVE:
        raise CompilationError(
            f"a lax.scan of length {length} above ControlFlowPolicy.scan_unroll_limit sits inside another scan "
            "propagated without unrolling; only the outer loop can be propagated that way. Raise "
            "scan_unroll_limit so the inner one is unrolled, or use scan_descent='unroll'."
        )
    n_consts, n_carry = scan_layout(params)
    jaxpr, consts = _body(params["jaxpr"])
    const_vals, carry = list(invals[:n_consts]), list(invals[n_consts : n_consts + n_carry])
    xs = list(invals[n_consts + n_carry :])
    hoisted, kept = _split_invariant(jaxpr, n_consts)
    env = eval_jaxpr_env(
        new_jaxpr(jaxpr.constvars, jaxpr.invars[:n_consts], [], hoisted, "loop-invariant part of a scan body"),
        consts,
        *const_vals,
    )
    invariant = [v for e in hoisted for v in e.outvars if is_var(v)]
    inner = new_jaxpr(
        [*jaxpr.constvars, *jaxpr.invars[:n_consts], *invariant],
        jaxpr.invars[n_consts:],
        jaxpr.outvars,
        kept,
        "scan body",
    )
    inner_consts = [*consts, *const_vals, *(env[v] for v in invariant)]
    boundary = boundary_of(kept, inner.invars[:n_carry], inner.outvars[:n_carry])

    def run(carry_vals: Sequence[Any], x_vals: Sequence[Any], recorder: _Recorder, eps: Sequence[Any] = ()) -> Any:
        with _descending():
            if not boundary:
                return evaluate(inner, inner_consts, [*carry_vals, *x_vals], recorder), []
            return _run_with_boundary(inner, inner_consts, [*carry_vals, *x_vals], evaluate, recorder, boundary, eps)

    counter = _Recorder(None)
    jax.eval_shape(lambda c, x: run(c, x, counter), *_shapes(carry, [jnp.shape(x)[1:] for x in xs], xs))
    deltas = [jnp.zeros((length, *jnp.shape(y)), jnp.result_type(y)) for _, y in counter.records]
    eps = [jnp.zeros((length, *aval_shape(b.var)), aval_dtype(b.var)) for b in boundary]

    def _etp_scan_descent_body(carry_vals: list[Any], slices: tuple[list[Any], list[Any], list[Any]]) -> Any:
        recorder = _Recorder(slices[1])
        outs, values = run(carry_vals, slices[0], recorder, slices[2])
        if len(recorder.records) != len(deltas):
            raise CompilationError(
                f"the body of a lax.scan of length {length} binds a different number of ETP primitives when traced "
                f"twice ({len(deltas)}, then {len(recorder.records)}); its trace structure must not change."
            )
        return outs[:n_carry], [*outs[n_carry:], *(v for record in recorder.records for v in record), *values]

    # the layout of the boundary (carried input or not, in order) travels in the body's name (descent_scans)
    _etp_scan_descent_body.__name__ = _BODY_NAME + "".join("c" if b.carried else "p" for b in boundary)
    carry_out, ys = jax.lax.scan(_etp_scan_descent_body, carry, (xs, deltas, eps), length=length, reverse=reverse)
    actions.append(
        f"lax.scan of length {length}: propagated through the scan without unrolling ({len(deltas)} ETP op(s) "
        "inside, one relation per sub-step)"
    )
    return [*carry_out, *ys[: len(ys) - 2 * len(deltas) - len(boundary)]]


def _run_with_boundary(
    inner: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    evaluate: Evaluate,
    recorder: _Recorder,
    boundary: Sequence[Boundary],
    eps: Sequence[Any],
) -> tuple[list[Any], list[Any]]:
    """The body equation by equation, each boundary value recorded and ``eps`` added where the off-path reads it."""
    env: dict[Any, Any] = dict(zip(inner.constvars, consts, strict=True))
    env.update(zip(inner.invars, args, strict=True))
    added = {id(b.var): (b, e) for b, e in zip(boundary, eps, strict=False)}
    for eqn in inner.eqns:
        names = list(dict.fromkeys(v for v in eqn.invars if is_var(v)))
        vals = []
        for v in names:
            value = env[v]
            entry = added.get(id(v))
            if entry is not None and id(eqn) in entry[0].readers:
                value = value + entry[1]
            vals.append(value)
        one = new_jaxpr([], names, eqn.outvars, [eqn], "one equation of a scan body")
        for var, value in zip(eqn.outvars, evaluate(one, [], vals, recorder), strict=True):
            if is_var(var):
                env[var] = value
    return [read_atom(env, v) for v in inner.outvars], [env[b.var] for b in boundary]


@dataclass(frozen=True, eq=False)
class DescentScan:
    """A scan of the step rewritten by :func:`descended_scan`, as found in the step jaxpr.

    Attributes
    ----------
    eqn : JaxprEqn
        The scan equation of the step jaxpr.
    twin : JaxprEqn
        The same equation with every trainable ETP output inside held (used in slices).
    body : Jaxpr
        Its body; ``etp_eqns`` are its trainable ETP equations, in order.
    length, n_consts, n_carry, n_xs, n_ys : int
        The trip count and the layout of the original scan (``n_xs`` scanned inputs, ``n_ys``
        stacked outputs, before the ones the rewrite added).
    boundary_carried : tuple of bool
        For each boundary value of the body (``_scan_boundary``: a value of the transition that the
        rest of the body reads), whether it is a carried input (an observable from the second
        iteration on: the first reads the step's old state).
    reverse : bool
        Whether the loop runs over its slots backwards (its first iteration is slot ``length - 1``).
    """

    eqn: JaxprEqn
    twin: JaxprEqn
    body: Jaxpr
    etp_eqns: tuple[JaxprEqn, ...]
    length: int
    n_consts: int
    n_carry: int
    n_xs: int
    n_ys: int
    boundary_carried: tuple[bool, ...] = ()
    reverse: bool = False

    @property
    def first_slot(self) -> int:
        """The slot of the first iteration (``0``, or ``length - 1`` for a reverse loop)."""
        return self.length - 1 if self.reverse else 0

    def boundary_stack_var(self, i: int) -> Var:
        """The stacked values (leading axis ``K``) of boundary value ``i``."""
        return self.eqn.outvars[self.n_carry + self.n_ys + 2 * len(self.etp_eqns) + i]

    def boundary_eps_var(self, i: int) -> Var:
        """The zeros (shape ``(K, *value.shape)``) added to boundary value ``i`` where the body's off-path reads it."""
        var = self.eqn.invars[self.n_consts + self.n_carry + self.n_xs + len(self.etp_eqns) + i]
        assert is_var(var)
        return var

    def delta_var(self, r: int) -> Var:
        """The zeros added to the output of ETP equation ``r`` (shape ``(K, *y.shape)``)."""
        var = self.eqn.invars[self.n_consts + self.n_carry + self.n_xs + r]
        assert is_var(var)
        return var

    def x_stack_var(self, r: int) -> Var:
        """The stacked inputs ``x_k`` of ETP equation ``r``."""
        return self.eqn.outvars[self.n_carry + self.n_ys + 2 * r]

    def y_stack_var(self, r: int) -> Var:
        """The stacked outputs ``y_k`` of ETP equation ``r``."""
        return self.eqn.outvars[self.n_carry + self.n_ys + 2 * r + 1]

    def body_position(self, var: Any) -> int | None:
        """The position of a body input among the scan's inputs (``None`` when ``var`` is not one)."""
        for i, v in enumerate(self.body.invars):
            if v is var:
                return i
        return None


def _held_body(body: Jaxpr, consts: Sequence[Any]) -> Any:
    """``body`` re-traced with every trainable ETP output passed through ``stop_gradient``."""

    def bind(eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
        outs = bind_eqn(eqn, invals)
        return [jax.lax.stop_gradient(o) for o in outs] if is_trainable_etp(eqn) else outs

    def held(*args: Any) -> list[Any]:
        env = eval_jaxpr_env(body, consts, *args, bind=bind)
        return [read_atom(env, v) for v in body.outvars]

    avals = [
        jax.ShapeDtypeStruct(aval_shape(v), aval_dtype(v), weak_type=getattr(v.aval, "weak_type", False))
        for v in body.invars
    ]
    return jax.make_jaxpr(held)(*avals)


def _descended_layout(eqn: JaxprEqn) -> str | None:
    """For a scan :func:`descended_scan` wrote: its boundary layout (``'c'``/``'p'`` per value); else ``None``."""
    if eqn.primitive.name != "scan":
        return None
    body, _ = _body(eqn.params["jaxpr"])
    source = getattr(getattr(body, "debug_info", None), "func_src_info", None)
    if not isinstance(source, str):
        return None
    name = source.split(" at ")[0]
    rest = name[len(_BODY_NAME) :]
    return rest if name.startswith(_BODY_NAME) and set(rest) <= {"c", "p"} else None


def descent_scans(jaxpr: Jaxpr) -> tuple[DescentScan, ...]:
    """The scans of ``jaxpr`` (top level) that :func:`descended_scan` wrote, with their twins."""
    found = []
    for eqn in jaxpr.eqns:
        layout = _descended_layout(eqn)
        if layout is None:
            continue
        body, consts = _body(eqn.params["jaxpr"])
        n_consts, n_carry = scan_layout(eqn.params)
        etp_eqns = tuple(e for e in body.eqns if is_trainable_etp(e))
        r = len(etp_eqns)
        n_b = len(layout)
        found.append(
            DescentScan(
                eqn=eqn,
                twin=replace_params(eqn, jaxpr=_held_body(body, consts)),
                body=body,
                etp_eqns=etp_eqns,
                length=int(eqn.params["length"]),
                n_consts=n_consts,
                n_carry=n_carry,
                n_xs=len(eqn.invars) - n_consts - n_carry - r - n_b,
                n_ys=len(eqn.outvars) - n_carry - 2 * r - n_b,
                boundary_carried=tuple(c == "c" for c in layout),
                reverse=bool(eqn.params["reverse"]),
            )
        )
    return tuple(found)


def with_twins(eqns: Sequence[JaxprEqn], scans: Sequence[DescentScan]) -> list[JaxprEqn]:
    """``eqns`` with each rewritten scan replaced by its twin (for a slice of the step)."""
    twins = {id(s.eqn): s.twin for s in scans}
    return [twins.get(id(e), e) for e in eqns]
