r"""Element-wise weights: ``etp_elemwise`` (unbatched, ``gradient_enabled``).

``element_wise(w, fn)`` (or ``weight_fn=``, the braintrace 0.2.8 keyword) computes
:math:`y = \mathrm{fn}(w)` with plain JAX and passes the result through
``etp_elemwise``, an identity marker. The
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

from .._checks import as_array
from .._primitive import register_primitive_spec, set_batching_rule
from .._spec import ETPPrimitiveSpec
from .._trace import aval_of, init_pp_like_output
from .._units import attach_unit, split_unit
from ._common import apply_weight_fn, one_transform, weight_dtype, zeros_with_state_axis

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


def element_wise(
    weight: Any,
    fn: Callable[[Any], Any] | None = None,
    *,
    weight_fn: Callable[[Any], Any] | None = None,
) -> Any:
    r"""ETP-marked element-wise weight :math:`y = \mathrm{fn}(w)`.

    Parameters
    ----------
    weight : Array or Quantity
        Any shape.
    fn : callable, optional
        Differentiable JAX function applied to ``weight`` before the marker
        (default: identity), e.g. ``jax.nn.sigmoid`` for a gate or
        ``jnp.abs`` for a positive time constant. For a ``Quantity`` weight
        it must be unit-aware (``saiunit.math.abs``); the result's unit is kept.
    weight_fn : callable, optional
        The same transform under its braintrace 0.2.8 name; give ``fn`` or ``weight_fn``.

    Returns
    -------
    Array or Quantity
        ``fn(weight)``, with its unit.

    Raises
    ------
    TypeError
        If the transform is not callable, ``fn`` and ``weight_fn`` are two
        different functions, or a unit-unaware ``fn`` gets a ``Quantity``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> y = etp.element_wise(jnp.array([0.0, 2.0]), fn=jax.nn.sigmoid)
    >>> print([round(float(v), 3) for v in y])
    [0.5, 0.881]
    >>> bool(jnp.all(etp.element_wise(jnp.array([0.0, 2.0]), weight_fn=jax.nn.sigmoid) == y))
    True
    """
    where = "element_wise (etp_elemwise)"
    transform = one_transform(where, "fn", fn, "weight_fn", weight_fn)
    processed = apply_weight_fn(transform, weight, where, "fn" if fn is not None else "weight_fn", "weight")
    mantissa, unit = split_unit(processed)
    mantissa = as_array(mantissa, where, "fn(weight)")
    return attach_unit(etp_elemwise_p.bind(mantissa), unit)
