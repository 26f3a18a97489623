"""The rule helpers of :mod:`etp_primitives.extend`: rule lookup and the default D-RTRL rules.

The rule contract they implement is documented in :mod:`etp_primitives.extend`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp

from ._compat import Primitive
from ._registry import get_primitive_record, is_batched_primitive
from ._spec import RULE_ALIASES, ETPPrimitiveSpec

T = TypeVar("T")

__all__ = [
    "RULE_NAMES",
    "OPTIONAL_RULE_NAMES",
    "require_rules",
    "trainable_invars",
    "drtrl_seed",
    "drtrl_grad",
    "sum_leading_axes",
    "pairwise_sum",
    "aval_of",
    "init_pp_like_output",
    "derive_xy_to_dw",
]

#: The four required ETP rules, by the name used in error messages and specs.
RULE_NAMES: tuple[str, ...] = ("yw_to_w", "xy_to_dw", "init_drtrl", "init_pp")
#: The optional D-RTRL rules (defaults in :func:`drtrl_seed` and :func:`drtrl_grad`).
OPTIONAL_RULE_NAMES: tuple[str, ...] = ("drtrl_seed", "drtrl_grad")

#: Every rule name :func:`require_rules` accepts -> the record field holding that rule.
_RULE_FIELDS: dict[str, str] = {
    **{name: name for name in (*RULE_NAMES, *OPTIONAL_RULE_NAMES)},
    **RULE_ALIASES,
}


def _record(primitive: Primitive) -> ETPPrimitiveSpec:
    record = get_primitive_record(primitive)
    if record is None:
        raise ValueError(
            f"{getattr(primitive, 'name', primitive)!r} is not a registered ETP primitive; "
            "register it with etp_primitives.register_primitive or register_primitive_spec."
        )
    return record


class ShapedLike(Protocol):
    """Anything with ``shape`` and ``dtype`` (an array, an aval, a ``ShapeDtypeStruct``)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...


def aval_of(var: Any) -> ShapedLike:
    """Shape and dtype carrier of a jaxpr ``Var`` (its ``aval``), an array or a ``ShapeDtypeStruct``."""
    aval = getattr(var, "aval", var)
    if not hasattr(aval, "shape") or not hasattr(aval, "dtype"):
        raise TypeError(f"expected a jaxpr Var, an array or a ShapeDtypeStruct, got {type(var).__name__}.")
    return aval  # type: ignore[no-any-return]


def require_rules(primitive: Primitive, *names: str) -> dict[str, Callable[..., Any]]:
    """Return the named rules of ``primitive`` (default: the four required ones), keyed by the names asked for.

    Names: ``yw_to_w`` (or its braintrace 0.2.8 name ``dt_to_t``), ``xy_to_dw``,
    ``init_drtrl``, ``init_pp`` and the optional ``drtrl_seed``, ``drtrl_grad``.

    Raises
    ------
    ValueError
        If ``primitive`` is not a registered ETP primitive, a name is unknown,
        or a rule is missing; the message names the primitive and every missing rule.
    """
    record = _record(primitive)
    wanted = names or RULE_NAMES
    unknown = [n for n in wanted if n not in _RULE_FIELDS]
    if unknown:
        raise ValueError(f"unknown ETP rule name(s) {unknown}; expected some of {list(_RULE_FIELDS)}.")
    missing = [n for n in wanted if getattr(record, _RULE_FIELDS[n]) is None]
    if missing:
        raise ValueError(
            f"ETP primitive {primitive.name!r} has no {', '.join(missing)} rule"
            f"{'s' if len(missing) > 1 else ''}; online learning needs all of {list(RULE_NAMES)}. "
            f"Install them with {primitive.name}_p.register_etp_rules(...) or register it from an ETPPrimitiveSpec."
        )
    return {n: getattr(record, _RULE_FIELDS[n]) for n in wanted}


def trainable_invars(primitive: Primitive, params: Mapping[str, Any]) -> dict[str, int]:
    """``{trainable_key: invar_index}`` of an equation of ``primitive`` with static ``params``."""
    return _record(primitive).resolve_trainable_invars(dict(params))


def drtrl_seed(
    primitive: Primitive,
    x: Any,
    hidden_dim: jax.Array,
    weights: Mapping[str, jax.Array],
    params: Mapping[str, Any],
) -> dict[str, jax.Array]:
    r"""The instantaneous D-RTRL trace term :math:`D_f \otimes \partial y/\partial W` for one state.

    Uses the primitive's ``drtrl_seed`` rule when it has one; otherwise the
    per-sample ``xy_to_dw`` (mapped over axis 0 of ``x`` and ``hidden_dim``
    for batched primitives), which is the seed of the weight-shaped layout.
    """
    rule = _record(primitive).drtrl_seed
    if rule is not None:
        return dict(rule(x, hidden_dim, dict(weights), **params))
    xy_to_dw = require_rules(primitive, "xy_to_dw")["xy_to_dw"]
    if not is_batched_primitive(primitive):
        return dict(xy_to_dw(x, hidden_dim, dict(weights), **params))

    def one_sample(x_b: jax.Array, hidden_b: jax.Array) -> dict[str, jax.Array]:
        return dict(xy_to_dw(x_b[None], hidden_b[None], dict(weights), **params))

    return jax.vmap(one_sample)(x, hidden_dim)


