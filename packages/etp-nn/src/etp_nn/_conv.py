r"""Convolution layers (channels-last) whose kernels flow through :func:`etp_primitives.conv`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import brainstate
import numpy as np
import saiunit as u
from jax import lax

import etp_primitives as etp

from ._linear import KAIMING_NORMAL, ZEROS, Initializer, _fixed_array, _init_param, _positive_int
from ._utils import layer_name

__all__ = ["Conv1d", "Conv2d", "Conv3d"]

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]


class _Conv(brainstate.nn.Module):
    r"""Channels-last :math:`N`-d convolution :math:`y = x \star (K \odot M) + b` (shared by ``Conv1d/2d/3d``).

    See :class:`Conv2d` for the formula and the parameters.
    """

    num_spatial_dims: ClassVar[int]
    dimension_numbers: ClassVar[tuple[str, str, str]]
    spatial_names: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        in_size: Sequence[int],
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: Padding = "SAME",
        lhs_dilation: int | Sequence[int] = 1,
        rhs_dilation: int | Sequence[int] = 1,
        groups: int = 1,
        w_init: Initializer = KAIMING_NORMAL,
        b_init: Initializer | None = ZEROS,
        w_mask: Initializer | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]  # brainstate hides Module.__init__ from type checkers
        n = self.num_spatial_dims
        layout = ", ".join((*self.spatial_names, "C_in"))
        if (
            isinstance(in_size, (int, np.integer, str))
            or not isinstance(in_size, Sequence)
            or len(in_size) != n + 1
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in in_size)
        ):
            raise ValueError(
                f"{layer_name(self)}: in_size must be ({layout}), i.e. {n + 1} positive ints "
                f"(spatial sizes, then input channels); got {in_size!r}."
            )
        in_tuple = tuple(int(s) for s in in_size)
        self.in_size = in_tuple
        self._in_shape: tuple[int, ...] = in_tuple
        self.in_channels = in_tuple[-1]
        self.out_channels = _positive_int(self, out_channels, "out_channels")
        self.groups = _positive_int(self, groups, "groups")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"{layer_name(self)}: groups={self.groups} must divide both the input channels "
                f"(in_size[-1] = {self.in_channels}) and out_channels ({self.out_channels})."
            )
        self.kernel_size = self._per_dim(kernel_size, "kernel_size")
        self.stride = self._per_dim(stride, "stride")
        self.lhs_dilation = self._per_dim(lhs_dilation, "lhs_dilation")
        self.rhs_dilation = self._per_dim(rhs_dilation, "rhs_dilation")
        self.padding = self._normalise_padding(padding)
        self._out_shape: tuple[int, ...] = self._output_size()
        self.out_size = self._out_shape

        kernel_shape = (*self.kernel_size, self.in_channels // self.groups, self.out_channels)
        self.w_mask = _fixed_array(self, w_mask, kernel_shape, "w_mask")
        params = {"weight": _init_param(self, w_init, kernel_shape, "w_init")}
        if b_init is not None:
            params["bias"] = _init_param(self, b_init, (self.out_channels,), "b_init")
        self.weight = brainstate.ParamState(params)

    # -- construction helpers ------------------------------------------------------------------------------------

    def _per_dim(self, value: Any, argument: str) -> tuple[int, ...]:
        n = self.num_spatial_dims
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out: tuple[Any, ...] = (int(value),) * n
        elif isinstance(value, Sequence) and not isinstance(value, str):
            out = tuple(value)
        else:
            out = ()
        if len(out) != n or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in out
        ):
            raise ValueError(
                f"{layer_name(self)}: {argument} must be a positive int or {n} positive ints "
                f"(one per spatial axis {', '.join(self.spatial_names)}); got {value!r}."
            )
        return tuple(int(v) for v in out)

    def _normalise_padding(self, padding: Any) -> str | tuple[tuple[int, int], ...]:
        n = self.num_spatial_dims
        expected = f"'SAME', 'VALID', 'SAME_LOWER', a non-negative int, {n} non-negative ints, or {n} (low, high) pairs"
        if isinstance(padding, str):
            if padding.upper() in ("SAME", "VALID", "SAME_LOWER"):
                return padding.upper()
        elif isinstance(padding, (int, np.integer)) and not isinstance(padding, bool) and padding >= 0:
            return ((int(padding), int(padding)),) * n
        elif isinstance(padding, Sequence) and len(padding) == n:
            pairs: list[tuple[int, int]] = []
            for entry in padding:
                if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool) and entry >= 0:
                    pairs.append((int(entry), int(entry)))
                elif (
                    isinstance(entry, Sequence)
                    and len(entry) == 2
                    and all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in entry)
                ):
                    pairs.append((int(entry[0]), int(entry[1])))
                else:
                    break
            else:
                return tuple(pairs)
        raise ValueError(f"{layer_name(self)}: padding must be {expected}; got {padding!r}.")

    def _output_size(self) -> tuple[int, ...]:
        """``(*out_spatial, out_channels)``; raises if the kernel does not fit the (padded) input."""
        spatial = self._in_shape[:-1]
        x_dilated = [(s - 1) * d + 1 for s, d in zip(spatial, self.lhs_dilation)]
        k_dilated = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.rhs_dilation)]
        pads = (
            lax.padtype_to_pads(x_dilated, k_dilated, self.stride, self.padding)
            if isinstance(self.padding, str)
            else self.padding
        )
        out = []
        for axis, (size, window, stride, (low, high)) in enumerate(zip(x_dilated, k_dilated, self.stride, pads)):
            padded = size + low + high
            if padded < window:
                raise ValueError(
                    f"{layer_name(self)}: kernel_size {self.kernel_size} (dilated size {window} along spatial axis "
                    f"{axis}, {self.spatial_names[axis]}) is larger than the padded input ({size} + {low} + {high} = "
                    f"{padded}) given by in_size {self._in_shape} and padding {self.padding!r}."
                )
            out.append((padded - window) // stride + 1)
        return (*out, self.out_channels)

    # -- forward -------------------------------------------------------------------------------------------------

    def _check_input(self, x: Any) -> tuple[int, ...]:
        """The leading (batch) axes of ``x``, after checking that ``x`` ends with ``in_size``."""
        shape = tuple(u.math.shape(x))
        n = self.num_spatial_dims
        expected = f"(..., {', '.join(str(s) for s in self._in_shape)})"
        layout = ", ".join((*self.spatial_names, "C_in"))
        if len(shape) < n + 1:
            raise ValueError(
                f"{layer_name(self)}: x must have shape ([batch...,] {layout}) = {expected} ({n} spatial axes and a "
                f"channel axis, in_size={self._in_shape}); got shape {shape} with {len(shape)} axes."
            )
        if shape[-1] != self.in_channels:
            raise ValueError(
                f"{layer_name(self)}: x must have {self.in_channels} input channels on its last axis (in_size[-1]), "
                f"i.e. shape {expected}; got shape {shape}."
            )
        if shape[-(n + 1) :] != self._in_shape:
            raise ValueError(
                f"{layer_name(self)}: x must have spatial shape {self._in_shape[:-1]} ({', '.join(self.spatial_names)}; "
                f"in_size[:-1]) before the channel axis, i.e. shape {expected}; got shape {shape} "
                f"(is the number of spatial axes right? {type(self).__name__} expects {n})."
            )
        return shape[: len(shape) - n - 1]

    def update(self, x: Any) -> Any:
        lead = self._check_input(x)
        params: dict[str, Any] = self.weight.value
        kernel = params["weight"]
        if self.w_mask is not None:
            kernel = kernel * self.w_mask
        batched = u.math.reshape(x, (math.prod(lead), *self._in_shape))
        try:
            y = etp.conv(
                batched,
                kernel,
                params.get("bias"),
                strides=self.stride,
                padding=self.padding,
                lhs_dilation=self.lhs_dilation,
                rhs_dilation=self.rhs_dilation,
                feature_group_count=self.groups,
                dimension_numbers=self.dimension_numbers,
            )
        except ValueError as err:
            raise ValueError(f"{layer_name(self)}: {err}") from err
        return u.math.reshape(y, (*lead, *self._out_shape))


_CONV_DOC = r"""Channels-last @n@-d convolution :math:`y = x \star (K \odot M) + b` through :func:`etp_primitives.conv`.

