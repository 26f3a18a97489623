"""Structural test: is a slice of a jaxpr position-wise in some of its inputs?

A transition is position-wise when every output position depends only on
the same position of the inputs, so its Jacobian is block diagonal and one
forward-mode product with a vector of ones yields the diagonal blocks
exactly. Positions are aligned on the trailing axes, as in NumPy
broadcasting: a NumPy-style ``broadcast_in_dim`` (an unbatched ``(N,)``
value spread over ``(B, N)``) keeps a slice position-wise. The test is
conservative: an unknown primitive on a dependent value makes the slice
"not position-wise".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ._compat import Jaxpr, JaxprEqn, Var, aval_shape, scan_layout
from ._jaxpr_walk import CALL_PRIMITIVES, CUSTOM_DERIVATIVE_PRIMITIVES, is_trainable_etp, is_var, sub_jaxprs

__all__ = ["ELEMENTWISE_PRIMITIVES", "is_positionwise"]

#: Primitives that act position by position when their dependent operands have the output's shape.
ELEMENTWISE_PRIMITIVES = frozenset(
    {
        "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil",
        "clamp", "complex", "conj", "convert_element_type", "copy", "copy_p", "cos", "cosh", "digamma", "div",
        "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag", "integer_pow",
        "is_finite", "le", "lgamma", "log", "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg",
        "nextafter", "not", "or", "pow", "real", "reduce_precision", "rem", "round", "rsqrt", "select_n",
        "sign", "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh", "xor", "stop_gradient",
    }
)  # fmt: skip


def is_positionwise(
    eqns: Sequence[JaxprEqn], dependent: set[Var], cut: Callable[[JaxprEqn], bool] | None = None
) -> bool:
    """Whether every equation touching a var in ``dependent`` acts position-wise on it.

    ``dependent`` is updated in place with the outputs of such equations. Equations where ``cut``
    holds are held (their outputs do not depend on anything).
    """
    for eqn in eqns:
        hit = [i for i, v in enumerate(eqn.invars) if is_var(v) and v in dependent]
        if not hit or (cut is not None and cut(eqn)):
            continue
        if not _eqn_positionwise(eqn, hit):
            return False
        dependent.update(v for v in eqn.outvars if is_var(v))
    return True


def _broadcasts_to(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """Whether ``in_shape`` broadcasts to ``out_shape`` as in NumPy (trailing axes aligned, size 1 or equal)."""
    offset = len(out_shape) - len(in_shape)
    return offset >= 0 and all(i in (1, o) for i, o in zip(in_shape, out_shape[offset:], strict=True))


def _is_trailing_broadcast(eqn: JaxprEqn) -> bool:
    """A ``broadcast_in_dim`` that broadcasts like NumPy: operand axes aligned with the trailing output axes.

    Position ``p`` of the output then reads position ``p`` of the operand
    (its trailing axes, size-1 axes repeated), e.g. an unbatched ``(N,)``
    value spread over a batched ``(B, N)`` state.
    """
    in_shape, out_shape = aval_shape(eqn.invars[0]), aval_shape(eqn.outvars[0])
    offset = len(out_shape) - len(in_shape)
    if tuple(eqn.params.get("broadcast_dimensions", ())) != tuple(range(offset, len(out_shape))):
        return False
    return _broadcasts_to(in_shape, out_shape)


def _eqn_positionwise(eqn: JaxprEqn, hit: list[int]) -> bool:
    name = eqn.primitive.name
    out_shapes = [aval_shape(v) for v in eqn.outvars]
    if name in ELEMENTWISE_PRIMITIVES:
        # size-1 axes of an operand are repeated (recent JAX lets element-wise ops broadcast them)
        return all(_broadcasts_to(aval_shape(eqn.invars[i]), out_shapes[0]) for i in hit)
    if name == "broadcast_in_dim":
        return hit == [0] and _is_trailing_broadcast(eqn)
    if name in CUSTOM_DERIVATIVE_PRIMITIVES or name in CALL_PRIMITIVES:
        bodies = [b for b, _ in sub_jaxprs(eqn) if len(b.invars) == len(eqn.invars)]
        if not bodies:
            return False
        body: Jaxpr = bodies[0]
        inner = {body.invars[i] for i in hit}
        return is_positionwise(body.eqns, inner)
    if name == "scan":
        return _scan_positionwise(eqn, hit)
    return False


def _scan_positionwise(eqn: JaxprEqn, hit: list[int]) -> bool:
    """A scan whose body is position-wise in the hit inputs and in every carry they reach.

    Trainable ETP outputs inside are held (the twin of :mod:`etp_compiler._scan_descent` holds them),
    so a weight op on a dependent value does not count. Stacked outputs (a leading sub-step axis)
    that depend on the inputs are marked dependent by the caller; a consumer of them is then checked
    on their shapes.
    """
    n_consts, n_carry = scan_layout(eqn.params)
    body: Jaxpr = sub_jaxprs(eqn)[0][0]
    dependent = {body.invars[i] for i in hit}
    while True:
        reached = set(dependent)
        if not is_positionwise(body.eqns, reached, cut=is_trainable_etp):
            return False
        carried = {
            body.invars[n_consts + j] for j, v in enumerate(body.outvars[:n_carry]) if is_var(v) and v in reached
        }
        if carried <= dependent:
            return True
        dependent |= carried
