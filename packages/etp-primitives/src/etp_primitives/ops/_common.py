"""Pieces shared by the built-in primitives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._compat import Primitive
from .._primitive import set_batching_rule
from .._trace import aval_of

__all__ = ["add_bias_last_axis", "bias_layout", "zeros_with_state_axis", "keep_marker_when_only_x_is_batched", "bound_with_bias"]


def bias_layout(first_trainable: dict[str, int], bias_index: int) -> Callable[[dict[str, Any]], dict[str, int]]:
    """A ``trainable_invars_fn``: ``first_trainable``, plus ``{'bias': bias_index}`` when ``has_bias``."""

    def trainable_invars_fn(params: dict[str, Any]) -> dict[str, int]:
        layout = dict(first_trainable)
        if params.get("has_bias", False):
            layout["bias"] = bias_index
        return layout

    return trainable_invars_fn


def zeros_with_state_axis(shape: Sequence[int], dtype: Any, num_hidden_state: int) -> jax.Array:
    """A zero trace leaf of ``shape`` with the trailing hidden-state axis."""
    if not isinstance(num_hidden_state, int) or num_hidden_state < 1:
        raise ValueError(f"num_hidden_state must be a positive int, got {num_hidden_state!r}.")
    return jnp.zeros((*shape, num_hidden_state), dtype=dtype)


def weight_dtype(weight_vars: dict[str, Any], key: str) -> Any:
    return aval_of(weight_vars[key]).dtype


def keep_marker_when_only_x_is_batched(
    primitive: Primitive,
    batched_primitive: Primitive,
    impl_fn: Callable[..., Any],
) -> None:
    """Batching rule: a ``vmap`` over ``x`` alone becomes one more leading axis of ``batched_primitive``.

    The marker then survives ``vmap`` (the compiler still sees the weight
    op). Any other batching (batched weights, per-example parameters) falls
    back to ``vmap`` of the implementation.
    """

    def rule(args: Sequence[Any], dims: Sequence[int | None], **params: Any) -> tuple[Any, int]:
        if dims[0] is not None and all(d is None for d in dims[1:]):
            x = jnp.moveaxis(args[0], dims[0], 0)
            return batched_primitive.bind(x, *args[1:], **params), 0
        return jax.vmap(lambda *a: impl_fn(*a, **params), in_axes=tuple(dims))(*args), 0

    set_batching_rule(primitive, rule)


def bound_with_bias(primitive: Primitive, operands: Sequence[Any], bias: Any, **params: Any) -> Any:
    """Bind ``primitive`` on ``operands`` (+ ``bias`` when given), setting ``has_bias``."""
    if bias is None:
        return primitive.bind(*operands, has_bias=False, **params)
    return primitive.bind(*operands, bias, has_bias=True, **params)


def add_bias_last_axis(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` along the last axis, with explicit broadcasting (safe under rank-promotion='raise')."""
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + tuple(bias.shape))
