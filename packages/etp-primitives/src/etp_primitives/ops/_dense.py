r"""Dense matrix multiplication: ``etp_mm`` (batched) and ``etp_mv`` (unbatched).

.. math::

    y = x W + b, \qquad x \in \mathbb{R}^{\ldots \times I},\;
    W \in \mathbb{R}^{I \times O},\; b \in \mathbb{R}^{O},\; y \in \mathbb{R}^{\ldots \times O}.

Invars ``(x, weight[, bias])``, static ``has_bias``; trainable keys
``weight`` (invar 1) and ``bias`` (invar 2).

**D-RTRL trace layout** (per hidden state; ``...`` = the leading axes of
``x``, none for ``etp_mv``): ``weight`` :math:`(\ldots, I, O)`, ``bias``
:math:`(\ldots, O)`. :math:`W_{io}` and :math:`b_o` feed only :math:`y_{\ldots o}`, so

.. math::

    \mathrm{yw\_to\_w}(d, \epsilon)_{\ldots io} = \epsilon_{\ldots io}\, d_{\ldots o},\quad
    \mathrm{seed}(x, d)_{\ldots io} = x_{\ldots i}\, d_{\ldots o},\quad
    \frac{\partial L}{\partial W_{io}} = \sum_{\ldots} g_{\ldots o}\, \epsilon_{\ldots io}.

Exact for dynamics that are position-wise in :math:`o` (a per-unit leak).
Memory :math:`O(B \cdot I \cdot O)` per hidden state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._checks import as_array, check_ndim, check_shape
from .._trace import sum_leading_axes
from .._units import attach_unit, bias_in_unit, product_unit, split_unit
from ._common import (
    add_bias_last_axis,
    apply_weight_fn,
    bias_layout,
    bound_with_bias,
    init_weight_shaped_drtrl,
    register_batched_pair,
)

__all__ = ["etp_mm_p", "etp_mv_p", "matmul"]


def _dense_impl(x: jax.Array, weight: jax.Array, *bias: jax.Array, has_bias: bool = False) -> jax.Array:
    y = jnp.matmul(x, weight)
    if has_bias:
        y = add_bias_last_axis(y, bias[0])
    return y


_trainable = bias_layout({"weight": 1}, 2)


def _yw_to_w(hidden_dim: jax.Array, trace: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    out = {}
    if "weight" in trace:
        out["weight"] = trace["weight"] * hidden_dim[..., None, :]
    if "bias" in trace:
        out["bias"] = trace["bias"] * hidden_dim
    return out


def _seed(x: jax.Array, hidden_dim: jax.Array, weights: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    out = {"weight": x[..., :, None] * hidden_dim[..., None, :]}
    if "bias" in weights:
        out["bias"] = hidden_dim
    return out


def _grad(
    x: jax.Array, cotangent: jax.Array, trace: dict[str, jax.Array], weights: dict[str, jax.Array], **params: Any
) -> dict[str, jax.Array]:
    out = {"weight": sum_leading_axes(trace["weight"] * cotangent[..., None, :], 2)}
    if "bias" in trace:
        out["bias"] = sum_leading_axes(trace["bias"] * cotangent, 1)
    return out


#: ``etp_mm`` (batched, ``x`` of shape ``(batch..., in)``) and ``etp_mv`` (unbatched, ``x`` of shape ``(in,)``).
etp_mm_p, etp_mv_p = register_batched_pair(
    "etp",
    _dense_impl,
    _trainable,
    yw_to_w=_yw_to_w,
    init_drtrl=init_weight_shaped_drtrl,
    drtrl_seed=_seed,
    drtrl_grad=_grad,
)


def matmul(
    x: Any,
    weight: Any,
    bias: Any = None,
    *,
    weight_fn: Callable[[Any], Any] | None = None,
    bias_fn: Callable[[Any], Any] | None = None,
) -> Any:
    r"""ETP-marked dense layer :math:`y = x\, f(W) (+ g(b))`.

    Dispatches to ``etp_mm`` when ``x.ndim >= 2`` and to ``etp_mv`` when
    ``x.ndim == 1``. Quantities are supported: the result carries
    ``unit(x) * unit(weight)`` and ``bias`` is converted into that unit.

    Parameters
    ----------
    x : Array or Quantity
        ``(..., in_features)``.
    weight : Array or Quantity
        ``(in_features, out_features)`` (after ``weight_fn``).
    bias : Array or Quantity, optional
        ``(out_features,)`` (after ``bias_fn``).
    weight_fn, bias_fn : callable, optional
        Plain-JAX transforms :math:`f`, :math:`g` applied to ``weight`` and
        ``bias`` inside the op, before the marker (braintrace 0.2.8 keywords),
        e.g. a mask or ``jnp.abs``. The primitive's trainable inputs are the
        transformed values: the compiler traces them back through the
        transform to the ParamState, so they get their eligibility traces and
        the gradient is chained through the transform. A ``Quantity`` is
        passed with its unit (use unit-aware functions).

    Returns
    -------
    Array or Quantity
        ``(..., out_features)``.

    Raises
    ------
    TypeError
        If a transform is not callable, or ``bias_fn`` is given without a ``bias``.
    ValueError
        If the shapes do not fit; the message names the primitive and the argument.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> etp.matmul(jnp.ones((4, 3)), jnp.ones((3, 5)), bias=jnp.zeros(5)).shape
    (4, 5)
    >>> print(etp.matmul(jnp.ones(2), -jnp.ones((2, 2)), weight_fn=jnp.abs).tolist())
    [2.0, 2.0]
    """
    x_m, x_unit = split_unit(x)
    x_m = as_array(x_m, "matmul", "x")
    name = "etp_mm" if x_m.ndim >= 2 else "etp_mv"
    where = f"matmul ({name})"
    weight = apply_weight_fn(weight_fn, weight, where, "weight_fn", "weight")
    if bias is None and bias_fn is not None:
        raise TypeError(f"{where}: bias_fn was given but bias is None; pass a bias to transform, or drop bias_fn.")
    bias = apply_weight_fn(bias_fn, bias, where, "bias_fn", "bias")
    w_m, w_unit = split_unit(weight)
    w_m = as_array(w_m, where, "weight")
    check_ndim(x_m, 1, where, "x", "(..., in_features)")
    check_ndim(w_m, (2,), where, "weight", "(in_features, out_features)")
    if x_m.shape[-1] != w_m.shape[0]:
        raise ValueError(
            f"{where}: x has {x_m.shape[-1]} input features (shape {tuple(x_m.shape)}) but weight expects "
            f"{w_m.shape[0]} (shape {tuple(w_m.shape)}); expected weight of shape ({x_m.shape[-1]}, out_features)."
        )
    out_unit = product_unit(x_unit, w_unit)
    b_m = None
    if bias is not None:
        b_m = as_array(bias_in_unit(bias, out_unit, where), where, "bias")
        check_shape(b_m.shape, (w_m.shape[1],), where, "bias", "out_features of weight")
    primitive = etp_mm_p if x_m.ndim >= 2 else etp_mv_p
    return attach_unit(bound_with_bias(primitive, (x_m, w_m), b_m), out_unit)
