"""The surrogate spike functions and classes; the public namespace is :mod:`etp_nn.surrogate`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u


def _as_dimensionless(x: Any, where: str) -> jax.Array:
    """``x`` as a floating JAX array; a dimensionless Quantity is unwrapped, any other unit is an error."""
    if isinstance(x, u.Quantity):
        if not x.is_unitless:
            raise ValueError(
                f"{where}: x must be dimensionless (normalise the membrane potential first, e.g. "
                f"(V - V_th) / (V_th - V_reset)); got a quantity with unit {x.unit}."
            )
        x = x.to_decimal()
    array = jnp.asarray(x)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        array = array.astype(jnp.result_type(float))
    return array


def _check_positive(value: Any, where: str, argument: str) -> None:
    """Raise ``ValueError`` if a concrete ``value`` is not strictly positive (traced values are not checked)."""
    if isinstance(value, jax.core.Tracer):
        return
    if not bool(np.all(np.asarray(value) > 0)):
        raise ValueError(f"{where}: {argument} must be > 0; got {value!r}.")


def _heaviside(x: jax.Array) -> jax.Array:
    return (x > 0).astype(x.dtype)


_Derivative = Callable[[jax.Array, jax.Array], jax.Array]


def _spike_with_surrogate(derivative: _Derivative) -> _Derivative:
    """``spike(x, p)``: :math:`H(x)` forward, tangent ``derivative(x, p) * dx`` (``p`` gets none)."""

    @jax.custom_jvp
    def spike(x: jax.Array, parameter: jax.Array) -> jax.Array:
        return _heaviside(x)

    @spike.defjvp
    def spike_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]) -> tuple[jax.Array, Any]:
        x, parameter = primals
        return _heaviside(x), derivative(x, parameter) * tangents[0]

    return spike


def _spike(where: str, spike: _Derivative, x: Any, argument: str, value: Any) -> jax.Array:
    """Check the input and the shape parameter of a public surrogate function, then apply ``spike``."""
    x = _as_dimensionless(x, where)
    _check_positive(value, where, argument)
    return spike(x, jnp.asarray(value, dtype=x.dtype))


# --------------------------------------------------------------------------- sigmoid


def _sigmoid_grad(x: jax.Array, alpha: jax.Array) -> jax.Array:
    sig = jax.nn.sigmoid(alpha * x)
    return alpha * sig * (1.0 - sig)


_sigmoid_spike = _spike_with_surrogate(_sigmoid_grad)


def sigmoid(x: Any, alpha: float = 4.0) -> jax.Array:
    r"""Heaviside spike with the derivative of a logistic sigmoid as surrogate gradient.

    .. math::

        s = H(x), \qquad
        \frac{\partial s}{\partial x} := \alpha\,\sigma(\alpha x)\,\bigl(1 - \sigma(\alpha x)\bigr),
        \qquad \sigma(z) = \frac{1}{1 + e^{-z}},

    the derivative of :math:`g(x) = \sigma(\alpha x)`; its peak is
    :math:`\alpha / 4` at :math:`x = 0` and it integrates to 1.

    Parameters
    ----------
    x : Array
        Dimensionless, any shape (a dimensionless ``saiunit.Quantity`` is accepted).
    alpha : float
        Steepness, > 0; larger values give a narrower, taller surrogate.

    Returns
    -------
    Array
        ``1.0`` where ``x > 0`` else ``0.0``; shape and (floating) dtype of ``x``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import etp_nn
    >>> x = jnp.array([-0.5, 0.0, 0.5])
    >>> spikes = etp_nn.surrogate.sigmoid(x)
    >>> spikes.tolist(), spikes.dtype == x.dtype
    ([0.0, 0.0, 1.0], True)
    >>> float(jax.grad(etp_nn.surrogate.sigmoid)(0.0))
    1.0
    """
    return _spike("sigmoid", _sigmoid_spike, x, "alpha", alpha)


# --------------------------------------------------------------------------- piecewise linear


def _piecewise_linear_grad(x: jax.Array, width: jax.Array) -> jax.Array:
    return jnp.maximum(0.0, 1.0 - jnp.abs(x) / width) / width


_piecewise_linear_spike = _spike_with_surrogate(_piecewise_linear_grad)


def piecewise_linear(x: Any, width: float = 1.0) -> jax.Array:
    r"""Heaviside spike with a triangular surrogate gradient.

    .. math::

        s = H(x), \qquad
        \frac{\partial s}{\partial x} := \frac{1}{w}\max\!\Bigl(0,\; 1 - \frac{|x|}{w}\Bigr),

    the derivative of a piecewise-quadratic step that is 0 below :math:`-w`
    and 1 above :math:`w`: peak :math:`1/w` at 0, zero for :math:`|x| \ge w`,
    integral 1.

    Parameters
    ----------
    x : Array
        Dimensionless, any shape.
    width : float
        Half-width :math:`w` of the triangle, > 0.

    Returns
    -------
    Array
        ``1.0`` where ``x > 0`` else ``0.0``; shape and (floating) dtype of ``x``.

    Examples
    --------
    >>> import jax
    >>> import etp_nn
    >>> float(jax.grad(etp_nn.surrogate.piecewise_linear)(0.5))
    0.5
    """
    return _spike("piecewise_linear", _piecewise_linear_spike, x, "width", width)


# --------------------------------------------------------------------------- arctan


def _arctan_grad(x: jax.Array, alpha: jax.Array) -> jax.Array:
    z = 0.5 * math.pi * alpha * x
    return 0.5 * alpha / (1.0 + z * z)


_arctan_spike = _spike_with_surrogate(_arctan_grad)


def arctan(x: Any, alpha: float = 2.0) -> jax.Array:
    r"""Heaviside spike with an arctangent (Cauchy-shaped) surrogate gradient.

    .. math::

        s = H(x), \qquad
        \frac{\partial s}{\partial x} := \frac{\alpha}{2\,\bigl(1 + (\tfrac{\pi}{2}\alpha x)^2\bigr)},

    the derivative of :math:`g(x) = \tfrac12 + \tfrac1\pi \arctan(\tfrac\pi2 \alpha x)`:
    peak :math:`\alpha/2` at 0, heavy tails (non-zero everywhere), integral 1.

    Parameters
    ----------
    x : Array
        Dimensionless, any shape.
    alpha : float
        Steepness, > 0.

    Returns
    -------
    Array
        ``1.0`` where ``x > 0`` else ``0.0``; shape and (floating) dtype of ``x``.

    Examples
    --------
    >>> import jax
    >>> import etp_nn
    >>> float(jax.grad(etp_nn.surrogate.arctan)(0.0))
    1.0
    """
    return _spike("arctan", _arctan_spike, x, "alpha", alpha)


# --------------------------------------------------------------------------- gaussian


def _gaussian_grad(x: jax.Array, sigma: jax.Array) -> jax.Array:
    z = x / sigma
    return jnp.exp(-0.5 * z * z) / (math.sqrt(2.0 * math.pi) * sigma)


_gaussian_spike = _spike_with_surrogate(_gaussian_grad)


def gaussian(x: Any, sigma: float = 0.5) -> jax.Array:
    r"""Heaviside spike with a Gaussian surrogate gradient.

    .. math::

        s = H(x), \qquad
        \frac{\partial s}{\partial x} := \frac{1}{\sqrt{2\pi}\,\sigma}\exp\!\Bigl(-\frac{x^2}{2\sigma^2}\Bigr),

    the derivative of the normal CDF :math:`g(x) = \Phi(x/\sigma)`: peak
    :math:`1/(\sqrt{2\pi}\sigma)` at 0, integral 1.

    Parameters
    ----------
    x : Array
        Dimensionless, any shape.
    sigma : float
        Standard deviation, > 0.

    Returns
    -------
    Array
        ``1.0`` where ``x > 0`` else ``0.0``; shape and (floating) dtype of ``x``.

    Examples
    --------
    >>> import jax
    >>> import etp_nn
    >>> round(float(jax.grad(etp_nn.surrogate.gaussian)(0.0)), 4)
    0.7979
    """
    return _spike("gaussian", _gaussian_spike, x, "sigma", sigma)


# --------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class Surrogate:
    """Base of the surrogate spike callables: ``surrogate(x)`` spikes, ``surrogate.grad(x)`` is :math:`g'(x)`.

    Subclasses are frozen dataclasses (hashable, compared by value), so they
    can be passed as layer arguments and as static arguments to ``jax.jit``.
    """

    def __call__(self, x: Any) -> jax.Array:
        raise NotImplementedError

    def grad(self, x: Any) -> jax.Array:
        """The surrogate derivative :math:`g'(x)` that :meth:`__call__` uses, evaluated at ``x``."""
        raise NotImplementedError


@dataclass(frozen=True)
class _OneParameterSurrogate(Surrogate):
    """A surrogate given by ``_rule = (field, function, derivative)``: the field holding the shape
    parameter ``p``, the public function ``f(x, p)`` and its surrogate derivative ``g'(x, p)``."""

    _rule: ClassVar[tuple[str, Callable[[Any, Any], jax.Array], _Derivative]]

    def _value(self) -> Any:
        return getattr(self, self._rule[0])

    def __post_init__(self) -> None:
        _check_positive(self._value(), type(self).__name__, self._rule[0])

    def __call__(self, x: Any) -> jax.Array:
        return self._rule[1](x, self._value())

    def grad(self, x: Any) -> jax.Array:
        x = _as_dimensionless(x, type(self).__name__)
        return self._rule[2](x, jnp.asarray(self._value(), dtype=x.dtype))


