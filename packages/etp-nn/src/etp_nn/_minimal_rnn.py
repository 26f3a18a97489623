r"""Minimal recurrent cells: MinimalRNN, minGRU and minLSTM (few gates, latent or input-only gating).

The life cycle and notation are those of :mod:`etp_nn._rnn`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._linear import Initializer, Linear
from ._rnn import _XAVIER_NORMAL, _ZEROS, Activation, Size, _RecurrentCell, _resolve_activation

__all__ = ["MinimalRNNCell", "MiniGRU", "MiniLSTM"]


class MinimalRNNCell(_RecurrentCell):
    r"""MinimalRNN: the input is mapped to a latent space, the state is a gated average of latents.

    .. math::

        z_t &= \phi\left(W_x x_t\right) \\
        u_t &= \sigma\left(W_u [z_t, h_{t-1}]\right) \\
        h_t &= u_t \odot h_{t-1} + (1 - u_t) \odot z_t

    with :math:`W_x` a :class:`~etp_nn.Linear` ``in -> out`` and :math:`W_u` a
    :class:`~etp_nn.Linear` ``2 out -> out``, both with bias (the paper's
    :math:`\sigma(U_h h_{t-1} + U_z z_t + b_u)` is :math:`W_u` on the
    concatenation). The output is :math:`h_t`.

    Reference: M. Chen, "MinimalRNN: toward more interpretable and trainable
    recurrent neural networks", arXiv:1711.06788, 2017.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Input and hidden feature sizes.
    w_init, b_init : initializer or array
        Weights (default Xavier normal) and biases (default zeros; ``None``
        for none) of :attr:`Wx` and :attr:`Wu`.
    state_init : initializer or array
        Initial :attr:`h` (default zeros).
    activation : str or callable
        :math:`\phi` of the latent map; default ``'tanh'``.
    name : str, optional

    Attributes
    ----------
    Wx : Linear
        ``in -> out`` (the latent map :math:`\Phi` before :math:`\phi`).
    Wu : Linear
        ``2 out -> out``, the update gate on :math:`[z_t, h_{t-1}]`.
    h : brainstate.HiddenState
        ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_nn
    >>> cell = etp_nn.MinimalRNNCell(3, 5)
    >>> _ = brainstate.nn.init_all_states(cell, batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 5)
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init: Initializer = _XAVIER_NORMAL,
        b_init: Initializer | None = _ZEROS,
        state_init: Initializer = _ZEROS,
        activation: Activation = "tanh",
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, out_size, name)
        self.state_initializer = state_init
        self.activation = _resolve_activation(self, activation)
        self.Wx = Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)
        self.Wu = Linear(2 * self.num_out, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x: Any) -> Any:
        """One step; ``x`` of shape ``(in,)`` or ``(batch, in)``; returns the new :math:`h`."""
        (h_state,) = self._states_for(x)
        h = h_state.value
        z = self.activation(self.Wx(x))
        gate = jax.nn.sigmoid(self.Wu(jnp.concatenate([z, h], axis=-1)))
        h = gate * h + (1.0 - gate) * z
        h_state.value = h
        return h


