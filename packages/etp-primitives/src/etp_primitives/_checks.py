"""Argument checks shared by the user-facing functions: errors name the primitive and argument."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_array", "check_ndim", "check_shape"]


def as_array(value: Any, where: str, name: str) -> jax.Array:
    """``value`` as a JAX array (tracers pass through), or a ``TypeError`` naming the argument."""
    if isinstance(value, jax.Array):
        return value
    if isinstance(value, (np.ndarray, np.generic, int, float, complex, bool, list, tuple)):
        try:
            return jnp.asarray(value)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{where}: {name} must be an array, could not convert {type(value).__name__}: {err}"
            ) from None
    raise TypeError(f"{where}: {name} must be an array or saiunit.Quantity, got {type(value).__name__}.")


def check_ndim(array: jax.Array, allowed: tuple[int, ...] | int, where: str, name: str, layout: str) -> None:
    """Raise ``ValueError`` unless ``array.ndim`` is allowed (``layout`` describes the expected axes)."""
    ok = array.ndim in allowed if isinstance(allowed, tuple) else array.ndim >= allowed
    if not ok:
        raise ValueError(
            f"{where}: {name} must have shape {layout}, got shape {tuple(array.shape)} (ndim {array.ndim})."
        )


def check_shape(actual: tuple[int, ...], expected: tuple[int, ...], where: str, name: str, why: str = "") -> None:
    """Raise ``ValueError`` unless ``actual == expected``."""
    if tuple(actual) != tuple(expected):
        extra = f" ({why})" if why else ""
        raise ValueError(f"{where}: {name} must have shape {tuple(expected)}{extra}, got {tuple(actual)}.")
