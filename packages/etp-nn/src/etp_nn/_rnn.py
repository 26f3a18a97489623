r"""Recurrent cells whose trainable weights flow through ETP primitives.

Every cell is a :class:`brainstate.nn.Module` (a :class:`brainstate.nn.RNNCell`)
with the same life cycle:

* ``__init__(in_size, out_size, ...)`` creates the trainable parameters: dense
  weights as :class:`etp_nn.Linear` sub-layers (through
  :func:`etp_primitives.matmul`) and element-wise weights as
  :class:`brainstate.ParamState` read through :func:`etp_primitives.element_wise`;
* ``init_state(batch_size=None)`` creates the recurrent state(s), each a
  :class:`brainstate.HiddenState` of shape ``(out,)`` or ``(batch_size, out)``
  (normally called through :func:`brainstate.nn.init_all_states`);
* ``reset_state(batch_size=None)`` puts the initial values back;
* ``update(x)`` (or calling the cell) advances one time step for an input of
  shape ``(in,)`` or ``(batch_size, in)`` and returns the output.

Notation: :math:`[a, b]` is concatenation on the feature axis, :math:`W[a, b]`
an :class:`~etp_nn.Linear` sub-layer applied to it (weight and bias),
:math:`\sigma` the logistic sigmoid, :math:`\odot` the element-wise product and
:math:`\phi` the cell's ``activation``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import brainstate
import jax
import jax.numpy as jnp
from brainstate.nn import init

import etp_primitives as etp

from ._linear import Initializer, Linear
from ._utils import check_batch_size, check_last_dim, layer_name, require_state

__all__ = [
    "ValinaRNNCell",
    "VanillaRNNCell",
    "GRUCell",
    "LSTMCell",
    "MGUCell",
    "MinimalRNNCell",
    "URLSTMCell",
    "MiniGRU",
    "MiniLSTM",
    "LRUCell",
]

Activation = str | Callable[[Any], Any]
Size = int | tuple[int, ...]

# Shared default initializers (module level, so no call sits in an argument default).
_XAVIER_NORMAL = init.XavierNormal()
_ZEROS = init.ZeroInit()


def _features(size: Any) -> int:
    """Number of features of a brainstate ``in_size``/``out_size`` (its last entry)."""
    return int(tuple(size)[-1])


def _resolve_activation(layer: brainstate.nn.Module, activation: Activation) -> Callable[[Any], Any]:
    """A callable, or the function of that name in :mod:`jax.nn` (e.g. ``'tanh'``, ``'relu'``, ``'identity'``)."""
    if isinstance(activation, str):
        fn = getattr(jax.nn, activation, None)
        if activation.startswith("_") or not callable(fn):
            raise ValueError(
                f"{layer_name(layer)}: activation must be a callable or the name of a function in jax.nn "
                f"(e.g. 'tanh', 'relu', 'sigmoid', 'identity'); got {activation!r}."
            )
        return fn  # type: ignore[no-any-return]
    if not callable(activation):
        raise TypeError(
            f"{layer_name(layer)}: activation must be a callable or the name of a function in jax.nn; "
            f"got {type(activation).__name__}."
        )
    return activation


class _RecurrentCell(brainstate.nn.RNNCell):
    """Shared state handling: states named in ``_state_names``, each ``(out,)`` or ``(batch, out)``."""

    _state_names: ClassVar[tuple[str, ...]] = ("h",)
    state_initializer: Initializer

    def __init__(self, in_size: Size, out_size: Size, name: str | None) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        self.in_size = in_size
        self.out_size = out_size

    @property
    def num_in(self) -> int:
        """Number of input features."""
        return _features(self.in_size)

    @property
    def num_out(self) -> int:
        """Number of hidden features (the size of each state)."""
        return _features(self.out_size)

    def _initial_value(self, batch_size: int | None) -> Any:
        return init.param(self.state_initializer, (self.num_out,), batch_size, allow_none=False, allow_scalar=False)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Create the hidden state(s), shape ``(out,)`` or ``(batch_size, out)``, from ``state_init``."""
        for state_name in self._state_names:
            setattr(self, state_name, brainstate.HiddenState(self._initial_value(batch_size)))

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Set the hidden state(s) back to ``state_init``, shape ``(out,)`` or ``(batch_size, out)``."""
        for state_name in self._state_names:
            require_state(self, state_name).value = self._initial_value(batch_size)

    def _states_for(self, x: Any) -> list[brainstate.State[Any]]:
        """Check ``x`` against the cell and return its states in ``_state_names`` order."""
        check_last_dim(self, x, self.num_in)
        states = [require_state(self, state_name) for state_name in self._state_names]
        check_batch_size(self, x, states[0])
        return states


class ValinaRNNCell(_RecurrentCell):
    r"""Vanilla (Elman) recurrent cell.

    .. math::

        h_t = \phi\left(W [x_t, h_{t-1}]\right)

    where :math:`W` is one :class:`~etp_nn.Linear` of shape ``(in + out, out)``
    with bias. The output is :math:`h_t`. (The class name keeps the historical
    spelling of the brainstate API; :data:`VanillaRNNCell` is an alias.)

    Reference: J. L. Elman, "Finding structure in time", *Cognitive Science*
    14(2):179-211, 1990.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Input and hidden feature sizes (the last entry counts).
    w_init, b_init : initializer or array
        Weight ``(in + out, out)`` (default Xavier normal) and bias ``(out,)``
        (default zeros; ``None`` for no bias) of :attr:`W`.
    state_init : initializer or array
        Initial value of :attr:`h` (default zeros).
    activation : str or callable
        :math:`\phi`; a callable or the name of a :mod:`jax.nn` function.
        Default ``'relu'`` (as in brainstate); pass ``'tanh'`` for Elman's cell.
    name : str, optional

    Attributes
    ----------
    W : Linear
        ``(in + out) -> out``.
    h : brainstate.HiddenState
        ``(out,)`` or ``(batch, out)``, after :func:`brainstate.nn.init_all_states`.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_nn
    >>> cell = etp_nn.ValinaRNNCell(3, 5)
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
        activation: Activation = "relu",
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, out_size, name)
        self.state_initializer = state_init
        self.activation = _resolve_activation(self, activation)
        self.W = Linear(self.num_in + self.num_out, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x: Any) -> Any:
        """One step; ``x`` of shape ``(in,)`` or ``(batch, in)``; returns the new :math:`h`."""
        (h_state,) = self._states_for(x)
        h = self.activation(self.W(jnp.concatenate([x, h_state.value], axis=-1)))
        h_state.value = h
        return h