class MiniGRU(_RecurrentCell):
    r"""minGRU: a GRU whose gate and candidate depend on the input only.

    .. math::

        z_t &= \sigma\left(W_z x_t\right) \\
        \hat h_t &= \phi\left(W_h x_t\right) \\
        h_t &= (1 - z_t) \odot h_{t-1} + z_t \odot \hat h_t

    with :math:`W_z, W_h` two :class:`~etp_nn.Linear` ``in -> out`` with bias
    (the paper's :math:`\mathrm{Linear}_{d_h}`). :math:`\phi` is the identity
    by default, as in the paper; the output is :math:`h_t`. The recurrence is
    linear in :math:`h`, so it can also be evaluated with a parallel scan.

    Reference: L. Feng, F. Tung, M. O. Ahmed, Y. Bengio and H. Hajimirsadeghi,
    "Were RNNs all we needed?", arXiv:2410.01201, 2024.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Input and hidden feature sizes.
    w_init, b_init : initializer or array
        Weights ``(in, out)`` (default Xavier normal) and biases ``(out,)``
        (default zeros; ``None`` for none) of both sub-layers.
    state_init : initializer or array
        Initial :attr:`h` (default zeros).
    activation : str or callable
        :math:`\phi` on the candidate; default ``'identity'``.
    name : str, optional

    Attributes
    ----------
    Wz, Wh : Linear
        Update gate and candidate, each ``in -> out``.
    h : brainstate.HiddenState
        ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_nn
    >>> cell = etp_nn.MiniGRU(3, 5)
    >>> _ = brainstate.nn.init_all_states(cell, batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 5)
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init: Initializer = _XAVIER_NORMAL,
        b_init: Initializer | None = _ZEROS,
        state_init: Initializer = _ZEROS,
        activation: Activation = "identity",
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, out_size, name)
        self.state_initializer = state_init
        self.activation = _resolve_activation(self, activation)
        self.Wz = Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)
        self.Wh = Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x: Any) -> Any:
        """One step; ``x`` of shape ``(in,)`` or ``(batch, in)``; returns the new :math:`h`."""
        (h_state,) = self._states_for(x)
        z = jax.nn.sigmoid(self.Wz(x))
        candidate = self.activation(self.Wh(x))
        h = (1.0 - z) * h_state.value + z * candidate
        h_state.value = h
        return h


class MiniLSTM(_RecurrentCell):
    r"""minLSTM: input-only forget and input gates, normalised to sum to one.

    .. math::

        f_t &= \sigma\left(W_f x_t\right), \qquad i_t = \sigma\left(W_i x_t\right) \\
        \hat h_t &= \phi\left(W_h x_t\right) \\
        f'_t &= \frac{f_t}{f_t + i_t}, \qquad i'_t = \frac{i_t}{f_t + i_t} \\
        h_t &= f'_t \odot h_{t-1} + i'_t \odot \hat h_t

    with :math:`W_f, W_i, W_h` three :class:`~etp_nn.Linear` ``in -> out`` with
    bias. :math:`\phi` is the identity by default, as in the paper; the output
    is :math:`h_t`.

    Reference: L. Feng, F. Tung, M. O. Ahmed, Y. Bengio and H. Hajimirsadeghi,
    "Were RNNs all we needed?", arXiv:2410.01201, 2024.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Input and hidden feature sizes.
    w_init, b_init : initializer or array
        Weights ``(in, out)`` (default Xavier normal) and biases ``(out,)``
        (default zeros; ``None`` for none) of the three sub-layers.
    state_init : initializer or array
        Initial :attr:`h` (default zeros).
    activation : str or callable
        :math:`\phi` on the candidate; default ``'identity'``.
    name : str, optional

    Attributes
    ----------
    Wf, Wi, Wh : Linear
        Forget gate, input gate and candidate, each ``in -> out``.
    h : brainstate.HiddenState
        ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_nn
    >>> cell = etp_nn.MiniLSTM(3, 5)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> cell(jnp.ones(3)).shape
    (5,)
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init: Initializer = _XAVIER_NORMAL,
        b_init: Initializer | None = _ZEROS,
        state_init: Initializer = _ZEROS,
        activation: Activation = "identity",
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, out_size, name)
        self.state_initializer = state_init
        self.activation = _resolve_activation(self, activation)
        self.Wf = Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)
        self.Wi = Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)
        self.Wh = Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x: Any) -> Any:
        """One step; ``x`` of shape ``(in,)`` or ``(batch, in)``; returns the new :math:`h`."""
        (h_state,) = self._states_for(x)
        f = jax.nn.sigmoid(self.Wf(x))
        i = jax.nn.sigmoid(self.Wi(x))
        candidate = self.activation(self.Wh(x))
        total = f + i
        h = (f / total) * h_state.value + (i / total) * candidate
        h_state.value = h
        return h
