r"""The recurrent cells' shared life cycle, and the vanilla (Elman) cell.

The cells' trainable weights flow through ETP primitives; the gated cells are
in :mod:`etp_nn._gated_rnn`, the minimal ones in :mod:`etp_nn._minimal_rnn`
and the LRU in :mod:`etp_nn._lru`, all built on ``_RecurrentCell`` here.
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

from collections.abc import Callable
from typing import Any, ClassVar

import brainstate
import jax
import jax.numpy as jnp
from brainstate.nn import init

from ._linear import Initializer, Linear
from ._utils import check_batch_size, check_last_dim, layer_name, require_state

__all__ = ["VanillaRNNCell", "ValinaRNNCell"]

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


class VanillaRNNCell(_RecurrentCell):
    r"""Vanilla (Elman) recurrent cell.

    .. math::

        h_t = \phi\left(W [x_t, h_{t-1}]\right)

    where :math:`W` is one :class:`~etp_nn.Linear` of shape ``(in + out, out)``
    with bias. The output is :math:`h_t`. :data:`ValinaRNNCell` (the historical
    spelling of the brainstate and braintrace APIs) is an alias of this class.

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
    >>> cell = etp_nn.VanillaRNNCell(3, 5)
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


#: The historical spelling (brainstate, braintrace <= 0.2.8) of :class:`VanillaRNNCell`: the same class.
ValinaRNNCell = VanillaRNNCell
