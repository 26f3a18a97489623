r"""Low-rank adaptation: ``etp_lora_mm`` (batched) and ``etp_lora_mv`` (unbatched).

.. math::

    y = \alpha\, x B A + b, \qquad B \in \mathbb{R}^{I \times R},\; A \in \mathbb{R}^{R \times O}.

Invars ``(x, B, A[, bias])``; static ``alpha`` (a float) and ``has_bias``;
trainable keys ``lora_b`` (invar 1), ``lora_a`` (invar 2), ``bias`` (invar 3).

**D-RTRL trace layout** (``...`` = leading axes of ``x``; :math:`z = \alpha x B`):

* ``lora_a`` :math:`(\ldots, R, O)` — :math:`A_{ro}` feeds only :math:`y_{\ldots o}`:
  :math:`\mathrm{yw\_to\_w}(d,\epsilon)_{\ldots ro} = \epsilon_{\ldots ro} d_{\ldots o}`,
  :math:`\mathrm{seed} = z_{\ldots r} d_{\ldots o}`,
  :math:`\partial L/\partial A_{ro} = \sum_{\ldots} g_{\ldots o}\epsilon_{\ldots ro}`.
  Exact for a per-unit leak.
* ``lora_b`` :math:`(\ldots, I)` — :math:`B_{ir}` feeds every output, so the
  trace is the *filtered input* (as for convolution kernels):
  :math:`\mathrm{yw\_to\_w}(d,\epsilon) = \bar d\,\epsilon`,
  :math:`\mathrm{seed} = \bar d\, x` with :math:`\bar d` the mean of :math:`d`
  over the outputs of a sample, and
  :math:`\partial L/\partial B = \alpha \sum_{\ldots} \epsilon^{\top} (g A^{\top})`.
  Exact when the leak is uniform over units; memory :math:`O(B\cdot I)`.
* ``bias`` :math:`(\ldots, O)`, as for dense layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._checks import as_array, check_ndim, check_shape
from .._trace import aval_of
from .._units import attach_unit, bias_in_unit, product_unit, split_unit
from ._common import (
    add_bias_last_axis,
    apply_weight_fn,
    bias_init,
    bias_layout,
    bound_with_bias,
    register_batched_pair,
    weight_dtype,
    zeros_with_state_axis,
)

__all__ = ["etp_lora_mm_p", "etp_lora_mv_p", "lora_matmul"]


def _lora_impl(
    x: jax.Array, lora_b: jax.Array, lora_a: jax.Array, *bias: jax.Array, alpha: float = 1.0, has_bias: bool = False
) -> jax.Array:
    y = alpha * jnp.matmul(jnp.matmul(x, lora_b), lora_a)
    if has_bias:
        y = add_bias_last_axis(y, bias[0])
    return y


_trainable = bias_layout({"lora_b": 1, "lora_a": 2}, 3)


def _yw_to_w(hidden_dim: jax.Array, trace: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    out = {}
    if "lora_b" in trace:
        out["lora_b"] = trace["lora_b"] * jnp.mean(hidden_dim, axis=-1, keepdims=True)
    if "lora_a" in trace:
        out["lora_a"] = trace["lora_a"] * hidden_dim[..., None, :]
    if "bias" in trace:
        out["bias"] = trace["bias"] * hidden_dim
    return out


def _seed(x: jax.Array, hidden_dim: jax.Array, weights: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    z = params.get("alpha", 1.0) * jnp.matmul(x, weights["lora_b"])
    out = {
        "lora_b": x * jnp.mean(hidden_dim, axis=-1, keepdims=True),
        "lora_a": z[..., :, None] * hidden_dim[..., None, :],
    }
    if "bias" in weights:
        out["bias"] = hidden_dim
    return out


def _grad(
    x: jax.Array, cotangent: jax.Array, trace: dict[str, jax.Array], weights: dict[str, jax.Array], **params: Any
) -> dict[str, jax.Array]:
    alpha = params.get("alpha", 1.0)
    back = jnp.matmul(cotangent, weights["lora_a"].T)
    out = {
        "lora_b": alpha * jnp.einsum("...i,...r->ir", trace["lora_b"], back),
        "lora_a": jnp.einsum("...ro,...o->ro", trace["lora_a"], cotangent),
    }
    if "bias" in trace:
        out["bias"] = jnp.einsum("...o,...o->o", trace["bias"], cotangent)
    return out


def _init_drtrl(x_var: Any, y_var: Any, weight_vars: dict[str, Any], num_hidden_state: int) -> dict[str, jax.Array]:
    x = aval_of(x_var)
    lead = tuple(x.shape[:-1])
    out = {
        "lora_b": zeros_with_state_axis(x.shape, weight_dtype(weight_vars, "lora_b"), num_hidden_state),
        "lora_a": zeros_with_state_axis(
            (*lead, *aval_of(weight_vars["lora_a"]).shape), weight_dtype(weight_vars, "lora_a"), num_hidden_state
        ),
    }
    return bias_init(out, y_var, weight_vars, num_hidden_state)


#: ``etp_lora_mm`` (batched, ``x`` of shape ``(batch..., in)``) and ``etp_lora_mv`` (unbatched).
etp_lora_mm_p, etp_lora_mv_p = register_batched_pair(
    "etp_lora", _lora_impl, _trainable, yw_to_w=_yw_to_w, init_drtrl=_init_drtrl, drtrl_seed=_seed, drtrl_grad=_grad
)


def lora_matmul(
    x: Any,
    B: Any,
    A: Any,
    *,
    alpha: float = 1.0,
    bias: Any = None,
    b_fn: Callable[[Any], Any] | None = None,
    a_fn: Callable[[Any], Any] | None = None,
    bias_fn: Callable[[Any], Any] | None = None,
) -> Any:
    r"""ETP-marked low-rank layer :math:`y = \alpha\, x\, f_B(B)\, f_A(A) (+ g(b))`.

    Parameters
    ----------
    x : Array or Quantity
        ``(..., in_features)``; ``x.ndim >= 2`` binds ``etp_lora_mm``, ``1`` binds ``etp_lora_mv``.
    B : Array or Quantity
        ``(in_features, rank)``.
    A : Array or Quantity
        ``(rank, out_features)``.
    alpha : float
        Static scale (a Python number, not a traced value).
    bias : Array or Quantity, optional
        ``(out_features,)``.
    b_fn, a_fn, bias_fn : callable, optional
        Plain-JAX transforms of ``B``, ``A`` and ``bias`` applied inside the
        op, before the marker (braintrace 0.2.8 keywords). The compiler traces
        each transformed factor back through its transform to the ParamState,
        so it gets its eligibility trace and the gradient is chained through
        the transform.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> etp.lora_matmul(jnp.ones((8, 64)), jnp.ones((64, 4)), jnp.ones((4, 32)), alpha=2.0).shape
    (8, 32)
    """
    x_m, x_unit = split_unit(x)
    x_m = as_array(x_m, "lora_matmul", "x")
    name = "etp_lora_mm" if x_m.ndim >= 2 else "etp_lora_mv"
    where = f"lora_matmul ({name})"
    B = apply_weight_fn(b_fn, B, where, "b_fn", "B")
    A = apply_weight_fn(a_fn, A, where, "a_fn", "A")
    if bias is None and bias_fn is not None:
        raise TypeError(f"{where}: bias_fn was given but bias is None; pass a bias to transform, or drop bias_fn.")
    bias = apply_weight_fn(bias_fn, bias, where, "bias_fn", "bias")
    b_fac, b_unit = split_unit(B)
    a_fac, a_unit = split_unit(A)
    b_fac = as_array(b_fac, where, "B")
    a_fac = as_array(a_fac, where, "A")
    check_ndim(x_m, 1, where, "x", "(..., in_features)")
    check_ndim(b_fac, (2,), where, "B", "(in_features, rank)")
    check_ndim(a_fac, (2,), where, "A", "(rank, out_features)")
    if x_m.shape[-1] != b_fac.shape[0]:
        raise ValueError(
            f"{where}: x has {x_m.shape[-1]} input features (shape {tuple(x_m.shape)}) but B has shape "
            f"{tuple(b_fac.shape)}; expected B of shape ({x_m.shape[-1]}, rank)."
        )
    if a_fac.shape[0] != b_fac.shape[1]:
        raise ValueError(
            f"{where}: B has rank {b_fac.shape[1]} (shape {tuple(b_fac.shape)}) but A has shape "
            f"{tuple(a_fac.shape)}; expected A of shape ({b_fac.shape[1]}, out_features)."
        )
    try:
        alpha_f = float(alpha)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"{where}: alpha must be a concrete Python number (it is static), got {type(alpha).__name__}."
        ) from None
    out_unit = product_unit(x_unit, b_unit, a_unit)
    b_m = None
    if bias is not None:
        b_m = as_array(bias_in_unit(bias, out_unit, where), where, "bias")
        check_shape(b_m.shape, (a_fac.shape[1],), where, "bias", "out_features of A")
    primitive = etp_lora_mm_p if x_m.ndim >= 2 else etp_lora_mv_p
    return attach_unit(bound_with_bias(primitive, (x_m, b_fac, a_fac), b_m, alpha=alpha_f), out_unit)
