r"""Convolution: ``etp_conv`` (batched), a marked ``jax.lax.conv_general_dilated``.

.. math::

    y = x \star K + b,

with every ``conv_general_dilated`` argument as a static parameter
(``strides``, ``padding``, ``lhs_dilation``, ``rhs_dilation``,
``feature_group_count``, ``batch_group_count``, ``dimension_numbers``, a
normalised :class:`jax.lax.ConvDimensionNumbers`) and ``has_bias``. Invars
``(x, kernel[, bias])``; trainable keys ``weight`` (invar 1), ``bias`` (invar 2).

**D-RTRL trace layout.** A kernel element feeds every output position, so a
kernel-shaped trace cannot hold the per-position sensitivities. Because the
op is linear in :math:`x`, a hidden state driven by it with a leak that is
uniform over units, :math:`h^t = \alpha^t h^{t-1} + c\,(x^t \star K)`,
satisfies :math:`h^t = \bar x^t \star K` with the *filtered input*
:math:`\bar x^t = \alpha^t \bar x^{t-1} + c\, x^t`. The ``weight`` trace is
that filtered input (shape of ``x``, memory :math:`O(B \cdot \text{input})`):

.. math::

    \mathrm{yw\_to\_w}(d, \epsilon) = \bar d\, \epsilon,\quad
    \mathrm{seed}(x, d) = \bar d\, x,\quad
    \frac{\partial L}{\partial K} = \mathrm{VJP}_K[\epsilon \star K](g),

where :math:`\bar d` is the mean of :math:`d` over all output positions and
channels of a sample (over everything when ``batch_group_count > 1``).
Exact when :math:`D` and :math:`D_f` are uniform over the positions and
channels of a sample (e.g. a leaky integrator with a scalar leak); a
mean-field approximation otherwise.

The ``bias`` trace is shaped like ``y`` and holds
:math:`\partial h_p / \partial b_{c(p)}` per output position (``yw_to_w`` and
the seed are element-wise, the gradient sums :math:`g \odot \epsilon` over
all axes but the channel axis): exact for any position-wise dynamics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .._checks import as_array, check_shape
from .._primitive import set_batching_rule
from .._trace import aval_of, derive_xy_to_dw
from .._units import attach_unit, bias_in_unit, product_unit, split_unit
from ._common import (
    apply_weight_fn,
    bias_init,
    bias_layout,
    bound_with_bias,
    register_builtin,
    weight_dtype,
    zeros_with_state_axis,
)

__all__ = ["etp_conv_p", "conv"]

_WHERE = "conv (etp_conv)"


def _conv_impl(
    x: jax.Array,
    kernel: jax.Array,
    *bias: jax.Array,
    has_bias: bool = False,
    strides: tuple[int, ...],
    padding: str | tuple[tuple[int, int], ...],
    lhs_dilation: tuple[int, ...],
    rhs_dilation: tuple[int, ...],
    feature_group_count: int,
    batch_group_count: int,
    dimension_numbers: lax.ConvDimensionNumbers,
) -> jax.Array:
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
    )
    if has_bias:
        feature_axis = dimension_numbers.out_spec[1]
        shape = [1] * y.ndim
        shape[feature_axis] = bias[0].shape[0]
        y = y + bias[0].reshape(shape)
    return y


_trainable = bias_layout({"weight": 1}, 2)
_xy_to_dw = derive_xy_to_dw(_conv_impl, _trainable, 0)


def _sample_mean(d: jax.Array, x_ndim: int, params: dict[str, Any]) -> jax.Array:
    """Mean of ``d`` (y-shaped) per sample, shaped to broadcast against ``x``."""
    dn: lax.ConvDimensionNumbers = params["dimension_numbers"]
    if params["batch_group_count"] != 1:
        return jnp.mean(d)
    batch_axis_y, batch_axis_x = dn.out_spec[0], dn.lhs_spec[0]
    per_sample = jnp.mean(d, axis=tuple(a for a in range(d.ndim) if a != batch_axis_y))
    shape = [1] * x_ndim
    shape[batch_axis_x] = per_sample.shape[0]
    return per_sample.reshape(shape)


def _sum_to_channels(d: jax.Array, params: dict[str, Any]) -> jax.Array:
    """Sum a y-shaped array over every axis but the output feature axis."""
    feature_axis = params["dimension_numbers"].out_spec[1]
    return jnp.sum(d, axis=tuple(a for a in range(d.ndim) if a != feature_axis))


def _yw_to_w(hidden_dim: jax.Array, trace: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    out = {}
    if "weight" in trace:
        out["weight"] = trace["weight"] * _sample_mean(hidden_dim, trace["weight"].ndim, params)
    if "bias" in trace:
        out["bias"] = trace["bias"] * hidden_dim
    return out


def _seed(x: jax.Array, hidden_dim: jax.Array, weights: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    out = {"weight": x * _sample_mean(hidden_dim, x.ndim, params)}
    if "bias" in weights:
        out["bias"] = hidden_dim
    return out


def _grad(
    x: jax.Array, cotangent: jax.Array, trace: dict[str, jax.Array], weights: dict[str, jax.Array], **params: Any
) -> dict[str, jax.Array]:
    kernel_only = {**params, "has_bias": False}
    out = {"weight": _xy_to_dw(trace["weight"], cotangent, {"weight": weights["weight"]}, **kernel_only)["weight"]}
    if "bias" in trace:
        out["bias"] = _sum_to_channels(trace["bias"] * cotangent, params)
    return out


def _init_drtrl(x_var: Any, y_var: Any, weight_vars: dict[str, Any], num_hidden_state: int) -> dict[str, jax.Array]:
    weight = zeros_with_state_axis(aval_of(x_var).shape, weight_dtype(weight_vars, "weight"), num_hidden_state)
    return bias_init({"weight": weight}, y_var, weight_vars, num_hidden_state)


#: Batched convolution (``x`` always has a batch axis).
etp_conv_p = register_builtin(
    "etp_conv",
    _conv_impl,
    _trainable,
    batched=True,
    yw_to_w=_yw_to_w,
    init_drtrl=_init_drtrl,
    drtrl_seed=_seed,
    drtrl_grad=_grad,
)


def _batch_conv(args: Sequence[Any], dims: Sequence[int | None], **params: Any) -> tuple[Any, int]:
    dn: lax.ConvDimensionNumbers = params["dimension_numbers"]
    if dims[0] is None or any(d is not None for d in dims[1:]) or params["batch_group_count"] != 1:
        return jax.vmap(lambda *a: _conv_impl(*a, **params), in_axes=tuple(dims))(*args), 0
    # Fold the mapped axis into the batch axis, convolve once, unfold: the marker survives vmap.
    x = args[0]
    batch_axis = dn.lhs_spec[0]
    x = jnp.moveaxis(x, dims[0], batch_axis)
    mapped, batch = x.shape[batch_axis], x.shape[batch_axis + 1]
    x = x.reshape((*x.shape[:batch_axis], mapped * batch, *x.shape[batch_axis + 2 :]))
    y = etp_conv_p.bind(x, *args[1:], **params)
    out_axis = dn.out_spec[0]
    y = y.reshape((*y.shape[:out_axis], mapped, batch, *y.shape[out_axis + 1 :]))
    return y, out_axis


set_batching_rule(etp_conv_p, _batch_conv)


def _per_dim(value: int | Sequence[int] | None, n: int, name: str) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    try:
        out = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{_WHERE}: {name} must be an int or one int per spatial dimension ({n}), got {value!r}."
        ) from None
    if len(out) != n:
        raise ValueError(f"{_WHERE}: {name} must have one entry per spatial dimension ({n}), got {value!r}.")
    if any(v < 1 for v in out):
        raise ValueError(f"{_WHERE}: {name} must be positive, got {value!r}.")
    return out


def _normalise_padding(padding: Any, n: int) -> str | tuple[tuple[int, int], ...]:
    expected = f"'SAME', 'VALID', 'SAME_LOWER', an int, or one (low, high) pair per spatial dimension ({n})"
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(f"{_WHERE}: padding must be {expected}, got {padding!r}.")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * n
    try:
        pairs = tuple((int(low), int(high)) for low, high in padding)
    except (TypeError, ValueError):
        raise ValueError(f"{_WHERE}: padding must be {expected}, got {padding!r}.") from None
    if len(pairs) != n:
        raise ValueError(f"{_WHERE}: padding must be {expected}, got {padding!r}.")
    return pairs


def conv(
    x: Any,
    kernel: Any,
    bias: Any = None,
    *,
    strides: int | Sequence[int] | None = None,
    padding: str | int | Sequence[tuple[int, int]] = "SAME",
    lhs_dilation: int | Sequence[int] | None = None,
    rhs_dilation: int | Sequence[int] | None = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    dimension_numbers: Any = None,
    kernel_fn: Callable[[Any], Any] | None = None,
    bias_fn: Callable[[Any], Any] | None = None,
) -> Any:
    r"""ETP-marked convolution :math:`y = x \star f(K) (+ g(b))` (``jax.lax.conv_general_dilated``).

    Parameters
    ----------
    x : Array or Quantity
        Input with a batch axis, laid out as ``dimension_numbers[0]``
        (default ``NC...``, as in ``lax``), e.g. ``(batch, length, channels)``
        with ``('NWC', 'WIO', 'NWC')``.
    kernel : Array or Quantity
        Laid out as ``dimension_numbers[1]`` (default ``OI...``).
    bias : Array or Quantity, optional
        ``(out_channels,)``, added along the output feature axis.
    strides, lhs_dilation, rhs_dilation : int or sequence of int, optional
        Per spatial dimension; default 1.
    padding : str, int or sequence of (low, high)
        ``'SAME'`` (default), ``'VALID'``, ``'SAME_LOWER'`` or explicit pairs.
    feature_group_count, batch_group_count : int
        Grouped convolution, as in ``lax.conv_general_dilated``.
    dimension_numbers : tuple of str or ConvDimensionNumbers, optional
    kernel_fn, bias_fn : callable, optional
        Plain-JAX transforms :math:`f`, :math:`g` applied to ``kernel`` and
        ``bias`` inside the op, before the marker (braintrace 0.2.8 keywords),
        e.g. a mask. The compiler traces the transformed kernel back through
        the transform to its ParamState, so it gets its eligibility trace and
        the gradient is chained through the transform.

    Returns
    -------
    Array or Quantity
        Laid out as ``dimension_numbers[2]``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> etp.conv(jnp.ones((2, 16, 3)), jnp.ones((4, 3, 8)), strides=(1,), padding='SAME',
    ...          dimension_numbers=('NWC', 'WIO', 'NWC')).shape
    (2, 16, 8)
    """
    kernel = apply_weight_fn(kernel_fn, kernel, _WHERE, "kernel_fn", "kernel")
    if bias is None and bias_fn is not None:
        raise TypeError(f"{_WHERE}: bias_fn was given but bias is None; pass a bias to transform, or drop bias_fn.")
    bias = apply_weight_fn(bias_fn, bias, _WHERE, "bias_fn", "bias")
    x_m, x_unit = split_unit(x)
    k_m, k_unit = split_unit(kernel)
    x_m = as_array(x_m, _WHERE, "x")
    k_m = as_array(k_m, _WHERE, "kernel")
    if x_m.ndim < 3 or x_m.ndim != k_m.ndim:
        raise ValueError(
            f"{_WHERE}: x must have a batch axis, a feature axis and >= 1 spatial axis, and the kernel the same "
            f"number of axes; got x shape {tuple(x_m.shape)} and kernel shape {tuple(k_m.shape)}."
        )
    n_spatial = x_m.ndim - 2
    try:
        dn = lax.conv_dimension_numbers(x_m.shape, k_m.shape, dimension_numbers)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{_WHERE}: invalid dimension_numbers {dimension_numbers!r}: {err}") from None
    strides_t = _per_dim(strides, n_spatial, "strides")
    lhs_t = _per_dim(lhs_dilation, n_spatial, "lhs_dilation")
    rhs_t = _per_dim(rhs_dilation, n_spatial, "rhs_dilation")
    pad = _normalise_padding(padding, n_spatial)
    for name, count in (("feature_group_count", feature_group_count), ("batch_group_count", batch_group_count)):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{_WHERE}: {name} must be a positive int, got {count!r}.")
    in_features = x_m.shape[dn.lhs_spec[1]]
    kernel_in, kernel_out = k_m.shape[dn.rhs_spec[1]], k_m.shape[dn.rhs_spec[0]]
    if in_features != kernel_in * feature_group_count:
        raise ValueError(
            f"{_WHERE}: x has {in_features} input channels (shape {tuple(x_m.shape)}) but the kernel expects "
            f"{kernel_in} x feature_group_count {feature_group_count} = {kernel_in * feature_group_count} "
            f"(kernel shape {tuple(k_m.shape)})."
        )
    if kernel_out % (feature_group_count * batch_group_count) != 0:
        raise ValueError(
            f"{_WHERE}: kernel has {kernel_out} output channels, not divisible by the group counts "
            f"({feature_group_count} x {batch_group_count})."
        )
    x_spatial = [(x_m.shape[a] - 1) * d + 1 for a, d in zip(dn.lhs_spec[2:], lhs_t)]
    k_spatial = [(k_m.shape[a] - 1) * d + 1 for a, d in zip(dn.rhs_spec[2:], rhs_t)]
    pads = lax.padtype_to_pads(x_spatial, k_spatial, strides_t, pad) if isinstance(pad, str) else pad
    for axis, (size, window, (low, high)) in enumerate(zip(x_spatial, k_spatial, pads)):
        if size + low + high < window:
            raise ValueError(
                f"{_WHERE}: the kernel (dilated size {window} along spatial axis {axis}) is larger than the padded "
                f"input ({size} + {low} + {high}); x shape {tuple(x_m.shape)}, kernel shape {tuple(k_m.shape)}."
            )
    out_unit = product_unit(x_unit, k_unit)
    b_m = None
    if bias is not None:
        b_m = as_array(bias_in_unit(bias, out_unit, _WHERE), _WHERE, "bias")
        check_shape(b_m.shape, (kernel_out,), _WHERE, "bias", "out_channels of kernel")
    y = bound_with_bias(
        etp_conv_p,
        (x_m, k_m),
        b_m,
        strides=strides_t,
        padding=pad,
        lhs_dilation=lhs_t,
        rhs_dilation=rhs_t,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        dimension_numbers=dn,
    )
    return attach_unit(y, out_unit)
