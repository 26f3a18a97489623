"""Embedding: a lookup table through :func:`etp_primitives.embedding` (a gather of rows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

import etp_primitives as etp

from ._linear import STANDARD_NORMAL, Initializer, _init_param, _positive_int
from ._utils import layer_name

__all__ = ["Embedding"]


class Embedding(brainstate.nn.Module):
    r"""Lookup table :math:`y = W_{i}` through :func:`etp_primitives.embedding` (``etp_embedding``).

    Row :math:`W_{i}` of :math:`W \in \mathbb{R}^{N \times D}` is returned for
    each integer id :math:`i`. With ``trace='row'`` (default) the lookup is a
    gather, :func:`etp_primitives.embedding`, whose D-RTRL trace is kept per
    gathered row, :math:`O(D)` memory per id (not :math:`O(N \cdot D)`). It is
    exact when each position keeps its id over the steps its hidden state
    remembers (e.g. one id per sequence, traces reset between sequences); with
    ids that change while the state remembers, past sensitivities are credited
    to the current row (see :func:`etp_primitives.embedding`). ``trace='table'``
    writes the lookup as a one-hot product through :func:`etp_primitives.matmul`
    (``etp_mm`` / ``etp_mv``): the trace holds the whole table per id,
    :math:`O(N \cdot D)` memory, and D-RTRL is exact for any sequence of ids.

    Parameters
    ----------
    num_embeddings : int
        :math:`N`, the number of ids; valid ids are ``0 .. N-1``.
    embedding_size : int
        :math:`D`.
    w_init : initializer or array
        :math:`W` ``(N, D)``; default standard normal.
    name : str, optional
    mode : {'clip', 'check'}
        Out-of-range ids. Concrete ids are always checked (``ValueError``). Traced ids
        (under ``jit`` or a learner) are clamped into ``[0, N - 1]`` with ``'clip'``
        (default, as JAX's gather), and checked by a host callback with ``'check'``
        (the error reaches the caller inside ``jax.errors.JaxRuntimeError``). With
        ``trace='table'`` and ``'clip'``, a traced out-of-range id gives a zero vector (its one-hot row is 0).
    trace : {'row', 'table'}
        The D-RTRL trace layout (see above): per gathered row (default) or the whole table.

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (N, D)}``.

    Notes
    -----
    ``indices`` may have any shape ``S`` (a scalar included); the output has shape ``(*S, D)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_nn
    >>> layer = etp_nn.Embedding(10, 4)
    >>> layer(jnp.array([[1, 2, 3], [4, 5, 6]])).shape
    (2, 3, 4)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_size: int,
        w_init: Initializer = STANDARD_NORMAL,
        name: str | None = None,
        *,
        mode: str = "clip",
        trace: str = "row",
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        self.num_embeddings = _positive_int(self, num_embeddings, "num_embeddings")
        self.embedding_size = _positive_int(self, embedding_size, "embedding_size")
        if mode not in etp.EMBEDDING_MODES:
            raise ValueError(f"{layer_name(self)}: mode must be one of {etp.EMBEDDING_MODES}, got {mode!r}.")
        if trace not in ("row", "table"):
            raise ValueError(f"{layer_name(self)}: trace must be 'row' or 'table', got {trace!r}.")
        self.mode, self.trace = mode, trace
        self.out_size = self.embedding_size
        shape = (self.num_embeddings, self.embedding_size)
        self.weight = brainstate.ParamState({"weight": _init_param(self, w_init, shape, "w_init")})

    def _check_range(self, indices: Any) -> None:
        n = self.num_embeddings
        concrete = np.asarray(indices)
        if concrete.size == 0:
            return
        low, high = int(concrete.min()), int(concrete.max())
        if low < 0 or high >= n:
            raise ValueError(
                f"{layer_name(self)}: indices must lie in [0, {n}) (num_embeddings={n}); got ids from {low} to "
                f"{high} in indices of shape {tuple(concrete.shape)}."
            )

    def update(self, indices: Any) -> Any:
        n = self.num_embeddings
        if isinstance(indices, Sequence) or isinstance(indices, (int, np.integer, np.ndarray)):
            indices = jnp.asarray(indices)
        dtype = getattr(indices, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"{layer_name(self)}: indices must be an integer array of ids in [0, {n}) (num_embeddings={n}), "
                f"got {type(indices).__name__} with dtype {dtype}."
            )
        if not isinstance(indices, jax.core.Tracer):
            self._check_range(indices)
        elif self.mode == "check" and self.trace == "table":
            jax.debug.callback(self._check_range, indices)
        params: dict[str, Any] = self.weight.value
        table = params["weight"]
        if self.trace == "table":
            return etp.matmul(jax.nn.one_hot(indices, n, dtype=u.get_mantissa(table).dtype), table)
        return etp.embedding(indices, table, mode=self.mode)
