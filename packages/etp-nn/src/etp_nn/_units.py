"""Unit-aware helpers shared by the neurons, the synapse and the readouts.

Quantities (potentials, time constants), the environment's time step, initial
state values in a given unit and dtype, and the checks whose errors name the
layer and the argument. Every helper here is element-wise bookkeeping; the
layers' dynamics live in :mod:`etp_nn._neurons`, :mod:`etp_nn._synapses` and
:mod:`etp_nn._readout`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u
from brainstate.nn import init

from ._utils import check_last_dim, layer_name

#: A quantity such as ``1.0 * saiunit.mV``; a bare unit (``saiunit.mV``) means one of it.
QuantityLike = u.Quantity | u.Unit
Initializer = Callable[..., Any] | jax.Array | QuantityLike

_VOLT = u.mV
_TIME = u.ms

# Shared defaults (module-level, so no call sits in an argument default).
_ZEROS = init.ZeroInit()
_ZEROS_MV = init.ZeroInit(unit=u.mV)
_ZERO_MV = u.Quantity(0.0, unit=u.mV)
_TENTH_MV = u.Quantity(0.1, unit=u.mV)
_ONE_MV = u.Quantity(1.0, unit=u.mV)
_FIVE_MS = u.Quantity(5.0, unit=u.ms)
_HUNDRED_MS = u.Quantity(100.0, unit=u.ms)


# --------------------------------------------------------------------------- helpers


def _unit_text(value: Any) -> str:
    unit = u.get_unit(value)
    return "no unit (a plain number/array)" if unit.is_unitless else f"unit {unit}"


def _size_tuple(size: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return (int(size),) if isinstance(size, int | np.integer) else tuple(int(s) for s in size)


def _quantity_like(layer: brainstate.nn.Module, value: Any, argument: str, reference: u.Unit, what: str) -> u.Quantity:
    """``value`` as a Quantity in ``reference``; ``ValueError`` naming the layer/argument if its dimension differs."""
    if isinstance(value, u.Unit) and not value.is_unitless:
        value = u.Quantity(1.0, unit=value)
    if not isinstance(value, u.Quantity) or u.get_dim(value) != reference.dim:
        raise ValueError(
            f"{layer_name(layer)}: {argument} must be {what} with a unit like {reference}; got {_unit_text(value)}."
        )
    return value.in_unit(reference)


def _check_positive(layer: brainstate.nn.Module, value: u.Quantity, argument: str) -> None:
    if not np.all(np.asarray(value.mantissa) > 0):
        raise ValueError(f"{layer_name(layer)}: {argument} must be > 0; got {value}.")


def _check_param_shape(layer: brainstate.nn.Module, value: Any, argument: str, varshape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is a scalar or broadcasts to exactly ``varshape``."""
    shape = tuple(u.math.shape(value))
    try:
        fits = len(shape) <= len(varshape) and np.broadcast_shapes(shape, varshape) == varshape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{layer_name(layer)}: {argument} must be a scalar or broadcastable to the population shape "
            f"{varshape}; got shape {shape}."
        )


def _check_features(layer: brainstate.nn.Module, x: Any, varshape: tuple[int, ...], argument: str = "x") -> None:
    if len(varshape) == 1:
        check_last_dim(layer, x, varshape[0], argument)
        return
    shape = tuple(u.math.shape(x))
    if shape[len(shape) - len(varshape) :] != varshape or len(shape) < len(varshape):
        raise ValueError(
            f"{layer_name(layer)}: {argument} must end with the population shape {varshape}, i.e. shape "
            f"(..., {', '.join(map(str, varshape))}); got shape {shape}."
        )


def _environment_dt(layer: brainstate.nn.Module) -> Any:
    """``brainstate.environ.get_dt()`` as set (a Quantity or a plain number), or a ``RuntimeError`` if unset."""
    try:
        return brainstate.environ.get_dt()
    except KeyError:
        raise RuntimeError(
            f"{layer_name(layer)}: the time step is not set; run the layer inside "
            "brainstate.environ.context(dt=1.0 * saiunit.ms) (or brainstate.environ.set(dt=...))."
        ) from None


def _time_step(layer: brainstate.nn.Module) -> u.Quantity:
    """``brainstate.environ.get_dt()`` as a time Quantity, or a clear error."""
    dt = _environment_dt(layer)
    if not isinstance(dt, u.Quantity) or u.get_dim(dt) != _TIME.dim:
        raise ValueError(
            f"{layer_name(layer)}: the environment time step dt must be a time with a unit like ms; got "
            f"{_unit_text(dt)} ({dt!r})."
        )
    return dt


def _store(state: brainstate.State[Any], value: Any) -> None:
    """Write ``value`` into ``state`` in the dtype the state was created with (keeps scan carries stable)."""
    dtype = u.get_mantissa(state.value).dtype
    state.value = value if u.get_mantissa(value).dtype == dtype else value.astype(dtype)


def _decay(dt: u.Quantity, tau: u.Quantity) -> Any:
    r""":math:`e^{-\Delta t/\tau}` (dimensionless)."""
    return u.math.exp(-dt / tau)


def _initial_value(
    layer: brainstate.nn.Module,
    initializer: Initializer,
    argument: str,
    varshape: tuple[int, ...],
    batch_size: int | None,
    unit: u.Unit | None,
) -> Any:
    """``initializer`` evaluated at ``(batch_size?, *varshape)``, broadcast, in ``unit`` with the default float dtype.

    A plain (unitless) result is read in ``unit``; a Quantity must have ``unit``'s dimension. A unitless
    ``unit`` gives a plain array; ``unit=None`` keeps the result's own unit.
    """
    if isinstance(initializer, u.Unit):
        initializer = u.Quantity(1.0, unit=initializer)
    value = init.param(initializer, varshape, batch_size, allow_none=False)
    shape = varshape if batch_size is None else (batch_size, *varshape)
    if unit is None:
        unit = u.get_unit(value)
    if isinstance(value, u.Quantity) and not value.is_unitless:
        if u.get_dim(value) != unit.dim:
            raise ValueError(
                f"{layer_name(layer)}: {argument} must give values with a unit like {unit}; got {_unit_text(value)}."
            )
        mantissa = value.to_decimal(unit)
    else:
        mantissa = u.get_mantissa(value)
    mantissa = jnp.broadcast_to(jnp.asarray(mantissa, dtype=brainstate.environ.dftype()), shape)
    if unit.is_unitless:
        return mantissa
    return u.Quantity(mantissa, unit=unit)