With stride :math:`s`, kernel (rhs) dilation :math:`d`, ``groups`` :math:`G`
and :math:`\tilde x` the input after ``lhs_dilation`` and zero padding, for
every output position :math:`p` and output channel :math:`o` (group
:math:`g(o) = \lfloor o\, G / C_\text{out} \rfloor`):

.. math::

    y_{p,o} = \sum_{k} \sum_{c=0}^{C_\text{in}/G - 1}
        \tilde x_{s p + d k,\; g(o) C_\text{in}/G + c}\, (K \odot M)_{k, c, o} + b_o ,

exactly ``lax.conv_general_dilated`` with dimension numbers ``@dn@``.

Parameters
----------
in_size : tuple of int
    ``(@layout@, C_in)``: the spatial sizes and input channels of one sample.
out_channels : int
kernel_size : int or tuple of @n@ int
stride : int or tuple of @n@ int
    Default 1.
padding : str, int, tuple of int or tuple of (low, high)
    ``'SAME'`` (default), ``'VALID'``, ``'SAME_LOWER'``, one int for every
    side, one int per spatial axis (both sides) or one ``(low, high)`` pair per axis.
lhs_dilation, rhs_dilation : int or tuple of @n@ int
    Input and kernel dilation; default 1.
groups : int
    Feature groups :math:`G`; must divide ``C_in`` and ``out_channels``.
