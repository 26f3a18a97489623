r"""Two-operand Einstein summation with a weight: ``etp_einsum``.

.. math::

    y_{Y} = \sum_{\text{summed}} x_{X}\, W_{K},

for an equation ``"X,K->Y"`` (subscripts of ``x``, the weight and ``y``), with
the equation (made explicit: no ``...``, an output) as the static parameter
``equation``. Invars ``(x, weight)``; trainable key ``weight`` (invar 1).

**D-RTRL trace layout, derived from the equation.** Split the output
subscripts into the *batch* subscripts :math:`B` (in ``y`` and ``x`` but not
in the weight) and the weight's subscripts :math:`Y_K = Y \cap K`. A weight
element :math:`W_k` feeds exactly the outputs :math:`y_{b, k_Y}` for every
batch position :math:`b`, so the trace is stored with the batch subscripts in
front of the weight's axes, :math:`\epsilon_{b k}` (shape
``(*[size of c for c in B], *weight.shape)``), and

.. math::

    \mathrm{yw\_to\_w}(d, \epsilon)_{bk} = \epsilon_{bk}\, d_{b k_Y},\quad
    \mathrm{seed}(x, d)_{bk} = d_{b k_Y} \frac{\partial y_{b k_Y}}{\partial W_k},\quad
    \frac{\partial L}{\partial W_k} = \sum_b g_{b k_Y}\, \epsilon_{bk},

each one ``jnp.einsum`` (``"BK,Y->BK"``, ``"X,Y->BK"``, ``"BK,Y->K"``). For
``"...i,io->...o"`` this is the dense layout of :func:`etp_primitives.matmul`.
Exact for dynamics that are position-wise in ``y`` (a leak per output
element); memory :math:`O(|B| \cdot |W|)` per hidden state.

**What cannot be traced**: a weight subscript repeated within the weight
(``"ii"``: a diagonal, whose elements do not map to one output position each),
an ellipsis in the weight's subscripts, more or fewer than two operands; the
functions raise a ``ValueError`` naming the equation and the reason.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from .._checks import as_array
from .._primitive import set_batching_rule
from .._trace import aval_of
from .._units import attach_unit, product_unit, split_unit
from ._common import apply_weight_fn, register_builtin, weight_dtype, zeros_with_state_axis

__all__ = ["etp_einsum_p", "einsum", "EinsumLayout", "einsum_layout"]

_WHERE = "einsum (etp_einsum)"
_LETTERS = string.ascii_letters


@dataclass(frozen=True)
class EinsumLayout:
    """The subscripts of an explicit two-operand equation and the D-RTRL trace layout derived from them.

    Attributes
    ----------
    x, weight, y : str
        The subscripts of ``x``, the weight and the output.
    batch : str
        Output subscripts not in the weight (they come from ``x``): the leading axes of the trace.
    shared : str
        Subscripts of ``x`` that the weight names too (in the weight's order).
    weight_only : str
        Weight subscripts in neither ``x`` nor the output (summed over the weight alone).
    """

    x: str
    weight: str
    y: str
    batch: str
    shared: str
    weight_only: str

    @property
    def equation(self) -> str:
        """The explicit equation ``"x,weight->y"``."""
        return f"{self.x},{self.weight}->{self.y}"

    @property
    def trace(self) -> str:
        """The trace's subscripts: the batch subscripts, then the weight's."""
        return self.batch + self.weight


def _untraceable(equation: str, why: str) -> ValueError:
    return ValueError(f"{_WHERE}: cannot trace the equation {equation!r}: {why}.")


def _invalid(equation: str, why: str) -> ValueError:
    return ValueError(f"{_WHERE}: invalid equation {equation!r}: {why}.")


def _split_equation(equation: str) -> tuple[str, str, str | None]:
    if not isinstance(equation, str):
        raise TypeError(f"{_WHERE}: equation must be a str such as 'bi,io->bo', got {type(equation).__name__}.")
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    operands = lhs.split(",")
    if len(operands) != 2:
        raise _untraceable(equation, f"it has {len(operands)} operand(s); etp einsum takes exactly two, x and weight")
    bad = sorted(set(eq) - set(_LETTERS) - set(",->."))
    if bad or "->" in rhs or (arrow == "" and ">" in eq):
        raise _invalid(equation, f"subscripts must be letters (and '...'), got {bad or ['->']}")
    for subs, what in ((operands[0], "x"), (operands[1], "weight"), (rhs, "output")):
        if subs.replace("...", "", 1).count(".") or subs.count("...") > 1:
            raise _invalid(equation, f"the {what} subscripts {subs!r} have a stray '.'")
    if "." in operands[1]:
        raise _untraceable(equation, "an ellipsis in the weight's subscripts (name every weight axis)")
    return operands[0], operands[1], rhs if arrow else None


@functools.lru_cache(maxsize=512)
def einsum_layout(equation: str, x_ndim: int, w_ndim: int) -> EinsumLayout:
    """Parse a two-operand ``equation`` for operands of ``x_ndim`` and ``w_ndim`` axes into its :class:`EinsumLayout`.

    An ellipsis in ``x`` (and the output) becomes unused letters; an equation
    without ``->`` gets NumPy's implicit output (the ellipsis axes, then the
    subscripts seen once, sorted).

    Raises
    ------
    ValueError
        If the equation is not a two-operand einsum for these ranks, or it cannot be traced
        (a repeated or ellipsis weight subscript); the message names the equation and why.
    """
    x_raw, w_subs, y_raw = _split_equation(equation)
    if y_raw is not None and "..." in y_raw and "..." not in x_raw:
        raise _invalid(equation, "'...' in the output but not in x")
    named = len(x_raw.replace("...", ""))
    n_ell = x_ndim - named if "..." in x_raw else 0
    if n_ell < 0 or ("..." not in x_raw and named != x_ndim):
        raise ValueError(f"{_WHERE}: the equation {equation!r} names {named} axes of x, but x has {x_ndim}.")
    if len(w_subs) != w_ndim:
        raise ValueError(
            f"{_WHERE}: the equation {equation!r} names {len(w_subs)} axes of the weight, but it has {w_ndim}."
        )
    unused = [c for c in _LETTERS if c not in equation]
    if len(unused) < n_ell:
        raise _invalid(equation, f"too many axes under '...' ({n_ell}) for the letters left")
    ell = "".join(unused[:n_ell])
    x_subs = x_raw.replace("...", ell)
    if y_raw is None:
        once = sorted(c for c in set(x_subs + w_subs) if c not in ell and (x_subs + w_subs).count(c) == 1)
        y_subs = ell + "".join(once)
    else:
        y_subs = y_raw.replace("...", ell)
    repeated_w = sorted({c for c in w_subs if w_subs.count(c) > 1})
    if repeated_w:
        raise _untraceable(
            equation,
            f"the subscript(s) {repeated_w} repeat within the weight (a diagonal): its elements do not each feed "
            "one set of output positions, which the weight-shaped trace needs",
        )
    repeated_y = sorted({c for c in y_subs if y_subs.count(c) > 1})
    if repeated_y:
        raise _invalid(equation, f"output subscript(s) {repeated_y} repeat")
    missing = sorted(set(y_subs) - set(x_subs) - set(w_subs))
    if missing:
        raise _invalid(equation, f"output subscript(s) {missing} are in no operand")
    batch = "".join(c for c in y_subs if c not in w_subs)
    shared = "".join(c for c in w_subs if c in x_subs)
    weight_only = "".join(c for c in w_subs if c not in x_subs and c not in y_subs)
    return EinsumLayout(x_subs, w_subs, y_subs, batch, shared, weight_only)


def _bound_layout(equation: str) -> EinsumLayout:
    """The layout of the canonical equation a bound ``etp_einsum`` carries (``x`` = batch + shared subscripts)."""
    lhs, _, _ = equation.partition("->")
    x_subs, w_subs = lhs.split(",")
    return einsum_layout(equation, len(x_subs), len(w_subs))


def _unflatten_x(x: jax.Array, lay: EinsumLayout, w_shape: Sequence[int]) -> jax.Array:
    """The bound ``x`` of shape ``(*batch, prod(shared))`` as ``(*batch, *shared)``."""
    sizes = dict(zip(lay.weight, w_shape))
    return x.reshape((*x.shape[:-1], *(sizes[c] for c in lay.shared)))


def _einsum_impl(x: jax.Array, weight: jax.Array, *, equation: str) -> jax.Array:
    return jnp.einsum(equation, _unflatten_x(x, _bound_layout(equation), weight.shape), weight)


def _trainable(params: dict[str, Any]) -> dict[str, int]:
    del params
    return {"weight": 1}


def _yw_to_w(hidden_dim: jax.Array, trace: dict[str, jax.Array], *, equation: str) -> dict[str, jax.Array]:
    lay = _bound_layout(equation)
    return {"weight": jnp.einsum(f"{lay.trace},{lay.y}->{lay.trace}", trace["weight"], hidden_dim)}


def _seed(x: jax.Array, hidden_dim: jax.Array, weights: dict[str, jax.Array], *, equation: str) -> dict[str, jax.Array]:
    lay = _bound_layout(equation)
    w = weights["weight"]
    operands: list[Any] = [_unflatten_x(x, lay, w.shape), hidden_dim]
    subs = [lay.x, lay.y]
    if lay.weight_only:
        # dy/dW does not depend on a subscript summed over the weight alone: the seed is broadcast along it
        sizes = dict(zip(lay.weight, w.shape))
        operands.append(jnp.ones(tuple(sizes[c] for c in lay.weight_only), dtype=hidden_dim.dtype))
        subs.append(lay.weight_only)
    return {"weight": jnp.einsum(f"{','.join(subs)}->{lay.trace}", *operands)}


def _grad(
    x: jax.Array, cotangent: jax.Array, trace: dict[str, jax.Array], weights: dict[str, jax.Array], *, equation: str
) -> dict[str, jax.Array]:
    lay = _bound_layout(equation)
    return {"weight": jnp.einsum(f"{lay.trace},{lay.y}->{lay.weight}", trace["weight"], cotangent)}


def _init_drtrl(x_var: Any, y_var: Any, weight_vars: dict[str, Any], num_hidden_state: int) -> dict[str, jax.Array]:
    # the bound x is (*batch, prod(shared)): its leading axes are the trace's batch axes
    batch = tuple(aval_of(x_var).shape[:-1])
    w = aval_of(weight_vars["weight"])
    return {"weight": zeros_with_state_axis((*batch, *w.shape), weight_dtype(weight_vars, "weight"), num_hidden_state)}


#: Two-operand einsum with a weight; the static ``equation`` is canonical (``x`` = batch + shared subscripts).
etp_einsum_p = register_builtin(
    "etp_einsum",
    _einsum_impl,
    _trainable,
    batched=False,  # the trace's batch axes are not x's axis 0: the rules below handle them
    yw_to_w=_yw_to_w,
    init_drtrl=_init_drtrl,
    drtrl_seed=_seed,
    drtrl_grad=_grad,
)


def _batch_einsum(args: Sequence[Any], dims: Sequence[int | None], *, equation: str) -> tuple[Any, int]:
    """``vmap`` over ``x`` alone: one more batch subscript in front of ``x`` and ``y`` (the marker stays)."""
    free = [c for c in _LETTERS if c not in equation]
    if dims[0] is not None and dims[1] is None and free:
        lhs, _, y_subs = equation.partition("->")
        x_subs, w_subs = lhs.split(",")
        new = free[0]
        x = jnp.moveaxis(args[0], dims[0], 0)
        return etp_einsum_p.bind(x, args[1], equation=f"{new}{x_subs},{w_subs}->{new}{y_subs}"), 0
    return jax.vmap(functools.partial(_einsum_impl, equation=equation), in_axes=tuple(dims))(*args), 0


set_batching_rule(etp_einsum_p, _batch_einsum)


def einsum(equation: str, x: Any, weight: Any, *, weight_fn: Callable[[Any], Any] | None = None) -> Any:
    r"""ETP-marked two-operand einsum :math:`y = \mathrm{einsum}(\text{equation}, x, f(W))`.

    The same result as ``jnp.einsum(equation, x, weight_fn(weight))``. Before
    the marker, ``x`` is brought into the layout the trace needs: its axes
    that are summed alone (not in the weight, not in the output) are summed,
    the output's *batch* axes (in ``x`` and the output, not in the weight) are
    put first in output order and the axes shared with the weight are
    flattened into one trailing axis; the bound ``etp_einsum`` then carries
    the canonical equation as its static parameter.

    Parameters
    ----------
    equation : str
        Two operands, ``"X,K->Y"`` (or implicit ``"X,K"``, NumPy's output);
        letters, and ``...`` in ``x`` and the output.
    x : Array or Quantity
        The input (any dtype ``jnp.einsum`` takes).
    weight : Array or Quantity
        The weight (after ``weight_fn``), one named axis per subscript.
    weight_fn : callable, optional
        A plain-JAX transform of ``weight`` applied before the marker (braintrace 0.2.8
        keyword); the compiler traces the transformed weight back to its ParamState.

    Returns
    -------
    Array or Quantity
        Shaped by the output subscripts; unit ``unit(x) * unit(weight)``.

    Raises
    ------
    ValueError
        If the equation is malformed, does not fit the shapes, or cannot be traced (a weight
        subscript repeated within the weight, an ellipsis in the weight, not two operands); the
        message names the equation and why.
    TypeError
        If ``equation`` is not a str or ``weight_fn`` not callable.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> etp.einsum("bi,io->bo", jnp.ones((4, 3)), jnp.ones((3, 5))).shape
    (4, 5)
    >>> print(etp.einsum("bgi,gio->bgo", jnp.ones((1, 2, 3)), jnp.ones((2, 3, 1)))[0, :, 0].tolist())
    [3.0, 3.0]
    """
    weight = apply_weight_fn(weight_fn, weight, _WHERE, "weight_fn", "weight")
    x_m, x_unit = split_unit(x)
    w_m, w_unit = split_unit(weight)
    x_m = as_array(x_m, _WHERE, "x")
    w_m = as_array(w_m, _WHERE, "weight")
    lay = einsum_layout(equation, x_m.ndim, w_m.ndim)
    sizes: dict[str, int] = {}
    for subs, shape, what in ((lay.x, x_m.shape, "x"), (lay.weight, w_m.shape, "weight")):
        for c, n in zip(subs, shape):
            if sizes.setdefault(c, n) != n:
                raise ValueError(
                    f"{_WHERE}: subscript {c!r} of the equation {equation!r} has size {sizes[c]} in one place and {n} "
                    f"in {what} (x shape {tuple(x_m.shape)}, weight shape {tuple(w_m.shape)})."
                )
    x_bound = jnp.einsum(f"{lay.x}->{lay.batch}{lay.shared}", x_m)
    x_bound = x_bound.reshape((*x_bound.shape[: len(lay.batch)], -1 if lay.shared else 1))
    canonical = f"{lay.batch}{lay.shared},{lay.weight}->{lay.y}"
    return attach_unit(etp_einsum_p.bind(x_bound, w_m, equation=canonical), product_unit(x_unit, w_unit))
