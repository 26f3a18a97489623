r"""Sparse matrix multiplication: ``etp_sp_mm`` (batched) and ``etp_sp_mv`` (unbatched).

.. math::

    y_{\ldots c} = \sum_{k:\, \mathrm{col}_k = c} x_{\ldots \mathrm{row}_k}\, w_k \;(+ b_c),

where :math:`w \in \mathbb{R}^{\mathrm{nse}}` are the stored values of a
sparse :math:`I \times O` matrix and ``(row_k, col_k)`` its pattern. Invars
``(x, weight_data[, bias])``; static ``sparse_mat`` (a hashable
:class:`SparseStructure`, so the op works under ``jit``) and ``has_bias``;
trainable keys ``weight`` (invar 1), ``bias`` (invar 2).

**D-RTRL trace layout**: ``weight`` :math:`(\ldots, \mathrm{nse})`, ``bias``
:math:`(\ldots, O)`. Value :math:`w_k` feeds only :math:`y_{\ldots \mathrm{col}_k}`:

.. math::

    \mathrm{yw\_to\_w}(d, \epsilon)_{\ldots k} = \epsilon_{\ldots k}\, d_{\ldots \mathrm{col}_k},\quad
    \mathrm{seed}(x, d)_{\ldots k} = x_{\ldots \mathrm{row}_k}\, d_{\ldots \mathrm{col}_k},\quad
    \frac{\partial L}{\partial w_k} = \sum_{\ldots} g_{\ldots \mathrm{col}_k}\, \epsilon_{\ldots k}.

Exact for position-wise dynamics (per-unit leak); memory :math:`O(B\cdot\mathrm{nse})`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from saiunit.sparse import COO, CSC, CSR, SparseMatrix

from .._checks import as_array, check_ndim, check_shape
from .._units import attach_unit, bias_in_unit, product_unit, split_unit
from ._common import (
    add_bias_last_axis,
    apply_weight_fn,
    bias_layout,
    bound_with_bias,
    init_weight_shaped_drtrl,
    register_batched_pair,
)

__all__ = ["SparseStructure", "etp_sp_mm_p", "etp_sp_mv_p", "sparse_matmul", "sparse_layout"]


_LAYOUT_CLASSES: tuple[tuple[str, type], ...] = (("csr", CSR), ("csc", CSC), ("coo", COO))
_LAYOUT_NAMES = {"CSR": "csr", "CSC": "csc", "COO": "coo"}


def sparse_layout(matrix: Any) -> str | None:
    """``'csr'``, ``'csc'`` or ``'coo'``: the layout of a sparse matrix, ``None`` for any other.

    By ``isinstance`` against saiunit's ``CSR``/``CSC``/``COO`` (so subclasses
    count), then by a scipy-style ``format`` attribute, then by a class named
    ``CSR``/``CSC``/``COO`` in the MRO (the classes of libraries that subclass
    ``saiunit.SparseMatrix`` directly, e.g. ``brainevent.CSR``).
    """
    for fmt, klass in _LAYOUT_CLASSES:
        if isinstance(matrix, klass):
            return fmt
    declared = getattr(matrix, "format", None)
    if isinstance(declared, str) and declared.lower() in _LAYOUT_NAMES.values():
        return declared.lower()
    for klass in type(matrix).__mro__:
        if klass.__name__ in _LAYOUT_NAMES:
            return _LAYOUT_NAMES[klass.__name__]
    return None


class SparseStructure:
    """The static sparsity pattern of a matrix: shape and ``(row, col)`` of each stored value.

    Hashable and compared by content, so it can be a static parameter of a
    JAX equation (``jit`` hashes equation parameters). Built from a saiunit
    ``CSR``, ``CSC`` or ``COO`` matrix with :meth:`from_sparse`; the stored
    values stay a separate, trainable array.
    """

    __slots__ = ("format", "shape", "rows", "cols", "_hash")

    def __init__(self, format: str, shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> None:
        self.format = format
        self.shape = (int(shape[0]), int(shape[1]))
        self.rows = np.asarray(rows, dtype=np.int32)
        self.cols = np.asarray(cols, dtype=np.int32)
        self.rows.setflags(write=False)
        self.cols.setflags(write=False)
        self._hash = hash((self.format, self.shape, self.rows.tobytes(), self.cols.tobytes()))

    @classmethod
    def from_sparse(cls, matrix: Any, where: str = "sparse_matmul") -> SparseStructure:
        """Pattern of a saiunit sparse matrix in CSR, CSC or COO layout, or of a ``SparseStructure``.

        Accepted: ``saiunit.sparse.CSR``, ``CSC``, ``COO`` and their
        subclasses, and any other ``saiunit.SparseMatrix`` subclass of one of
        those layouts (a class named ``CSR``, ``CSC`` or ``COO`` in its MRO, or
        a scipy-style ``format`` attribute ``'csr'``/``'csc'``/``'coo'``, with
        the layout's index arrays), such as ``brainevent.CSR``.

        Raises
        ------
        TypeError
            If ``matrix`` is not a saiunit sparse matrix, its layout is not
            CSR, CSC or COO (the message names its class), or its pattern is traced.
        ValueError
            If ``matrix`` is not 2-D.
        """
        if isinstance(matrix, SparseStructure):
            return matrix
        if not isinstance(matrix, SparseMatrix):
            raise TypeError(
                f"{where}: sparse_mat must be a saiunit sparse matrix (saiunit.sparse.CSR, CSC or COO), "
                f"got {type(matrix).__name__}."
            )
        fmt = sparse_layout(matrix)
        needed = {"csr": ("indptr", "indices"), "csc": ("indptr", "indices"), "coo": ("row", "col")}.get(fmt or "")
        kind = f"{type(matrix).__module__}.{type(matrix).__qualname__}"
        if fmt is None or needed is None:
            raise TypeError(
                f"{where}: sparse_mat is a {kind}, a saiunit.SparseMatrix whose layout is not CSR, CSC or COO; "
                "sparse_matmul accepts saiunit.sparse.CSR, CSC, COO, their subclasses and other SparseMatrix classes "
                "in one of those layouts (e.g. brainevent.CSR). Convert it first (e.g. with its tocsr() or tocoo())."
            )
        absent = [name for name in needed if not hasattr(matrix, name)]
        if absent:
            raise TypeError(
                f"{where}: sparse_mat is a {kind} in {fmt.upper()} layout but has no {', '.join(absent)} "
                f"attribute{'s' if len(absent) > 1 else ''}; a {fmt.upper()} matrix needs {' and '.join(needed)}."
            )
        if len(matrix.shape) != 2:
            raise ValueError(f"{where}: sparse_mat must be 2-D, got shape {tuple(matrix.shape)}.")
        source: Any = matrix  # a foreign class: its index arrays are not attributes of SparseMatrix
        try:
            if fmt == "csr":
                indptr = np.asarray(source.indptr)
                rows = np.repeat(np.arange(source.shape[0]), np.diff(indptr))
                cols = np.asarray(source.indices)
            elif fmt == "csc":
                indptr = np.asarray(source.indptr)
                cols = np.repeat(np.arange(source.shape[1]), np.diff(indptr))
                rows = np.asarray(source.indices)
            else:
                rows, cols = np.asarray(source.row), np.asarray(source.col)
        except jax.errors.TracerArrayConversionError:
            raise TypeError(
                f"{where}: the sparsity pattern (indices) of sparse_mat is a traced value; it must be known when the "
                "function is traced. Build the sparse matrix outside jit (its indices are static pytree data)."
            ) from None
        return cls(fmt, (matrix.shape[0], matrix.shape[1]), rows, cols)

    @property
    def nse(self) -> int:
        """Number of stored values."""
        return int(self.rows.shape[0])

    def todense(self, data: jax.Array) -> jax.Array:
        """The dense ``(in, out)`` matrix with ``data`` at the pattern (duplicates add up)."""
        return jnp.zeros(self.shape, dtype=data.dtype).at[self.rows, self.cols].add(data)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparseStructure):
            return NotImplemented
        return (
            self._hash == other._hash
            and self.format == other.format
            and self.shape == other.shape
            and np.array_equal(self.rows, other.rows)
            and np.array_equal(self.cols, other.cols)
        )

    def __repr__(self) -> str:
        return f"SparseStructure(format={self.format!r}, shape={self.shape}, nse={self.nse})"


def _sparse_impl(
    x: jax.Array, data: jax.Array, *bias: jax.Array, sparse_mat: SparseStructure, has_bias: bool = False
) -> jax.Array:
    contributions = x[..., sparse_mat.rows] * jnp.reshape(data, (1,) * (x.ndim - 1) + tuple(data.shape))
    y = jax.ops.segment_sum(jnp.moveaxis(contributions, -1, 0), sparse_mat.cols, num_segments=sparse_mat.shape[1])
    y = jnp.moveaxis(y, 0, -1)
    if has_bias:
        y = add_bias_last_axis(y, bias[0])
    return y


_trainable = bias_layout({"weight": 1}, 2)


def _yw_to_w(hidden_dim: jax.Array, trace: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    pattern: SparseStructure = params["sparse_mat"]
    out = {}
    if "weight" in trace:
        out["weight"] = trace["weight"] * hidden_dim[..., pattern.cols]
    if "bias" in trace:
        out["bias"] = trace["bias"] * hidden_dim
    return out


def _seed(x: jax.Array, hidden_dim: jax.Array, weights: dict[str, jax.Array], **params: Any) -> dict[str, jax.Array]:
    pattern: SparseStructure = params["sparse_mat"]
    out = {"weight": x[..., pattern.rows] * hidden_dim[..., pattern.cols]}
    if "bias" in weights:
        out["bias"] = hidden_dim
    return out


def _grad(
    x: jax.Array, cotangent: jax.Array, trace: dict[str, jax.Array], weights: dict[str, jax.Array], **params: Any
) -> dict[str, jax.Array]:
    pattern: SparseStructure = params["sparse_mat"]
    out = {"weight": jnp.einsum("...k,...k->k", trace["weight"], cotangent[..., pattern.cols])}
    if "bias" in trace:
        out["bias"] = jnp.einsum("...o,...o->o", trace["bias"], cotangent)
    return out


#: ``etp_sp_mm`` (batched, ``x`` of shape ``(batch..., in)``) and ``etp_sp_mv`` (unbatched).
etp_sp_mm_p, etp_sp_mv_p = register_batched_pair(
    "etp_sp",
    _sparse_impl,
    _trainable,
    yw_to_w=_yw_to_w,
    init_drtrl=init_weight_shaped_drtrl,
    drtrl_seed=_seed,
    drtrl_grad=_grad,
)


def sparse_matmul(
    x: Any,
    weight_data: Any = None,
    *,
    sparse_mat: Any,
    bias: Any = None,
    weight_fn: Callable[[Any], Any] | None = None,
    bias_fn: Callable[[Any], Any] | None = None,
    weight: Any = None,
) -> Any:
    r"""ETP-marked sparse layer :math:`y = x\, \mathrm{sparse}(f(w)) (+ g(b))`.

    Parameters
    ----------
    x : Array or Quantity
        ``(..., in_features)``; ``x.ndim >= 2`` binds ``etp_sp_mm``, ``1`` binds ``etp_sp_mv``.
    weight_data : Array or Quantity
        ``(nse,)``: the stored values, in the order of ``sparse_mat.data``.
    sparse_mat : saiunit sparse matrix in CSR, CSC or COO layout, or a SparseStructure
        ``(in_features, out_features)``; only its pattern is used, and that
        pattern must be concrete (it is static under ``jit``). Subclasses and
        other libraries' ``saiunit.SparseMatrix`` classes in those layouts
        (``brainevent.CSR``) are accepted (see :meth:`SparseStructure.from_sparse`).
    bias : Array or Quantity, optional
        ``(out_features,)``.
    weight_fn, bias_fn : callable, optional
        Plain-JAX transforms of ``weight_data`` and ``bias`` applied inside the
        op, before the marker (braintrace 0.2.8 keywords); the compiler traces
        the transformed values back to their ParamState.
    weight : Array or Quantity, optional
        ``weight_data`` under its braintrace 0.2.8 keyword name; give one of the two.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import saiunit.sparse as ss
    >>> import etp_primitives as etp
    >>> mat = ss.CSR.fromdense(jnp.eye(3))
    >>> print(etp.sparse_matmul(jnp.ones((2, 3)), mat.data * 2.0, sparse_mat=mat).tolist())
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    x_m, x_unit = split_unit(x)
    x_m = as_array(x_m, "sparse_matmul", "x")
    name = "etp_sp_mm" if x_m.ndim >= 2 else "etp_sp_mv"
    where = f"sparse_matmul ({name})"
    pattern = SparseStructure.from_sparse(sparse_mat, where)
    if (weight_data is None) == (weight is None):
        raise TypeError(
            f"{where}: pass the stored values once, as weight_data (positional) or weight= (its braintrace 0.2.8 "
            f"name); got {'both' if weight is not None else 'neither'}."
        )
    weight_data = weight if weight_data is None else weight_data
    weight_data = apply_weight_fn(weight_fn, weight_data, where, "weight_fn", "weight_data")
    if bias is None and bias_fn is not None:
        raise TypeError(f"{where}: bias_fn was given but bias is None; pass a bias to transform, or drop bias_fn.")
    bias = apply_weight_fn(bias_fn, bias, where, "bias_fn", "bias")
    w_m, w_unit = split_unit(weight_data)
    w_m = as_array(w_m, where, "weight_data")
    check_ndim(x_m, 1, where, "x", "(..., in_features)")
    check_shape(w_m.shape, (pattern.nse,), where, "weight_data", "one value per stored element of sparse_mat")
    if x_m.shape[-1] != pattern.shape[0]:
        raise ValueError(
            f"{where}: x has {x_m.shape[-1]} input features (shape {tuple(x_m.shape)}) but sparse_mat has shape "
            f"{pattern.shape}; expected x of shape (..., {pattern.shape[0]})."
        )
    out_unit = product_unit(x_unit, w_unit)
    b_m = None
    if bias is not None:
        b_m = as_array(bias_in_unit(bias, out_unit, where), where, "bias")
        check_shape(b_m.shape, (pattern.shape[1],), where, "bias", "out_features of sparse_mat")
    primitive = etp_sp_mm_p if x_m.ndim >= 2 else etp_sp_mv_p
    return attach_unit(bound_with_bias(primitive, (x_m, w_m), b_m, sparse_mat=pattern), out_unit)