w_init : initializer or array
    Kernel :math:`K` of shape ``(@kernel@, C_in / groups, out_channels)``; default Kaiming normal.
b_init : initializer, array or None
    Bias ``(out_channels,)``; ``None`` for no bias. Default zeros.
w_mask : array, initializer or None
    Fixed mask broadcastable to the kernel shape, multiplied in before the op.
name : str, optional

Attributes
----------
weight : brainstate.ParamState
    ``{'weight': (@kernel@, C_in / groups, out_channels), 'bias': (out_channels,)}``
    (no ``'bias'`` without ``b_init``).
out_size : tuple of int
    ``(@out_layout@, out_channels)``, computed at construction.

Notes
-----
``x`` has shape ``(*batch, @layout@, C_in)`` with zero or more leading batch
axes (``x.shape[-@n1@:]`` must equal ``in_size``); the output has shape
``(*batch, *out_size)``. The primitive needs exactly one batch axis, so the
leading axes are flattened into one (or one is added) and restored after.

Examples
--------
>>> import jax.numpy as jnp
>>> import etp_nn
>>> layer = etp_nn.@cls@(@example_in@, out_channels=4, kernel_size=3)
>>> layer(jnp.ones((2, @example_in_str@))).shape
(2, @example_out@)
"""


class Conv1d(_Conv):
    num_spatial_dims = 1
    dimension_numbers = ("NWC", "WIO", "NWC")
    spatial_names = ("L",)


class Conv2d(_Conv):
    num_spatial_dims = 2
    dimension_numbers = ("NHWC", "HWIO", "NHWC")
    spatial_names = ("H", "W")


class Conv3d(_Conv):
    num_spatial_dims = 3
    dimension_numbers = ("NDHWC", "DHWIO", "NDHWC")
    spatial_names = ("D", "H", "W")


for _cls, _example in ((Conv1d, (16, 3)), (Conv2d, (8, 8, 3)), (Conv3d, (4, 4, 4, 3))):
    _n = _cls.num_spatial_dims
    _fields = {
        "n1": str(_n + 1),
        "n": str(_n),
        "cls": _cls.__name__,
        "dn": repr(_cls.dimension_numbers),
        "out_layout": ", ".join(f"{s}_out" for s in _cls.spatial_names),
        "layout": ", ".join(_cls.spatial_names),
        "kernel": ", ".join(f"k_{s}" for s in _cls.spatial_names),
        "example_in_str": ", ".join(str(s) for s in _example),
        "example_in": str(_example),
        "example_out": ", ".join(str(s) for s in (*_example[:-1], 4)),
    }
    _doc = _CONV_DOC
    for _key, _value in _fields.items():
        _doc = _doc.replace(f"@{_key}@", _value)
    _cls.__doc__ = _doc
