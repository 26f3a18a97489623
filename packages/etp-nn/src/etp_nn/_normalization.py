r"""Normalisation layers (feature axis last) whose affine parameters flow through :func:`etp_primitives.element_wise`.

The normalisation itself has no trainable weight; the learnable scale
:math:`\gamma` and shift :math:`\beta` are stored in one ``ParamState`` dict
``weight = {'scale': (C,), 'bias': (C,)}`` and each passes through the
``etp_elemwise`` marker before it is applied, so the compiler sees them as
element-wise ETP weights. Inputs are plain (unitless) arrays; a
``saiunit.Quantity`` is normalised by its mantissa.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u
from brainstate.nn import init

import etp_primitives as etp

from ._linear import ZEROS, Initializer, _init_param
from ._utils import check_last_dim, layer_name

__all__ = ["BatchNorm0d", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "RMSNorm"]

ONES = init.Constant(1.0)  # type: ignore[no-untyped-call]  # brainstate leaves Constant.__init__ unannotated


def _size_tuple(layer: brainstate.nn.Module, in_size: Any) -> tuple[int, ...]:
    """``in_size`` (an int or a tuple ending with the number of features) as a tuple of positive ints."""
    sizes = (in_size,) if isinstance(in_size, (int, np.integer)) else in_size
    if (
        not isinstance(sizes, Sequence)
        or isinstance(sizes, str)
        or len(sizes) == 0
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in sizes)
    ):
        raise ValueError(
            f"{layer_name(layer)}: in_size must be a positive int (the number of features) or a tuple of positive "
            f"ints ending with it; got {in_size!r}."
        )
    return tuple(int(s) for s in sizes)


def _non_negative(layer: brainstate.nn.Module, value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or value < 0:
        raise ValueError(f"{layer_name(layer)}: {argument} must be a non-negative float, got {value!r}.")
    return float(value)


def _along_last(v: Any, ndim: int) -> Any:
    """A ``(C,)`` vector shaped ``(1, ..., 1, C)`` to broadcast against an ``ndim``-d array (explicit ranks)."""
    return jnp.reshape(v, (1,) * (ndim - 1) + tuple(jnp.shape(v)))


class _Affine(brainstate.nn.Module):
    """Shared parts: the feature check and the marked affine map ``x_hat * scale + bias``."""

    def _init_affine(
        self, n_features: int, affine: bool, use_bias: bool, scale_init: Initializer, bias_init: Initializer
    ) -> None:
        self.affine = bool(affine)
        if self.affine:
            params = {"scale": _init_param(self, scale_init, (n_features,), "scale_init")}
            if use_bias:
                params["bias"] = _init_param(self, bias_init, (n_features,), "bias_init")
            self.weight = brainstate.ParamState(params)

    def _apply_affine(self, x_hat: Any) -> Any:
        if not self.affine:
            return x_hat
        params: dict[str, Any] = self.weight.value
        y = x_hat * _along_last(etp.element_wise(params["scale"]), x_hat.ndim)
        if "bias" in params:
            y = y + _along_last(etp.element_wise(params["bias"]), x_hat.ndim)
        return y


class _BatchNorm(_Affine):
    r"""Batch normalisation over every axis but the last (shared by ``BatchNorm0d/1d/2d``); see :class:`BatchNorm1d`."""

    num_spatial_dims: ClassVar[int]
    spatial_names: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        in_size: int | Sequence[int],
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        affine: bool = True,
        scale_init: Initializer = ONES,
        bias_init: Initializer = ZEROS,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]  # brainstate hides Module.__init__ from type checkers
        sizes = _size_tuple(self, in_size)
        if len(sizes) not in (1, self.num_spatial_dims + 1):
            raise ValueError(
                f"{layer_name(self)}: in_size must be C or ({', '.join((*self.spatial_names, 'C'))}); got {in_size!r}."
            )
        self.in_size = sizes
        self.out_size = sizes
        self._sizes = sizes
        self.num_features = sizes[-1]
        momentum_f = _non_negative(self, momentum, "momentum")
        if momentum_f > 1:
            raise ValueError(f"{layer_name(self)}: momentum must lie in [0, 1], got {momentum!r}.")
        self.momentum = momentum_f
        self.epsilon = _non_negative(self, epsilon, "epsilon")
        dtype = brainstate.environ.dftype()
        self.running_mean = brainstate.BatchState(jnp.zeros((self.num_features,), dtype=dtype))
        self.running_var = brainstate.BatchState(jnp.ones((self.num_features,), dtype=dtype))
        self._init_affine(self.num_features, affine, True, scale_init, bias_init)

    def _fit(self) -> bool:
        try:
            return bool(brainstate.environ.get("fit"))
        except KeyError:
            raise RuntimeError(
                f"{layer_name(self)}: the training mode is not set. Run the layer inside "
                "brainstate.environ.context(fit=True) (normalise with batch statistics and update the running "
                "statistics) or fit=False (normalise with the running statistics)."
            ) from None

    def update(self, x: Any) -> Any:
        x = u.get_mantissa(x)
        n = self.num_spatial_dims
        fit = self._fit()
        check_last_dim(self, x, self.num_features)
        layout = ", ".join((*self.spatial_names, "C"))
        shape = tuple(jnp.shape(x))
        min_ndim = n + 2 if fit else n + 1
        if len(shape) < min_ndim:
            need = "(batch..., " + layout + ")" if fit else "([batch...,] " + layout + ")"
            raise ValueError(
                f"{layer_name(self)}: x must have shape {need} with C = {self.num_features}"
                + (" (a batch axis is needed for batch statistics under fit=True)" if fit else "")
                + f"; got shape {shape}."
            )
        if len(self._sizes) > 1 and shape[-len(self._sizes) :] != self._sizes:
            raise ValueError(
                f"{layer_name(self)}: x must have shape (..., {', '.join(map(str, self._sizes))}) (in_size); "
                f"got shape {shape}."
            )
        if fit:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - _along_last(mean, x.ndim)), axis=axes)
            m = self.momentum
            self.running_mean.value = m * self.running_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            self.running_var.value = m * self.running_var.value + (1 - m) * jax.lax.stop_gradient(var)
        else:
            mean, var = self.running_mean.value, self.running_var.value
        x_hat = (x - _along_last(mean, x.ndim)) / jnp.sqrt(_along_last(var, x.ndim) + self.epsilon)
        return self._apply_affine(x_hat)


_BN_DOC = r"""Batch normalisation of @what@, feature axis last.