@dataclass(frozen=True)
class SigmoidSurrogate(_OneParameterSurrogate):
    r"""Callable form of :func:`sigmoid`: :math:`g'(x) = \alpha\sigma(\alpha x)(1 - \sigma(\alpha x))`.

    Parameters
    ----------
    alpha : float
        Steepness, > 0. Default 4.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_nn
    >>> etp_nn.SigmoidSurrogate(alpha=8.0)(jnp.array([-1.0, 1.0])).tolist()
    [0.0, 1.0]
    """

    alpha: float = 4.0
    _rule: ClassVar[tuple[str, Callable[[Any, Any], jax.Array], _Derivative]] = ("alpha", sigmoid, _sigmoid_grad)


@dataclass(frozen=True)
class PiecewiseLinearSurrogate(_OneParameterSurrogate):
    r"""Callable form of :func:`piecewise_linear`: :math:`g'(x) = \max(0, 1 - |x|/w)/w`.

    Parameters
    ----------
    width : float
        Half-width :math:`w`, > 0. Default 1.
    """

    width: float = 1.0
    _rule: ClassVar[tuple[str, Callable[[Any, Any], jax.Array], _Derivative]] = (
        "width",
        piecewise_linear,
        _piecewise_linear_grad,
    )


@dataclass(frozen=True)
class ArctanSurrogate(_OneParameterSurrogate):
    r"""Callable form of :func:`arctan`: :math:`g'(x) = \alpha / (2(1 + (\pi\alpha x/2)^2))`.

    Parameters
    ----------
    alpha : float
        Steepness, > 0. Default 2.
    """

    alpha: float = 2.0
    _rule: ClassVar[tuple[str, Callable[[Any, Any], jax.Array], _Derivative]] = ("alpha", arctan, _arctan_grad)


@dataclass(frozen=True)
class GaussianSurrogate(_OneParameterSurrogate):
    r"""Callable form of :func:`gaussian`: :math:`g'(x) = e^{-x^2/(2\sigma^2)} / (\sqrt{2\pi}\sigma)`.

    Parameters
    ----------
    sigma : float
        Standard deviation, > 0. Default 0.5.
    """

    sigma: float = 0.5
    _rule: ClassVar[tuple[str, Callable[[Any, Any], jax.Array], _Derivative]] = ("sigma", gaussian, _gaussian_grad)
