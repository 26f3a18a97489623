r"""Embedding lookup (a gather of rows): ``etp_embedding``.

.. math::

    y_{p,e} = W_{\mathrm{clip}(i_p),\, e}, \qquad W \in \mathbb{R}^{V \times E},\;
    i \in \mathbb{Z}^{S},\; y \in \mathbb{R}^{S \times E},

with :math:`\mathrm{clip}(i) = \min(\max(i, 0), V - 1)`: an index out of
range is clamped, as JAX clamps a gather (a negative index is **not** counted
from the end, unlike NumPy). Invars ``(indices, weight)``: the integer
indices are the primitive's ``x`` (invar 0), ``weight`` is the trainable key
(invar 1).

**D-RTRL trace layout: per gathered row.** The trace is shaped like ``y``,
:math:`\epsilon_{p,e}` per index position :math:`p` (memory
:math:`O(|S| \cdot E)`, not :math:`O(V)`): the sensitivity of the hidden state
at :math:`p` to the row gathered there,

.. math::

    \mathrm{yw\_to\_w}(d, \epsilon) = d \odot \epsilon,\quad
    \mathrm{seed}(i, d) = d,\quad
    \frac{\partial L}{\partial W_{v,e}} = \sum_{p:\ \mathrm{clip}(i_p) = v} g_{p,e}\, \epsilon_{p,e}

(a scatter-add into the rows of the indices of the step).

**When it is exact.** The exact D-RTRL trace of a row :math:`v` at a position
:math:`p` sums the propagated contributions of the steps at which :math:`p`
gathered :math:`v`. The per-row trace sums those of *every* past step and
credits them to the row gathered now, so D-RTRL with this layout is exact
(for position-wise dynamics, e.g. a leaky integrator) exactly when, at every
position, no contribution of a step with another index survives the
propagation: the index is constant at each position over every stretch of
steps that the hidden Jacobian :math:`D` connects — e.g. one index per
sequence (a speaker, task or class embedding) with the traces reset between
sequences, or :math:`D = 0` whenever the index changes (no memory across the
change). Otherwise the decayed sensitivity of earlier rows is credited to the
current row, an approximation; an exact trace of changing indices needs the
full table, :math:`O(V \cdot E)` per position (a one-hot :func:`matmul`).

ES-D-RTRL (pp-prop) filters the op's input over time, which is meaningless
for indices; its ``xy_to_dw`` rule refuses a non-integer ``x`` with a
``TypeError`` (D-RTRL is the learner for embeddings).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import as_array, check_ndim
from .._primitive import register_primitive_spec, set_batching_rule
from .._spec import ETPPrimitiveSpec
from .._trace import aval_of, init_pp_like_output
from .._units import attach_unit, split_unit
from ._common import apply_weight_fn, weight_dtype, zeros_with_state_axis

__all__ = ["etp_embedding_p", "embedding", "EMBEDDING_MODES"]

_WHERE = "embedding (etp_embedding)"

#: The index modes of :func:`embedding`.
EMBEDDING_MODES = ("clip", "check")


def _clipped(indices: jax.Array, rows: int) -> jax.Array:
    return jnp.clip(indices, 0, rows - 1)


def _embedding_impl(indices: jax.Array, weight: jax.Array) -> jax.Array:
    return weight[_clipped(indices, weight.shape[0])]


def _trainable(params: dict[str, Any]) -> dict[str, int]:
    del params
    return {"weight": 1}


def _scatter_rows(indices: jax.Array, values: jax.Array, weight: jax.Array) -> jax.Array:
    """``sum_p [clip(i_p) = v] values_p`` for every row ``v``: a ``weight``-shaped scatter-add."""
    rows, width = weight.shape
    flat = _clipped(indices, rows).reshape(-1)
    out = jnp.zeros((rows, width), dtype=jnp.result_type(values.dtype, weight.dtype))
    return out.at[flat].add(values.reshape((-1, width)))


def _checked_indices(x: Any, rule: str) -> jax.Array:
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(
            f"{_WHERE}: the {rule} rule got an input of dtype {jnp.result_type(x)}, but the input of an embedding is "
            "its integer indices; a learner that filters the input over time (ES-D-RTRL / pp-prop) cannot form an "
            "index from filtered indices. Train embedding weights with D-RTRL."
        )
    return jnp.asarray(x)


def _yw_to_w(hidden_dim: jax.Array, trace: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    return {"weight": trace["weight"] * hidden_dim}


def _seed(x: Any, hidden_dim: jax.Array, weights: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    return {"weight": hidden_dim.astype(jnp.result_type(hidden_dim.dtype, weights["weight"].dtype))}


def _grad(
    x: Any, cotangent: jax.Array, trace: dict[str, jax.Array], weights: dict[str, jax.Array], **params: Any
) -> dict[str, jax.Array]:
    indices = _checked_indices(x, "drtrl_grad")
    return {"weight": _scatter_rows(indices, cotangent * trace["weight"], weights["weight"])}


def _xy_to_dw(x: Any, hidden_dim: jax.Array, weights: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    # the VJP of the gather: the cotangent scatter-added into the gathered rows
    indices = _checked_indices(x, "xy_to_dw")
    return {"weight": _scatter_rows(indices, hidden_dim, weights["weight"]).astype(weights["weight"].dtype)}


def _init_drtrl(x_var: Any, y_var: Any, weight_vars: dict[str, Any], num_hidden_state: int) -> dict[str, jax.Array]:
    return {
        "weight": zeros_with_state_axis(aval_of(y_var).shape, weight_dtype(weight_vars, "weight"), num_hidden_state)
    }


#: The embedding marker: a gather of rows of the weight at integer indices (the primitive's ``x``).
etp_embedding_p = register_primitive_spec(
    ETPPrimitiveSpec(
        name="etp_embedding",
        impl=_embedding_impl,
        yw_to_w=_yw_to_w,
        xy_to_dw=_xy_to_dw,
        init_drtrl=_init_drtrl,
        init_pp=init_pp_like_output,
        trainable_invars_fn=_trainable,
        x_invar_index=0,
        batched=False,
        drtrl_seed=_seed,
        drtrl_grad=_grad,
    )
)


def _batch_embedding(args: Sequence[Any], dims: Sequence[int | None], **params: Any) -> tuple[Any, int]:
    """``vmap`` over the indices alone keeps the marker (the gather takes indices of any shape)."""
    if dims[0] is not None and dims[1] is None:
        return etp_embedding_p.bind(jnp.moveaxis(args[0], dims[0], 0), args[1]), 0
    return jax.vmap(_embedding_impl, in_axes=tuple(dims))(*args), 0


set_batching_rule(etp_embedding_p, _batch_embedding)


def _raise_out_of_range(indices: Any, *, rows: int) -> None:
    values = np.asarray(indices)
    if values.size and (values.min() < 0 or values.max() >= rows):
        raise ValueError(
            f"{_WHERE}: indices must lie in [0, {rows}) (the weight has {rows} rows); got indices from "
            f"{int(values.min())} to {int(values.max())} in indices of shape {tuple(values.shape)} (mode='check')."
        )


def embedding(indices: Any, weight: Any, *, weight_fn: Callable[[Any], Any] | None = None, mode: str = "clip") -> Any:
    r"""ETP-marked embedding lookup :math:`y = f(W)[i]`: the rows of the weight at integer ``indices``.

    Parameters
    ----------
    indices : integer array
        Any shape ``S`` (a scalar included); valid ids are ``0 .. V - 1``.
    weight : Array or Quantity
        ``(V, E)`` (after ``weight_fn``).
    weight_fn : callable, optional
        A plain-JAX transform of ``weight`` applied before the marker (braintrace 0.2.8
        keyword); the compiler traces the transformed table back to its ParamState.
    mode : {'clip', 'check'}
        What an index out of range does. ``'clip'`` (default, as JAX's gather): it is
        clamped into ``[0, V - 1]`` (``-1`` reads row 0, ``V`` reads row ``V - 1``).
        ``'check'``: a ``ValueError`` naming the range and the indices found; concrete
        indices are checked at once, traced ones (under ``jit``, ``vmap`` or a learner)
        by a host callback when the step runs, whose error reaches the caller inside
        JAX's runtime error (``jax.errors.JaxRuntimeError``).

    Returns
    -------
    Array or Quantity
        ``(*S, E)``, with the weight's unit.

    Raises
    ------
    TypeError
        If ``indices`` are not integers, or ``weight_fn`` is not callable.
    ValueError
        If the weight is not 2-D, ``mode`` is unknown, or (``mode='check'``) an index is out of range.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> table = jnp.arange(6.0).reshape(3, 2)
    >>> print(etp.embedding(jnp.array([2, 0]), table).tolist())
    [[4.0, 5.0], [0.0, 1.0]]
    >>> print(etp.embedding(jnp.array([-1, 3]), table).tolist())   # clamped
    [[0.0, 1.0], [4.0, 5.0]]
    """
    if mode not in EMBEDDING_MODES:
        raise ValueError(f"{_WHERE}: mode must be one of {EMBEDDING_MODES}, got {mode!r}.")
    weight = apply_weight_fn(weight_fn, weight, _WHERE, "weight_fn", "weight")
    w_m, w_unit = split_unit(weight)
    w_m = as_array(w_m, _WHERE, "weight")
    check_ndim(w_m, (2,), _WHERE, "weight", "(num_embeddings, embedding_size)")
    if isinstance(indices, (bool, float)) or isinstance(indices, (np.ndarray, np.generic, list, tuple, int)):
        indices = np.asarray(indices)
    dtype = getattr(indices, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{_WHERE}: indices must be an integer array of row ids in [0, {w_m.shape[0]}), got "
            f"{type(indices).__name__} with dtype {dtype}."
        )
    rows = int(w_m.shape[0])
    if mode == "check":
        if isinstance(indices, jax.core.Tracer):
            jax.debug.callback(functools.partial(_raise_out_of_range, rows=rows), indices)
        else:
            _raise_out_of_range(indices, rows=rows)
    return attach_unit(etp_embedding_p.bind(jnp.asarray(indices), w_m), w_unit)