For ``x`` of shape ``(*batch, @layout_c@)`` the statistics are taken over
every axis but the channel axis :math:`c` (all batch@spatial_axes@ axes):

.. math::

    \mu_c = \operatorname{mean}(x_{\ldots c}), \qquad
    \sigma_c^2 = \operatorname{mean}\big((x_{\ldots c} - \mu_c)^2\big), \qquad
    y_{\ldots c} = \gamma_c\, \frac{x_{\ldots c} - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta_c .

**Training mode** is read from ``brainstate.environ.get('fit')`` (it must
be set, e.g. ``with brainstate.environ.context(fit=True):``):

* ``fit=True``: normalise with the batch statistics above (``x`` needs at
  least one batch axis) and update the running statistics
  :math:`\bar\mu \leftarrow m \bar\mu + (1 - m) \mu`,
  :math:`\bar\sigma^2 \leftarrow m \bar\sigma^2 + (1 - m) \sigma^2`
  (biased variance, momentum :math:`m`; no gradient flows into them);
* ``fit=False``: normalise with :math:`\bar\mu, \bar\sigma^2` (``x`` may be
  unbatched).

:math:`\gamma` and :math:`\beta` each go through ``etp_elemwise``.

Parameters
----------
in_size : int or tuple of int
    ``C`` or ``(@layout_c@)``; with the tuple form the trailing axes of ``x`` are checked against it.
momentum : float
    :math:`m` in :math:`[0, 1]`; default 0.9.
epsilon : float
    :math:`\epsilon`; default 1e-5.
affine : bool
    Learn :math:`\gamma, \beta` (default). If ``False``, :math:`\gamma = 1, \beta = 0` and there is no :attr:`weight`.
scale_init, bias_init : initializer or array
    :math:`\gamma` (default ones) and :math:`\beta` (default zeros), shape ``(C,)``.
name : str, optional

Attributes
----------
weight : brainstate.ParamState
    ``{'scale': (C,), 'bias': (C,)}`` (only with ``affine``).
running_mean, running_var : brainstate.BatchState
    :math:`\bar\mu` (zeros) and :math:`\bar\sigma^2` (ones), shape ``(C,)``.

Examples
--------
>>> import brainstate, jax.numpy as jnp
>>> import etp_nn
>>> layer = etp_nn.@cls@(4)
>>> with brainstate.environ.context(fit=True):
...     layer(jnp.ones((2, @example@4))).shape
(2, @example@4)
"""


class BatchNorm0d(_BatchNorm):
    num_spatial_dims = 0
    spatial_names = ()


class BatchNorm1d(_BatchNorm):
    num_spatial_dims = 1
    spatial_names = ("L",)


class BatchNorm2d(_BatchNorm):
    num_spatial_dims = 2
    spatial_names = ("H", "W")


for _cls, _what, _example in (
    (BatchNorm0d, "feature vectors ``(batch, C)``", ""),
    (BatchNorm1d, "sequences ``(batch, L, C)``", "5, "),
    (BatchNorm2d, "images ``(batch, H, W, C)``", "5, 5, "),
):
    _fields = {
        "what": _what,
        "layout_c": ", ".join((*_cls.spatial_names, "C")),
        "spatial_axes": " and spatial" if _cls.num_spatial_dims else "",
        "cls": _cls.__name__,
        "example": _example,
    }
    _doc = _BN_DOC
    for _key, _value in _fields.items():
        _doc = _doc.replace(f"@{_key}@", _value)
    _cls.__doc__ = _doc


class LayerNorm(_Affine):
    r"""Layer normalisation over the feature (last) axis, :math:`y = \gamma \odot \hat x + \beta`.

    For every position :math:`\ldots` (all leading axes) and the :math:`C`
    features of the last axis:

    .. math::

        \mu = \frac{1}{C}\sum_c x_{\ldots c}, \qquad
        \sigma^2 = \frac{1}{C}\sum_c (x_{\ldots c} - \mu)^2, \qquad
        y_{\ldots c} = \gamma_c\, \frac{x_{\ldots c} - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta_c .

    No running statistics, so training and evaluation behave the same.
    :math:`\gamma` and :math:`\beta` each go through ``etp_elemwise``.

    Parameters
    ----------
    in_size : int or tuple of int
        The last entry is :math:`C`.
    epsilon : float
        :math:`\epsilon`; default 1e-5.
    affine : bool
        Learn :math:`\gamma` (and :math:`\beta`); default ``True``. If
        ``False``, :math:`\gamma = 1, \beta = 0` and there is no :attr:`weight`.
    use_bias : bool
        Learn :math:`\beta` (default); if ``False``, :math:`\beta = 0`.
    scale_init, bias_init : initializer or array
        :math:`\gamma` (default ones) and :math:`\beta` (default zeros), shape ``(C,)``.
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'scale': (C,), 'bias': (C,)}`` (``'bias'`` only with ``use_bias``; none without ``affine``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_nn
    >>> etp_nn.LayerNorm(4)(jnp.ones((2, 3, 4))).shape
    (2, 3, 4)
    """

    def __init__(
        self,
        in_size: int | Sequence[int],
        *,
        epsilon: float = 1e-5,
        affine: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = ONES,
        bias_init: Initializer = ZEROS,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        sizes = _size_tuple(self, in_size)
        self.in_size = sizes
        self.out_size = sizes
        self.num_features = sizes[-1]
        self.epsilon = _non_negative(self, epsilon, "epsilon")
        self._init_affine(self.num_features, affine, use_bias, scale_init, bias_init)

    def update(self, x: Any) -> Any:
        x = u.get_mantissa(x)
        check_last_dim(self, x, self.num_features)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return self._apply_affine((x - mean) / jnp.sqrt(var + self.epsilon))


class RMSNorm(_Affine):
    r"""Root-mean-square normalisation over the feature (last) axis, :math:`y = \gamma \odot x / \mathrm{rms}(x)`.

    For every position :math:`\ldots` and the :math:`C` features of the last axis:

    .. math::

        y_{\ldots c} = \gamma_c\, \frac{x_{\ldots c}}{\sqrt{\frac{1}{C}\sum_{c'} x_{\ldots c'}^2 + \epsilon}} .

    No mean subtraction and no shift. :math:`\gamma` goes through ``etp_elemwise``.

    Parameters
    ----------
    in_size : int or tuple of int
        The last entry is :math:`C`.
    epsilon : float
        :math:`\epsilon`; default 1e-6.
    affine : bool
        Learn :math:`\gamma` (default); if ``False``, :math:`\gamma = 1` and there is no :attr:`weight`.
    scale_init : initializer or array
        :math:`\gamma`, shape ``(C,)``; default ones.
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'scale': (C,)}`` (only with ``affine``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_nn
    >>> etp_nn.RMSNorm(4)(jnp.ones((2, 4))).shape
    (2, 4)
    """

    def __init__(
        self,
        in_size: int | Sequence[int],
        *,
        epsilon: float = 1e-6,
        affine: bool = True,
        scale_init: Initializer = ONES,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        sizes = _size_tuple(self, in_size)
        self.in_size = sizes
        self.out_size = sizes
        self.num_features = sizes[-1]
        self.epsilon = _non_negative(self, epsilon, "epsilon")
        self._init_affine(self.num_features, affine, False, scale_init, ZEROS)

    def update(self, x: Any) -> Any:
        x = u.get_mantissa(x)
        check_last_dim(self, x, self.num_features)
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return self._apply_affine(x / jnp.sqrt(mean_square + self.epsilon))
