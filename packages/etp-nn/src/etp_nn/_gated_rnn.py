r"""Gated recurrent cells: GRU, LSTM, MGU and UR-LSTM (gates on the input and the previous state).

The life cycle and notation are those of :mod:`etp_nn._rnn`.
"""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
from brainstate.nn import init

import etp_primitives as etp

from ._linear import Initializer, Linear
from ._rnn import _XAVIER_NORMAL, _ZEROS, Activation, Size, _RecurrentCell, _resolve_activation

__all__ = ["GRUCell", "LSTMCell", "MGUCell", "URLSTMCell"]


class GRUCell(_RecurrentCell):
    r"""Gated recurrent unit.

    .. math::

        z_t &= \sigma\left(W_z [x_t, h_{t-1}]\right) \\
        r_t &= \sigma\left(W_r [x_t, h_{t-1}]\right) \\
        \hat h_t &= \phi\left(W_h [x_t, r_t \odot h_{t-1}]\right) \\
        h_t &= (1 - z_t) \odot h_{t-1} + z_t \odot \hat h_t

    with :math:`W_z, W_r, W_h` three :class:`~etp_nn.Linear` of shape
    ``(in + out, out)`` with biases. The output is :math:`h_t`. (:math:`z_t`
    weights the candidate, the convention of Chung et al. 2014; Cho et al.
    write the same cell with :math:`z` and :math:`1 - z` swapped.)

    Reference: K. Cho et al., "Learning phrase representations using RNN
    encoder-decoder for statistical machine translation", EMNLP 2014.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Input and hidden feature sizes.
    w_init, b_init : initializer or array
        Weights ``(in + out, out)`` (default Xavier normal) and biases
        ``(out,)`` (default zeros; ``None`` for none) of the three sub-layers.
    state_init : initializer or array
        Initial :attr:`h` (default zeros).
    activation : str or callable
        :math:`\phi` for the candidate; default ``'tanh'``.
    name : str, optional

    Attributes
    ----------
    Wz, Wr, Wh : Linear
        Update gate, reset gate and candidate, each ``(in + out) -> out``.
    h : brainstate.HiddenState
        ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_nn
    >>> cell = etp_nn.GRUCell(3, 5)
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
        activation: Activation = "tanh",
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, out_size, name)
        self.state_initializer = state_init
        self.activation = _resolve_activation(self, activation)
        n_in, n_out = self.num_in, self.num_out
        self.Wz = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)
        self.Wr = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)
        self.Wh = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)

    def update(self, x: Any) -> Any:
        """One step; ``x`` of shape ``(in,)`` or ``(batch, in)``; returns the new :math:`h`."""
        (h_state,) = self._states_for(x)
        h = h_state.value
        xh = jnp.concatenate([x, h], axis=-1)
        z = jax.nn.sigmoid(self.Wz(xh))
        r = jax.nn.sigmoid(self.Wr(xh))
        candidate = self.activation(self.Wh(jnp.concatenate([x, r * h], axis=-1)))
        h = (1.0 - z) * h + z * candidate
        h_state.value = h
        return h


class LSTMCell(_RecurrentCell):
    r"""Long short-term memory cell (with forget gate).

    .. math::

        i_t &= \sigma\left(W_i [x_t, h_{t-1}]\right), \qquad
            f_t = \sigma\left(W_f [x_t, h_{t-1}]\right) \\
        g_t &= \phi\left(W_g [x_t, h_{t-1}]\right), \qquad
            o_t = \sigma\left(W_o [x_t, h_{t-1}]\right) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t &= o_t \odot \phi(c_t)

    with :math:`W_i, W_f, W_g, W_o` four :class:`~etp_nn.Linear` of shape
    ``(in + out, out)`` with biases; the output is :math:`h_t`.

    The gates are four separate sub-layers rather than one fused
    ``(in + out) -> 4 out`` layer split into blocks, for online learning: an
    online-learning compiler relates an ETP op's output to a hidden state
    position-wise (output unit :math:`k` feeds hidden unit :math:`k`) only
    when the two shapes are broadcast-compatible. Each gate's ``(..., out)``
    output maps unit by unit onto :math:`h` and :math:`c`, so each gate's
    weight gets an exact per-unit eligibility trace; a fused ``(..., 4 out)``
    output sliced into gates is not position-wise related to the states, and
    the whole weight would be left out of online learning. The cell computes
    the same function as the fused form (the fused weight is the
    concatenation of the four on the output axis); only the default Xavier
    initialisation is scaled for a fan-out of ``out`` rather than ``4 out``.

    References: S. Hochreiter and J. Schmidhuber, "Long short-term memory",
    *Neural Computation* 9(8):1735-1780, 1997; F. A. Gers, J. Schmidhuber and
    F. Cummins, "Learning to forget: continual prediction with LSTM",
    *Neural Computation* 12(10):2451-2471, 2000.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Input and hidden feature sizes.
    w_init, b_init : initializer or array
        Weights ``(in + out, out)`` (default Xavier normal) and biases
        ``(out,)`` (default zeros; ``None`` for none) of each of the four
        sub-layers.
    state_init : initializer or array
        Initial :attr:`h` and :attr:`c` (default zeros).
    activation : str or callable
        :math:`\phi`; default ``'tanh'``.
    name : str, optional

    Attributes
    ----------
    Wi, Wf, Wg, Wo : Linear
        Input gate, forget gate, cell candidate and output gate, each
        ``(in + out) -> out``.
    h, c : brainstate.HiddenState
        Hidden and cell state, ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_nn
    >>> cell = etp_nn.LSTMCell(3, 5)
    >>> _ = brainstate.nn.init_all_states(cell, batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 5)
    """

    _state_names = ("h", "c")

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
        n_in, n_out = self.num_in, self.num_out
        self.Wi = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)
        self.Wf = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)
        self.Wg = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)
        self.Wo = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)

    def update(self, x: Any) -> Any:
        """One step; ``x`` of shape ``(in,)`` or ``(batch, in)``; returns the new :math:`h`."""
        h_state, c_state = self._states_for(x)
        xh = jnp.concatenate([x, h_state.value], axis=-1)
        i = jax.nn.sigmoid(self.Wi(xh))
        f = jax.nn.sigmoid(self.Wf(xh))
        g = self.activation(self.Wg(xh))
        o = jax.nn.sigmoid(self.Wo(xh))
        c = f * c_state.value + i * g
        h = o * self.activation(c)
        c_state.value = c
        h_state.value = h
        return h


class MGUCell(_RecurrentCell):
    r"""Minimal gated unit: a GRU whose single forget gate also resets.

    .. math::

        f_t &= \sigma\left(W_f [x_t, h_{t-1}]\right) \\
        \hat h_t &= \phi\left(W_h [x_t, f_t \odot h_{t-1}]\right) \\
        h_t &= (1 - f_t) \odot h_{t-1} + f_t \odot \hat h_t

    with :math:`W_f, W_h` two :class:`~etp_nn.Linear` of shape
    ``(in + out, out)`` with biases; the output is :math:`h_t`.

    Reference: G.-B. Zhou, J. Wu, C.-L. Zhang and Z.-H. Zhou, "Minimal gated
    unit for recurrent neural networks", *International Journal of Automation
    and Computing* 13(3):226-234, 2016.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Input and hidden feature sizes.
    w_init, b_init : initializer or array
        Weights ``(in + out, out)`` (default Xavier normal) and biases
        ``(out,)`` (default zeros; ``None`` for none) of both sub-layers.
    state_init : initializer or array
        Initial :attr:`h` (default zeros).
    activation : str or callable
        :math:`\phi`; default ``'tanh'``.
    name : str, optional

    Attributes
    ----------
    Wf, Wh : Linear
        Forget gate and candidate, each ``(in + out) -> out``.
    h : brainstate.HiddenState
        ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_nn
    >>> cell = etp_nn.MGUCell(3, 5)
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
        activation: Activation = "tanh",
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, out_size, name)
        self.state_initializer = state_init
        self.activation = _resolve_activation(self, activation)
        n_in, n_out = self.num_in, self.num_out
        self.Wf = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)
        self.Wh = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)

    def update(self, x: Any) -> Any:
        """One step; ``x`` of shape ``(in,)`` or ``(batch, in)``; returns the new :math:`h`."""
        (h_state,) = self._states_for(x)
        h = h_state.value
        f = jax.nn.sigmoid(self.Wf(jnp.concatenate([x, h], axis=-1)))
        candidate = self.activation(self.Wh(jnp.concatenate([x, f * h], axis=-1)))
        h = (1.0 - f) * h + f * candidate
        h_state.value = h
        return h