def pairwise_sum(terms: Sequence[T]) -> T:
    """Sum pytrees of one structure by a balanced tree of element-wise adds.

    Parameters
    ----------
    terms : sequence of pytrees
        At least one; every term has the same structure and leaf shapes.

    Returns
    -------
    pytree
        The leaf-wise sum, of the terms' structure.

    The adds are element-wise, so XLA fuses the whole sum (and element-wise producers of
    the terms, such as slices of one array) into one pass; the balanced tree keeps the
    rounding error at :math:`O(\\log n)` additions deep.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from etp_primitives.extend import pairwise_sum
    >>> print(pairwise_sum([{"w": jnp.ones(2)}, {"w": jnp.ones(2)}, {"w": jnp.ones(2)}])["w"].tolist())
    [3.0, 3.0]
    """
    level = list(terms)
    if not level:
        raise ValueError("pairwise_sum: expected at least one term, got an empty sequence.")
    while len(level) > 1:
        paired = [jax.tree.map(operator.add, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = paired + ([level[-1]] if len(level) % 2 else [])
    return level[0]


#: Up to this many terms, :func:`sum_leading_axes` adds slices pairwise instead of calling ``reduce``.
_PAIRWISE_SUM_LIMIT = 128


def sum_leading_axes(value: jax.Array, kept_ndim: int) -> jax.Array:
    """Sum ``value`` over all but its last ``kept_ndim`` axes (the batch axes of a trace contraction).

    On XLA's CPU backend (jax 0.10) a ``reduce`` becomes a YNNPACK fusion, many times slower
    here than streaming the array; a pairwise sum of the slices (:func:`pairwise_sum`) is one
    element-wise fusion that reads the array once.
    Used by the ``drtrl_grad`` rules, where this contraction reads the whole trace every step.
    """
    lead = value.ndim - kept_ndim
    if lead <= 0:
        return value
    flat = value.reshape((-1, *value.shape[lead:]))
    count = flat.shape[0]
    if count > _PAIRWISE_SUM_LIMIT or count == 0:
        return jnp.sum(flat, axis=0)
    return pairwise_sum(jax.lax.split(flat, [1] * count, axis=0)).reshape(flat.shape[1:])


def drtrl_grad(
    primitive: Primitive,
    x: Any,
    cotangent: jax.Array,
    trace: Mapping[str, jax.Array],
    weights: Mapping[str, jax.Array],
    params: Mapping[str, Any],
) -> dict[str, jax.Array]:
    r"""Contract one state's trace with the cotangent :math:`g = \partial L/\partial h` into :math:`\partial L/\partial W`.

    Uses the primitive's ``drtrl_grad`` rule when it has one; otherwise
    ``yw_to_w(cotangent, trace)`` summed over the batch axis (batched
    primitives), the contraction of the weight-shaped layout.
    """
    rule = _record(primitive).drtrl_grad
    if rule is not None:
        return dict(rule(x, cotangent, dict(trace), dict(weights), **params))
    yw_to_w = require_rules(primitive, "yw_to_w")["yw_to_w"]
    weighted = dict(yw_to_w(cotangent, dict(trace), **params))
    if not is_batched_primitive(primitive):
        return weighted
    return {key: sum_leading_axes(value, value.ndim - 1) for key, value in weighted.items()}


def init_pp_like_output(x_var: Any, y_var: Any, weight_vars: Any, num_hidden_state: int) -> jax.Array:
    """``init_pp`` for any primitive: zeros shaped ``(*y.shape, num_hidden_state)`` in ``y``'s dtype."""
    del x_var, weight_vars
    y = aval_of(y_var)
    return jnp.zeros((*y.shape, num_hidden_state), dtype=y.dtype)


def derive_xy_to_dw(
    impl_fn: Callable[..., Any],
    trainable_invars_fn: Callable[[dict[str, Any]], dict[str, int]],
    x_invar_index: int | None = 0,
) -> Callable[..., dict[str, jax.Array]]:
    """Build ``xy_to_dw`` as the exact VJP of ``impl_fn`` with respect to every trainable input.

    The invars of the primitive must be ``x`` (at ``x_invar_index``) and the
    trainable inputs named by ``trainable_invars_fn``, nothing else.
    """

    def xy_to_dw(
        x: Any, hidden_dim: jax.Array, weights: Mapping[str, jax.Array], **params: Any
    ) -> dict[str, jax.Array]:
        layout = trainable_invars_fn(params)
        n_invars = len(layout) + (0 if x_invar_index is None else 1)

        def forward(trainables: dict[str, jax.Array]) -> Any:
            args: list[Any] = [None] * n_invars
            if x_invar_index is not None:
                args[x_invar_index] = x
            for key, index in layout.items():
                args[index] = trainables[key]
            return impl_fn(*args, **params)

        _, pullback = jax.vjp(forward, {key: weights[key] for key in layout})
        (grads,) = pullback(hidden_dim)
        return dict(grads)

    return xy_to_dw