#: Correctly spelled alias of :class:`ValinaRNNCell`.
VanillaRNNCell = ValinaRNNCell


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


def _lru_magnitude(nu_log: Any) -> Any:
    return jnp.exp(-jnp.exp(nu_log))


class LRUCell(_RecurrentCell):
    r"""Linear recurrent unit: a diagonal complex linear recurrence with a real read-out.

    In complex form, with :math:`N` = ``out`` state features and :math:`H` =
    ``in`` input features,

    .. math::

        \lambda &= \exp\left(-e^{\nu} + i\, e^{\theta}\right) \in \mathbb C^N,
            \qquad \gamma = e^{\gamma_{\log}} \\
        h_t &= \lambda \odot h_{t-1} + \gamma \odot (B x_t) \\
        y_t &= \operatorname{Re}(C h_t) + D \odot x_t

    with :math:`B = B_{re} + i B_{im}` (``in -> out``),
    :math:`C = C_{re} + i C_{im}` (``out -> in``) and :math:`D \in \mathbb R^H`.
    The state is kept as two real :class:`brainstate.HiddenState`\ s
    :math:`h^{re}, h^{im}`, and the cell computes, in real arithmetic,

    .. math::

        m &= \exp(-e^{\nu}), \quad \omega = e^{\theta}, \quad
            \lambda^{re} = m \cos\omega, \quad \lambda^{im} = m \sin\omega \\
        h^{re}_t &= \lambda^{re} \odot h^{re}_{t-1} - \lambda^{im} \odot h^{im}_{t-1}
            + \gamma \odot B_{re}(x_t) \\
        h^{im}_t &= \lambda^{im} \odot h^{re}_{t-1} + \lambda^{re} \odot h^{im}_{t-1}
            + \gamma \odot B_{im}(x_t) \\
        y_t &= C_{re}(h^{re}_t) - C_{im}(h^{im}_t) + D \odot x_t

    where :math:`B_{re}, B_{im}, C_{re}, C_{im}` are :class:`~etp_nn.Linear`
    sub-layers (row-vector convention, ``x @ weight``) and :math:`\nu, \theta,
    \gamma_{\log}, D` are element-wise parameters read through
    :func:`etp_primitives.element_wise` (:math:`m`, :math:`\omega`,
    :math:`\gamma` and :math:`D` are the marked values). As in the paper, the
    output has the **input's** size :math:`H` (the LRU maps the model width
    to itself through an :math:`N`-dimensional state), so ``update`` returns
    ``(..., in)`` while the states are ``(..., out)``.

    Initialisation (the paper's): :math:`|\lambda|` uniform on the ring
    :math:`r_{min} \le |\lambda| \le r_{max}`, i.e.
    :math:`\nu = \log(-\tfrac12 \log(U (r_{max}^2 - r_{min}^2) + r_{min}^2))`,
    :math:`\theta = \log(\omega_{max} U')` with :math:`U, U' \sim \mathcal U[0, 1)`;
    :math:`\gamma_{\log} = \log\sqrt{1 - |\lambda|^2}` (normalisation,
    trainable afterwards); :math:`B_{re}, B_{im} \sim \mathcal N(0, 1/(2H))`,
    :math:`C_{re}, C_{im} \sim \mathcal N(0, 1/N)`, :math:`D \sim \mathcal N(0, 1)`.
    The recurrence is linear; there is no activation.

    Reference: A. Orvieto, S. L. Smith, A. Gu, A. Fernando, C. Gulcehre,
    R. Pascanu and S. De, "Resurrecting recurrent neural networks for long
    sequences", ICML 2023 (arXiv:2303.06349).

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Input (and output) size :math:`H`; state size :math:`N`.
    r_min, r_max : float
        Ring of the initial eigenvalue magnitudes, ``0 <= r_min < r_max <= 1``.
    max_phase : float
        Largest initial eigenvalue phase :math:`\omega_{max}` (default :math:`2\pi`).
    w_init : initializer, array or None
        Weights of :attr:`B_re`, :attr:`B_im`, :attr:`C_re`, :attr:`C_im`;
        ``None`` (default) for the scaled normals above.
    b_init : initializer, array or None
        Biases of :attr:`B_re`, :attr:`B_im` (``(out,)``) and :attr:`C_re`
        (``(in,)``); default ``None`` (no biases, as in the paper). :attr:`C_im`
        never has one (it would duplicate :attr:`C_re`'s).
    state_init : initializer or array
        Initial :attr:`h_re` and :attr:`h_im` (default zeros).
    name : str, optional

    Attributes
    ----------
    nu_log, theta_log, gamma_log : brainstate.ParamState
        :math:`\nu, \theta, \gamma_{\log}`, each ``(out,)``.
    B_re, B_im : Linear
        ``in -> out``.
    C_re, C_im : Linear
        ``out -> in``.
    D : brainstate.ParamState
        ``(in,)``.
    h_re, h_im : brainstate.HiddenState
        Real and imaginary parts of :math:`h`, ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_nn
    >>> cell = etp_nn.LRUCell(3, 8)
    >>> _ = brainstate.nn.init_all_states(cell, batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 3)
    """

    _state_names = ("h_re", "h_im")

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 2.0 * math.pi,
        w_init: Initializer | None = None,
        b_init: Initializer | None = None,
        state_init: Initializer = _ZEROS,
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, out_size, name)
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(
                f"{layer_name(self)}: r_min and r_max must satisfy 0 <= r_min < r_max <= 1; "
                f"got r_min={r_min!r}, r_max={r_max!r}."
            )
        if not max_phase > 0.0:
            raise ValueError(f"{layer_name(self)}: max_phase must be positive; got {max_phase!r}.")
        self.state_initializer = state_init
        self.r_min = r_min
        self.r_max = r_max
        self.max_phase = max_phase
        n_in, n_out = self.num_in, self.num_out
        dtype = brainstate.environ.dftype()

        radius_sq = brainstate.random.uniform(size=(n_out,), dtype=dtype) * (r_max**2 - r_min**2) + r_min**2
        nu_log = jnp.log(-0.5 * jnp.log(radius_sq))
        theta_log = jnp.log(max_phase * brainstate.random.uniform(size=(n_out,), dtype=dtype))
        gamma_log = 0.5 * jnp.log1p(-(_lru_magnitude(nu_log) ** 2))
        self.nu_log = brainstate.ParamState(nu_log)
        self.theta_log = brainstate.ParamState(theta_log)
        self.gamma_log = brainstate.ParamState(gamma_log)

        b_w = init.Normal(scale=1.0 / math.sqrt(2.0 * n_in)) if w_init is None else w_init
        c_w = init.Normal(scale=1.0 / math.sqrt(n_out)) if w_init is None else w_init
        self.B_re = Linear(n_in, n_out, w_init=b_w, b_init=b_init)
        self.B_im = Linear(n_in, n_out, w_init=b_w, b_init=b_init)
        self.C_re = Linear(n_out, n_in, w_init=c_w, b_init=b_init)
        self.C_im = Linear(n_out, n_in, w_init=c_w, b_init=None)
        self.D = brainstate.ParamState(init.param(init.Normal(), (n_in,), allow_none=False))

    def update(self, x: Any) -> Any:
        """One step; ``x`` of shape ``(in,)`` or ``(batch, in)``; returns :math:`y_t`, ``(in,)`` or ``(batch, in)``."""
        re_state, im_state = self._states_for(x)
        magnitude = etp.element_wise(self.nu_log.value, _lru_magnitude)
        phase = etp.element_wise(self.theta_log.value, jnp.exp)
        gamma = etp.element_wise(self.gamma_log.value, jnp.exp)
        lam_re = magnitude * jnp.cos(phase)
        lam_im = magnitude * jnp.sin(phase)
        h_re, h_im = re_state.value, im_state.value
        new_re = lam_re * h_re - lam_im * h_im + gamma * self.B_re(x)
        new_im = lam_im * h_re + lam_re * h_im + gamma * self.B_im(x)
        re_state.value = new_re
        im_state.value = new_im
        return self.C_re(new_re) - self.C_im(new_im) + etp.element_wise(self.D.value) * x
