r"""Element-wise weights: ``etp_elemwise`` (unbatched, ``gradient_enabled``).

``element_wise(w, fn)`` computes :math:`y = \mathrm{fn}(w)` with plain JAX and
passes the result through ``etp_elemwise``, an identity marker. The
primitive's single invar is the processed value :math:`\tilde w = \mathrm{fn}(w)`
(trainable key ``weight``, invar 0, no ``x``); the compiler traces it back
through ``fn`` to the parameter.

**D-RTRL trace layout**: ``weight`` shaped like :math:`\tilde w`.
:math:`\tilde w_k` feeds only :math:`y_k`, so

.. math::

    \mathrm{yw\_to\_w}(d, \epsilon) = \epsilon \odot d, \quad
    \mathrm{seed}(d) = \mathrm{xy\_to\_dw}(d) = d, \quad
    \frac{\partial L}{\partial \tilde w} = g \odot \epsilon .

Exact for position-wise dynamics. The primitive is ``gradient_enabled``: it
does not end the ``y -> h`` walk of an upstream weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import saiunit as u

from .._checks import as_array
from .._primitive import set_batching_rule
from .._spec import ETPPrimitiveSpec, register_primitive_spec
from .._trace import aval_of, init_pp_like_output
from .._units import attach_unit, split_unit
from ._common import weight_dtype, zeros_with_state_axis

__all__ = ["etp_elemwise_p", "element_wise"]


def _identity_impl(weight: jax.Array) -> jax.Array:
    return jnp.asarray(weight)


def _trainable(params: dict[str, Any]) -> dict[str, int]:
    del params
    return {"weight": 0}


def _yw_to_w(hidden_dim: jax.Array, trace: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    return {"weight": trace["weight"] * hidden_dim}


def _xy_to_dw(x: Any, hidden_dim: jax.Array, weights: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    # The VJP of the identity: the cotangent itself, in the weight's shape.
    return {"weight": jnp.broadcast_to(hidden_dim, jnp.shape(weights["weight"]))}


def _init_drtrl(x_var: Any, y_var: Any, weight_vars: dict[str, Any], num_hidden_state: int) -> dict[str, jax.Array]:
    return {
        "weight": zeros_with_state_axis(
            aval_of(weight_vars["weight"]).shape, weight_dtype(weight_vars, "weight"), num_hidden_state
        )
    }


#: The element-wise marker (identity on the processed weight).
etp_elemwise_p = register_primitive_spec(
    ETPPrimitiveSpec(
        name="etp_elemwise",
        impl=_identity_impl,
        yw_to_w=_yw_to_w,
        xy_to_dw=_xy_to_dw,
        init_drtrl=_init_drtrl,
        init_pp=init_pp_like_output,
        trainable_invars_fn=_trainable,
        x_invar_index=None,
        batched=False,
        gradient_enabled=True,
    )
)


def _batch_identity(args: Any, dims: Any, **params: Any) -> tuple[Any, Any]:
    return etp_elemwise_p.bind(args[0], **params), dims[0]


set_batching_rule(etp_elemwise_p, _batch_identity)


def _identity(weight: Any) -> Any:
    return weight


def element_wise(weight: Any, fn: Callable[[Any], Any] = _identity) -> Any:
    r"""ETP-marked element-wise weight :math:`y = \mathrm{fn}(w)`.

    Parameters
    ----------
    weight : Array or Quantity
        Any shape.
    fn : callable
        Differentiable JAX function applied to ``weight`` before the marker
        (default: identity), e.g. ``jax.nn.sigmoid`` for a gate or
        ``jnp.abs`` for a positive time constant. For a ``Quantity`` weight
        it must be unit-aware (``saiunit.math.abs``); the result's unit is kept.

    Returns
    -------
    Array or Quantity
        ``fn(weight)``, with its unit.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> etp.element_wise(jnp.array([0.0, 2.0]), fn=jax.nn.sigmoid).round(3)
    Array([0.5  , 0.881], dtype=float32)
    """
    if not callable(fn):
        raise TypeError(f"element_wise (etp_elemwise): fn must be callable, got {type(fn).__name__}.")
    try:
        processed = fn(weight)
    except TypeError as err:
        if not isinstance(weight, u.Quantity):
            raise
        reason = str(err).rstrip(".")
        raise TypeError(
            f"element_wise (etp_elemwise): fn={getattr(fn, '__name__', fn)!r} cannot take the saiunit.Quantity "
            f"weight (unit {weight.unit}): {reason}. Use a unit-aware function (e.g. saiunit.math.abs instead of "
            "jnp.abs), or pass the mantissa."
        ) from None
    mantissa, unit = split_unit(processed)
    mantissa = as_array(mantissa, "element_wise (etp_elemwise)", "fn(weight)")
    return attach_unit(etp_elemwise_p.bind(mantissa), unit)
