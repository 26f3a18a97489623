r"""Block-diagonal (grouped) matrix multiplication: ``etp_grouped_mm`` (batched) and ``etp_grouped_mv``.

With :math:`G` groups, ``x`` of :math:`I` features is split into :math:`G`
consecutive blocks of :math:`I/G`, block :math:`g` is multiplied by
:math:`W_g \in \mathbb{R}^{I/G \times O/G}` and the :math:`G` results are
concatenated into :math:`O` features:

.. math::

    y_{\ldots,\, g O_g + o} = \sum_{i} x_{\ldots,\, g I_g + i}\, W_{g i o} + b_{g O_g + o},
    \qquad W \in \mathbb{R}^{G \times I_g \times O_g},\; I_g = I/G,\; O_g = O/G,

the product with the block-diagonal matrix :math:`\mathrm{blockdiag}(W_1, \ldots, W_G)`.
Invars ``(x, weight[, bias])``, static ``has_bias``; trainable keys ``weight``
(invar 1) and ``bias`` (invar 2, shape ``(O,)``).

**D-RTRL trace layout** (``...`` = the leading axes of ``x``): ``weight``
:math:`(\ldots, G, I_g, O_g)`, ``bias`` :math:`(\ldots, O)`. :math:`W_{gio}`
feeds only :math:`y_{\ldots, g O_g + o}`, so with :math:`d` and :math:`g` seen
per group, :math:`\tilde d_{\ldots g o} = d_{\ldots, g O_g + o}`,

.. math::

    \mathrm{yw\_to\_w}(d, \epsilon)_{\ldots gio} = \epsilon_{\ldots gio}\, \tilde d_{\ldots go},\quad
    \mathrm{seed}(x, d)_{\ldots gio} = \tilde x_{\ldots gi}\, \tilde d_{\ldots go},\quad
    \frac{\partial L}{\partial W_{gio}} = \sum_{\ldots} \tilde g_{\ldots go}\, \epsilon_{\ldots gio}.

Exact for dynamics that are position-wise in the output (a per-unit leak);
memory :math:`O(B \cdot I \cdot O / G)` per hidden state, :math:`G` times less
than a dense layer of the same size.
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

__all__ = ["etp_grouped_mm_p", "etp_grouped_mv_p", "grouped_matmul"]


def _per_group(v: jax.Array, groups: int) -> jax.Array:
    """``(..., G * n)`` as ``(..., G, n)``."""
    return v.reshape((*v.shape[:-1], groups, v.shape[-1] // groups))


def _grouped_impl(x: jax.Array, weight: jax.Array, *bias: jax.Array, has_bias: bool = False) -> jax.Array:
    groups = weight.shape[0]
    y = jnp.einsum("...gi,gio->...go", _per_group(x, groups), weight)
    y = y.reshape((*y.shape[:-2], groups * weight.shape[2]))
    if has_bias:
        y = add_bias_last_axis(y, bias[0])
    return y


_trainable = bias_layout({"weight": 1}, 2)


def _yw_to_w(hidden_dim: jax.Array, trace: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    out = {}
    if "weight" in trace:
        groups = trace["weight"].shape[-3]
        out["weight"] = trace["weight"] * _per_group(hidden_dim, groups)[..., None, :]
    if "bias" in trace:
        out["bias"] = trace["bias"] * hidden_dim
    return out


def _seed(x: jax.Array, hidden_dim: jax.Array, weights: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    groups = weights["weight"].shape[0]
    out = {"weight": _per_group(x, groups)[..., :, None] * _per_group(hidden_dim, groups)[..., None, :]}
    if "bias" in weights:
        out["bias"] = hidden_dim
    return out


def _grad(
    x: jax.Array, cotangent: jax.Array, trace: dict[str, jax.Array], weights: dict[str, jax.Array], **params: Any
) -> dict[str, jax.Array]:
    groups = weights["weight"].shape[0]
    out = {"weight": sum_leading_axes(trace["weight"] * _per_group(cotangent, groups)[..., None, :], 3)}
    if "bias" in trace:
        out["bias"] = sum_leading_axes(trace["bias"] * cotangent, 1)
    return out


#: ``etp_grouped_mm`` (batched, ``x`` of shape ``(batch..., in)``) and ``etp_grouped_mv`` (``x`` of shape ``(in,)``).
etp_grouped_mm_p, etp_grouped_mv_p = register_batched_pair(
    "etp_grouped",
    _grouped_impl,
    _trainable,
    yw_to_w=_yw_to_w,
    init_drtrl=init_weight_shaped_drtrl,
    drtrl_seed=_seed,
    drtrl_grad=_grad,
)


def grouped_matmul(
    x: Any,
    weight: Any,
    bias: Any = None,
    *,
    weight_fn: Callable[[Any], Any] | None = None,
    bias_fn: Callable[[Any], Any] | None = None,
) -> Any:
    r"""ETP-marked grouped (block-diagonal) dense layer :math:`y = x\, \mathrm{blockdiag}(f(W)) (+ g(b))`.

    ``x.ndim >= 2`` binds ``etp_grouped_mm``, ``x.ndim == 1`` binds
    ``etp_grouped_mv``. Quantities are supported as for :func:`matmul`.

    Parameters
    ----------
    x : Array or Quantity
        ``(..., in_features)``, ``in_features = G * I_g``: group ``g`` reads features
        ``g * I_g`` to ``(g + 1) * I_g - 1``.
    weight : Array or Quantity
        ``(G, I_g, O_g)`` (after ``weight_fn``): one ``(I_g, O_g)`` block per group.
    bias : Array or Quantity, optional
        ``(G * O_g,)`` (after ``bias_fn``).
    weight_fn, bias_fn : callable, optional
        Plain-JAX transforms applied before the marker (braintrace 0.2.8 keywords);
        the compiler traces the transformed values back to their ParamState.

    Returns
    -------
    Array or Quantity
        ``(..., G * O_g)``: group ``g`` writes features ``g * O_g`` to ``(g + 1) * O_g - 1``.

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
    >>> etp.grouped_matmul(jnp.ones((4, 6)), jnp.ones((2, 3, 5))).shape
    (4, 10)
    >>> w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])          # G = 2 blocks of 2 x 2
    >>> print(etp.grouped_matmul(jnp.ones(4), w).tolist())
    [1.0, 1.0, 2.0, 2.0]
    """
    x_m, x_unit = split_unit(x)
    x_m = as_array(x_m, "grouped_matmul", "x")
    name = "etp_grouped_mm" if x_m.ndim >= 2 else "etp_grouped_mv"
    where = f"grouped_matmul ({name})"
    weight = apply_weight_fn(weight_fn, weight, where, "weight_fn", "weight")
    if bias is None and bias_fn is not None:
        raise TypeError(f"{where}: bias_fn was given but bias is None; pass a bias to transform, or drop bias_fn.")
    bias = apply_weight_fn(bias_fn, bias, where, "bias_fn", "bias")
    w_m, w_unit = split_unit(weight)
    w_m = as_array(w_m, where, "weight")
    check_ndim(x_m, 1, where, "x", "(..., in_features)")
    check_ndim(w_m, (3,), where, "weight", "(groups, in_features // groups, out_features // groups)")
    groups, in_group, out_group = w_m.shape
    if groups < 1 or x_m.shape[-1] != groups * in_group:
        raise ValueError(
            f"{where}: x has {x_m.shape[-1]} input features (shape {tuple(x_m.shape)}) but the weight of shape "
            f"{tuple(w_m.shape)} expects groups * in_per_group = {groups} * {in_group} = {groups * in_group}."
        )
    out_unit = product_unit(x_unit, w_unit)
    b_m = None
    if bias is not None:
        b_m = as_array(bias_in_unit(bias, out_unit, where), where, "bias")
        check_shape(b_m.shape, (groups * out_group,), where, "bias", "groups * out_per_group of weight")
    primitive = etp_grouped_mm_p if x_m.ndim >= 2 else etp_grouped_mv_p
    return attach_unit(bound_with_bias(primitive, (x_m, w_m), b_m), out_unit)
