"""Dense layers whose weights flow through the ETP dense primitives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import brainstate
import jax
from brainstate.nn import init

import etp_primitives as etp

from ._utils import check_last_dim

__all__ = ["Linear"]

Initializer = Callable[..., Any] | jax.Array


class Linear(brainstate.nn.Module):
    r"""Dense layer :math:`y = x (W \odot M) + b` through :func:`etp_primitives.matmul`.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Feature sizes; the last entry is the number of features.
    w_init : initializer or array
        Weight ``(in, out)``; default Kaiming normal.
    b_init : initializer, array or None
        Bias ``(out,)``; ``None`` for no bias. Default zeros.
    w_mask : array, initializer or None
        Fixed mask ``(in, out)`` multiplied into the weight before the op;
        the compiler traces the masked weight back to :attr:`weight`.
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (in, out), 'bias': (out,)}`` (no ``'bias'`` without ``b_init``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_nn
    >>> layer = etp_nn.Linear(3, 5)
    >>> layer(jnp.ones((4, 3))).shape
    (4, 5)
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        out_size: int | tuple[int, ...],
        w_init: Initializer = init.KaimingNormal(),
        b_init: Initializer | None = init.ZeroInit(),
        w_mask: Initializer | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.in_size = in_size
        self.out_size = out_size
        n_in, n_out = self.in_size[-1], self.out_size[-1]
        self.w_mask = init.param(w_mask, (n_in, n_out))
        params = {"weight": init.param(w_init, (n_in, n_out), allow_none=False)}
        if b_init is not None:
            params["bias"] = init.param(b_init, (n_out,), allow_none=False)
        self.weight = brainstate.ParamState(params)

    def update(self, x: Any) -> Any:
        check_last_dim(self, x, self.in_size[-1])
        params = self.weight.value
        weight = params["weight"]
        if self.w_mask is not None:
            weight = weight * self.w_mask
        return etp.matmul(x, weight, params.get("bias"))