def _uniform_gate_bias(shape: Any, **kwargs: Any) -> Any:
    r"""Uniform gate initialisation: :math:`b = \sigma^{-1}(U)`, :math:`U \sim \mathcal U[1/d, 1 - 1/d]`, ``d = shape[-1]``.

    For ``d <= 2`` the interval is empty or the single point 1/2, and the bias is 0.
    """
    shape = tuple(init.to_size(shape) or ())
    dtype = kwargs.get("dtype", brainstate.environ.dftype())
    d = shape[-1]
    if d <= 2:
        return jnp.zeros(shape, dtype=dtype)
    p = brainstate.random.uniform(1.0 / d, 1.0 - 1.0 / d, size=shape, dtype=dtype)
    return jnp.log(p) - jnp.log1p(-p)


class URLSTMCell(_RecurrentCell):
    r"""UR-LSTM: LSTM with a refine gate and uniformly initialised forget-gate bias.

    Four :class:`~etp_nn.Linear` :math:`W_f, W_r, W_u, W_o` of shape
    ``(in + out, out)`` give the pre-activations of the forget, refine, update
    (input) and output gates; a trainable forget bias :math:`b_f` (``(out,)``,
    read through :func:`etp_primitives.element_wise`) is added to the forget
    pre-activation and subtracted from the refine one, as in the paper:

    .. math::

        \tilde f_t &= W_f [x_t, h_{t-1}], \quad \tilde r_t = W_r [x_t, h_{t-1}], \quad
            \tilde u_t = W_u [x_t, h_{t-1}], \quad \tilde o_t = W_o [x_t, h_{t-1}] \\
        f_t &= \sigma(\tilde f_t + b_f), \qquad r_t = \sigma(\tilde r_t - b_f) \\
        g_t &= r_t \odot \left(1 - (1 - f_t)^2\right) + (1 - r_t) \odot f_t^2
             = 2 r_t \odot f_t + (1 - 2 r_t) \odot f_t^2 \\
        c_t &= g_t \odot c_{t-1} + (1 - g_t) \odot \phi(\tilde u_t) \\
        h_t &= \sigma(\tilde o_t) \odot \phi(c_t)

    The output is :math:`h_t`. :math:`b_f` starts from the paper's uniform gate
    initialisation, :math:`b_f = \sigma^{-1}(U)` with
    :math:`U \sim \mathcal U[1/\mathrm{out}, 1 - 1/\mathrm{out}]` (0 when
    ``out <= 2``), which spreads the forget gates' characteristic time scales.
    The biases of the sub-layers (``b_init``) add separate, untied offsets to
    each gate.

    The gates are separate sub-layers rather than one fused
    ``(in + out) -> 4 out`` layer split into blocks, for the same reason as in
    :class:`LSTMCell`: each gate's ``(..., out)`` output maps position-wise
    (unit :math:`k` to unit :math:`k`) onto the hidden states, so each gate's
    weight gets an exact per-unit eligibility trace in online learning; a
    fused ``(..., 4 out)`` output sliced into gates would not, and the whole
    weight would be left out.

    Reference: A. Gu, C. Gulcehre, T. Paine, M. Hoffman and R. Pascanu,
    "Improving the gating mechanism of recurrent neural networks", ICML 2020
    (arXiv:1910.09890).

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Input and hidden feature sizes.
    w_init, b_init : initializer or array
        Weights ``(in + out, out)`` (default Xavier normal) and biases
        ``(out,)`` (default zeros; ``None`` for none) of each of the four
        sub-layers.
    forget_bias_init : initializer, array or None
        Initial :math:`b_f` ``(out,)``; ``None`` (default) for the uniform gate
        initialisation above.
    state_init : initializer or array
        Initial :attr:`h` and :attr:`c` (default zeros).
    activation : str or callable
        :math:`\phi`; default ``'tanh'``.
    name : str, optional

    Attributes
    ----------
    Wf, Wr, Wu, Wo : Linear
        Forget, refine, update and output gate pre-activations, each
        ``(in + out) -> out``.
    forget_bias : brainstate.ParamState
        :math:`b_f`, ``(out,)``.
    h, c : brainstate.HiddenState
        Hidden and cell state, ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_nn
    >>> cell = etp_nn.URLSTMCell(3, 5)
    >>> _ = brainstate.nn.init_all_states(cell, batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 5)
    """

    _state_names = ("h", "c")

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init: Initializer = _XAVIER_NORMAL,
        b_init: Initializer | None = _ZEROS,
        forget_bias_init: Initializer | None = None,
        state_init: Initializer = _ZEROS,
        activation: Activation = "tanh",
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, out_size, name)
        self.state_initializer = state_init
        self.activation = _resolve_activation(self, activation)
        n_in, n_out = self.num_in, self.num_out
        self.Wf = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)
        self.Wr = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)
        self.Wu = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)
        self.Wo = Linear(n_in + n_out, n_out, w_init=w_init, b_init=b_init)
        bias_init = _uniform_gate_bias if forget_bias_init is None else forget_bias_init
        self.forget_bias = brainstate.ParamState(init.param(bias_init, (n_out,), allow_none=False))

    def update(self, x: Any) -> Any:
        """One step; ``x`` of shape ``(in,)`` or ``(batch, in)``; returns the new :math:`h`."""
        h_state, c_state = self._states_for(x)
        xh = jnp.concatenate([x, h_state.value], axis=-1)
        f_pre, r_pre, u_pre, o_pre = self.Wf(xh), self.Wr(xh), self.Wu(xh), self.Wo(xh)
        b_f = etp.element_wise(self.forget_bias.value)
        f = jax.nn.sigmoid(f_pre + b_f)
        r = jax.nn.sigmoid(r_pre - b_f)
        g = r * (1.0 - (1.0 - f) ** 2) + (1.0 - r) * f**2
        c = g * c_state.value + (1.0 - g) * self.activation(u_pre)
        h = jax.nn.sigmoid(o_pre) * self.activation(c)
        c_state.value = c
        h_state.value = h
        return h
