"""Pieces shared by the built-in primitives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import saiunit as u

from .._compat import Primitive
from .._primitive import ETPPrimitive, register_primitive_spec, set_batching_rule
from .._spec import ETPPrimitiveSpec, Rule
from .._trace import aval_of, derive_xy_to_dw, init_pp_like_output

__all__ = [
    "init_weight_shaped_drtrl",
    "add_bias_last_axis",
    "register_builtin",
    "register_batched_pair",
    "bias_init",
    "bias_layout",
    "zeros_with_state_axis",
    "keep_marker_when_only_x_is_batched",
    "bound_with_bias",
    "apply_weight_fn",
    "one_transform",
]

WeightFn = Callable[[Any], Any]


def one_transform(
    where: str, seed_name: str, seed_fn: WeightFn | None, new_name: str, new_fn: WeightFn | None
) -> WeightFn | None:
    """The transform given under its seed-era name or its braintrace 0.2.8 name (e.g. ``fn`` / ``weight_fn``).

    Raises
    ------
    TypeError
        If both are given and are different objects.
    """
    if seed_fn is not None and new_fn is not None and seed_fn is not new_fn:
        raise TypeError(
            f"{where}: got both {seed_name}= and {new_name}= (two names of one transform, the second the braintrace "
            "0.2.8 one) with different functions; pass one."
        )
    return seed_fn if seed_fn is not None else new_fn


def apply_weight_fn(fn: WeightFn | None, value: Any, where: str, fn_name: str, arg_name: str) -> Any:
    """``fn(value)``: a plain-JAX transform of a weight, applied before the marker (``None``: ``value`` itself).

    The primitive's trainable input is then ``fn(value)``; the compiler traces
    it back through ``fn`` to the ParamState, so the trace is that of the
    transformed weight and the gradient is chained through ``fn``. A
    ``Quantity`` is passed with its unit, so ``fn`` must be unit-aware.

    Raises
    ------
    TypeError
        If ``fn`` is not callable, or is not unit-aware and ``value`` is a
        ``Quantity``; the message names ``where``, ``fn_name`` and the unit.
    """
    if fn is None:
        return value
    if not callable(fn):
        raise TypeError(f"{where}: {fn_name} must be callable or None, got {type(fn).__name__}.")
    try:
        return fn(value)
    except TypeError as err:
        if not isinstance(value, u.Quantity):
            raise
        reason = str(err).rstrip(".")
        raise TypeError(
            f"{where}: {fn_name}={getattr(fn, '__name__', fn)!r} cannot take the saiunit.Quantity {arg_name} "
            f"(unit {value.unit}): {reason}. Use a unit-aware function (e.g. saiunit.math.abs instead of "
            "jnp.abs), or pass the mantissa."
        ) from None


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


def bias_init(
    trace: dict[str, jax.Array], y_var: Any, weight_vars: dict[str, Any], num_hidden_state: int
) -> dict[str, jax.Array]:
    """Add the y-shaped ``bias`` trace leaf (every built-in stores it so) when the op has a bias."""
    if "bias" in weight_vars:
        trace["bias"] = zeros_with_state_axis(aval_of(y_var).shape, weight_dtype(weight_vars, "bias"), num_hidden_state)
    return trace


def init_weight_shaped_drtrl(
    x_var: Any, y_var: Any, weight_vars: dict[str, Any], num_hidden_state: int
) -> dict[str, jax.Array]:
    """``init_drtrl`` of the weight-shaped layout: ``weight`` ``(*x.shape[:-1], *w.shape)``, ``bias`` y-shaped."""
    lead = tuple(aval_of(x_var).shape[:-1])
    weight = zeros_with_state_axis(
        (*lead, *aval_of(weight_vars["weight"]).shape), weight_dtype(weight_vars, "weight"), num_hidden_state
    )
    return bias_init({"weight": weight}, y_var, weight_vars, num_hidden_state)


def register_builtin(
    name: str,
    impl: Callable[..., Any],
    trainable: Callable[[dict[str, Any]], dict[str, int]],
    *,
    batched: bool,
    yw_to_w: Rule,
    init_drtrl: Rule,
    drtrl_seed: Rule,
    drtrl_grad: Rule,
) -> ETPPrimitive:
    """Register a built-in with an input ``x`` at invar 0 through the public spec path.

    ``xy_to_dw`` is the exact VJP of ``impl``; ``init_pp`` the output-shaped zeros.
    """
    return register_primitive_spec(
        ETPPrimitiveSpec(
            name=name,
            impl=impl,
            yw_to_w=yw_to_w,
            xy_to_dw=derive_xy_to_dw(impl, trainable, 0),
            init_drtrl=init_drtrl,
            init_pp=init_pp_like_output,
            trainable_invars_fn=trainable,
            x_invar_index=0,
            batched=batched,
            drtrl_seed=drtrl_seed,
            drtrl_grad=drtrl_grad,
        )
    )


def register_batched_pair(
    base: str,
    impl: Callable[..., Any],
    trainable: Callable[[dict[str, Any]], dict[str, int]],
    **rules: Rule,
) -> tuple[ETPPrimitive, ETPPrimitive]:
    """Register ``{base}_mm`` (batched) and ``{base}_mv`` (unbatched) sharing ``impl`` and ``rules``.

    The rules see the leading axes of ``x`` generically, so one set serves
    both; a ``vmap`` over ``x`` of either becomes ``{base}_mm``.
    """
    batched = register_builtin(f"{base}_mm", impl, trainable, batched=True, **rules)
    unbatched = register_builtin(f"{base}_mv", impl, trainable, batched=False, **rules)
    keep_marker_when_only_x_is_batched(batched, batched, impl)
    keep_marker_when_only_x_is_batched(unbatched, batched, impl)
    return batched, unbatched
