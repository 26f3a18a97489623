r"""The exponential synapse: a first-order, element-wise low-pass filter of its input."""

from __future__ import annotations

from typing import Any

import brainstate
import saiunit as u

from ._units import (
    _FIVE_MS,
    _TIME,
    _ZEROS,
    Initializer,
    QuantityLike,
    _check_features,
    _check_param_shape,
    _check_positive,
    _decay,
    _initial_value,
    _quantity_like,
    _size_tuple,
    _store,
    _time_step,
    _unit_text,
)
from ._utils import check_batch_size, layer_name, require_state, reset_hidden

__all__ = ["Expon"]


class Expon(brainstate.nn.Module):
    r"""Exponential synapse (first-order low-pass filter of its input).

    One :meth:`update` with input :math:`x` computes

    .. math::

        g \leftarrow e^{-\Delta t/\tau}\, g + x

    (the exact solution of :math:`\tau\,\dot g = -g` between steps, with
    :math:`x` added as an instantaneous increment) and returns the new
    :math:`g`. Element-wise per unit, no weights.

    Parameters
    ----------
    in_size : int or tuple of int
        Population shape.
    tau : Quantity
        Decay time constant (a time, > 0). Default 5 ms.
    unit : saiunit.Unit
        Unit of ``g``; ``x`` must have the same dimension (it is converted).
        Default mV; ``saiunit.UNITLESS`` for plain arrays.
    g_initializer : initializer, array or Quantity
        Initial ``g``; a plain result is read in ``unit``. Default zeros.
    name : str, optional

    Attributes
    ----------
    g : brainstate.HiddenState
        Synaptic variable, ``(*batch, *in_size)``, in ``unit``.

    Examples
    --------
    >>> import brainstate, saiunit as u, jax.numpy as jnp
    >>> import etp_nn
    >>> syn = etp_nn.Expon(3, tau=10.0 * u.ms)
    >>> syn.init_state()
    >>> with brainstate.environ.context(dt=1.0 * u.ms):
    ...     g = syn(jnp.ones(3) * u.mV)
    >>> g.shape
    (3,)
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        tau: QuantityLike = _FIVE_MS,
        unit: u.Unit = u.mV,
        g_initializer: Initializer = _ZEROS,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]  # brainstate hides Module.__init__ from type checkers
        self.varshape: tuple[int, ...] = _size_tuple(in_size)
        self.in_size = self.varshape
        self.out_size = self.varshape
        if not isinstance(unit, u.Unit):
            raise TypeError(f"{layer_name(self)}: unit must be a saiunit.Unit (e.g. saiunit.mV); got {unit!r}.")
        self.unit: u.Unit = unit
        self.tau = _quantity_like(self, tau, "tau", _TIME, "a time")
        _check_param_shape(self, self.tau, "tau", self.varshape)
        _check_positive(self, self.tau, "tau")
        self.g_initializer = g_initializer

    def _init_g(self, batch_size: int | None) -> Any:
        return _initial_value(self, self.g_initializer, "g_initializer", self.varshape, batch_size, self.unit)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Create ``g`` (shape ``(batch_size, *varshape)`` or ``varshape``)."""
        self.g = brainstate.HiddenState(self._init_g(batch_size))

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Re-initialise ``g`` in place; creates it if missing."""
        reset_hidden(self, "g", self._init_g(batch_size))

    def update(self, x: Any) -> Any:
        """One step with input ``x`` (shape ``(*batch, *in_size)``, unit like ``unit``); returns ``g``."""
        state = require_state(self, "g")
        _check_features(self, x, self.varshape)
        check_batch_size(self, x, state, n_feature_axes=len(self.varshape))
        if u.get_dim(x) != self.unit.dim:
            raise ValueError(f"{layer_name(self)}: x must have a unit like {self.unit}; got {_unit_text(x)}.")
        if not self.unit.is_unitless:
            x = x.in_unit(self.unit)
        _store(state, _decay(_time_step(self), self.tau) * state.value + x)
        return state.value
