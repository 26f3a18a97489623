"""GroupedLinear: a block-diagonal dense layer through :func:`etp_primitives.grouped_matmul`."""

from __future__ import annotations

from typing import Any

import brainstate

import etp_primitives as etp

from ._linear import KAIMING_NORMAL, ZEROS, Initializer, _init_param, _positive_int
from ._utils import check_last_dim, layer_name

__all__ = ["GroupedLinear"]


class GroupedLinear(brainstate.nn.Module):
    r"""Grouped dense layer :math:`y = x\, \mathrm{blockdiag}(W_1, \ldots, W_G) + b`.

    The ``in_features`` inputs are split into ``num_groups`` consecutive
    blocks of :math:`I_g = I / G`; block :math:`g` is multiplied by its own
    :math:`W_g \in \mathbb{R}^{I_g \times O_g}` and the results are
    concatenated into ``out_features`` outputs (:math:`O_g = O / G`), through
    :func:`etp_primitives.grouped_matmul` (``etp_grouped_mm``, or
    ``etp_grouped_mv`` for one sample). :math:`G` times fewer weights, and a
    :math:`G` times smaller D-RTRL trace, than a :class:`Linear` of the same size.

    Parameters
    ----------
    num_groups : int
        :math:`G`; divides ``in_features`` and ``out_features``.
    in_features, out_features : int
        :math:`I` and :math:`O`, the totals over the groups.
    w_init : initializer or array
        :math:`W` ``(G, I_g, O_g)``; default Kaiming normal (fan-in :math:`I_g`).
    b_init : initializer, array or None
        Bias ``(O,)``; ``None`` for no bias. Default zeros.
    name : str, optional
    param_type : type
        The :class:`brainstate.ParamState` subclass that holds the weights.

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (G, I_g, O_g), 'bias': (O,)}`` (no ``'bias'`` without ``b_init``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_nn
    >>> layer = etp_nn.GroupedLinear(2, 6, 4)
    >>> layer.weight.value["weight"].shape, layer(jnp.ones((3, 6))).shape
    ((2, 3, 2), (3, 4))
    """

    def __init__(
        self,
        num_groups: int,
        in_features: int,
        out_features: int,
        w_init: Initializer = KAIMING_NORMAL,
        b_init: Initializer | None = ZEROS,
        name: str | None = None,
        param_type: type[brainstate.ParamState] = brainstate.ParamState,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]  # brainstate hides Module.__init__ from type checkers
        groups = _positive_int(self, num_groups, "num_groups")
        n_in = _positive_int(self, in_features, "in_features")
        n_out = _positive_int(self, out_features, "out_features")
        for value, argument in ((n_in, "in_features"), (n_out, "out_features")):
            if value % groups:
                raise ValueError(
                    f"{layer_name(self)}: {argument}={value} is not divisible by num_groups={groups}; every group "
                    "gets the same number of features."
                )
        if not (isinstance(param_type, type) and issubclass(param_type, brainstate.ParamState)):
            raise TypeError(
                f"{layer_name(self)}: param_type must be brainstate.ParamState or a subclass of it; got {param_type!r}."
            )
        self.num_groups, self.in_features, self.out_features = groups, n_in, n_out
        self.in_size, self.out_size = (n_in,), (n_out,)
        params = {"weight": _init_param(self, w_init, (groups, n_in // groups, n_out // groups), "w_init")}
        if b_init is not None:
            params["bias"] = _init_param(self, b_init, (n_out,), "b_init")
        self.weight = param_type(params)

    def update(self, x: Any) -> Any:
        check_last_dim(self, x, self.in_features)
        params: dict[str, Any] = self.weight.value
        return etp.grouped_matmul(x, params["weight"], params.get("bias"))
