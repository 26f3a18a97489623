r"""Spiking neurons (IF, LIF, ALIF) with unit-aware, element-wise dynamics.

Every layer here is a population of independent units: one step maps each
unit's state and its own input to its new state, with no coupling between
units. The weights that produce the input live outside (e.g. in
:class:`etp_nn.Linear`), so an online-learning compiler sees the neuron's
:class:`brainstate.HiddenState` (s) fed by ETP weight primitives through
purely element-wise dynamics. The neuron constants (thresholds, time
constants) are fixed, not trained.

Conventions shared by :class:`IF`, :class:`LIF` and :class:`ALIF`
-------------------------------------------------------------------
* **Units.** Potentials are ``saiunit`` quantities; the state ``V`` is kept in
  the unit of ``V_th`` (default mV) and the input ``x`` of :meth:`update` must
  be a voltage (it is converted to that unit; a plain array or another
  dimension raises ``ValueError``). Time constants are times; the step
  :math:`\Delta t` is ``brainstate.environ.get_dt()``, e.g. inside
  ``brainstate.environ.context(dt=1.0 * u.ms)``.
* **Input.** ``x`` is the already-weighted synaptic drive, in volts: the
  potential a constant input would clamp a leaky neuron at, above rest.
* **Dtype.** States are created in the environment's float dtype
  (``brainstate.environ.dftype()``) and keep it: each step's new value is cast
  back, so loops (``for_loop``/``scan``) have stable carries even when ``x``
  has a wider dtype. The returned spikes follow ordinary type promotion.
* **Order of one step.** integrate (forward Euler), then spike, then reset:
  a unit spikes at exactly the step at which its integrated potential exceeds
  the threshold, and the reset is applied in that same step.
* **Spike.** :math:`s = f\bigl((V - \theta)/(V_{th} - V_{reset})\bigr)` with
  the surrogate ``spk_fun`` :math:`f` (Heaviside forward, default
  :class:`etp_nn.SigmoidSurrogate`); :math:`s \in \{0, 1\}` as floats.
* **Reset** (``spk_reset``): ``'soft'`` subtracts the threshold gap,
  :math:`V \leftarrow V - (\theta - V_{reset})\,\mathrm{sg}(s)`, keeping the
  overshoot; ``'hard'`` sets the potential to :math:`V_{reset}`,
  :math:`V \leftarrow V - (V - V_{reset})\,\mathrm{sg}(s)`. Here
  :math:`\mathrm{sg}` is ``jax.lax.stop_gradient``: **the spike in the reset
  term is detached**, so gradients flow through the spike output and through
  :math:`V` but not through the reset's dependence on the spike (the usual
  choice for online learning: the reset adds no surrogate-derivative term to
  :math:`\partial V_{t+1} / \partial V_t`, which stays the leak factor for
  ``'soft'`` and :math:`(1 - s)` times it for ``'hard'``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import brainstate
import jax
import numpy as np
import saiunit as u

from ._surrogate import SigmoidSurrogate
from ._units import (
    _FIVE_MS,
    _HUNDRED_MS,
    _ONE_MV,
    _TENTH_MV,
    _TIME,
    _VOLT,
    _ZERO_MV,
    _ZEROS,
    _ZEROS_MV,
    Initializer,
    QuantityLike,
    _check_features,
    _check_param_shape,
    _check_positive,
    _decay,
    _initial_value,
    _quantity_like,
    _size_tuple,
    _store,
    _time_step,
    _unit_text,
)
from ._utils import check_batch_size, layer_name, require_state, reset_hidden

__all__ = ["IF", "LIF", "ALIF"]

SpikeFunction = Callable[[Any], Any]
ResetMode = Literal["soft", "hard"]

_SIGMOID_SURROGATE = SigmoidSurrogate()


# --------------------------------------------------------------------------- spiking base


class _SpikingNeuron(brainstate.nn.Module):
    """Shared parameter handling, state creation, input checks, spike and reset of IF/LIF/ALIF."""

    def __init__(
        self,
        varshape: tuple[int, ...],
        V_th: QuantityLike,
        V_reset: QuantityLike,
        V_rest: QuantityLike,
        tau: QuantityLike,
        V_initializer: Initializer,
        spk_fun: SpikeFunction,
        spk_reset: ResetMode,
        name: str | None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]  # brainstate hides Module.__init__ from type checkers
        self.varshape: tuple[int, ...] = varshape
        self.in_size = varshape
        self.out_size = varshape
        self.unit: u.Unit = _VOLT
        if isinstance(V_th, u.Quantity) and u.get_dim(V_th) == _VOLT.dim:
            self.unit = u.get_unit(V_th)
        self.V_th = _quantity_like(self, V_th, "V_th", self.unit, "a voltage")
        self.V_reset = _quantity_like(self, V_reset, "V_reset", self.unit, "a voltage")
        self.V_rest = _quantity_like(self, V_rest, "V_rest", self.unit, "a voltage")
        self.tau = _quantity_like(self, tau, "tau", _TIME, "a time")
        for argument in ("V_th", "V_reset", "V_rest", "tau"):
            _check_param_shape(self, getattr(self, argument), argument, varshape)
        _check_positive(self, self.tau, "tau")
        if not np.all(np.asarray(self.V_th.mantissa) > np.asarray(self.V_reset.mantissa)):
            raise ValueError(
                f"{layer_name(self)}: V_th must be above V_reset (their difference normalises the spike "
                f"function's input); got V_th={self.V_th}, V_reset={self.V_reset}."
            )
        if not callable(spk_fun):
            raise TypeError(f"{layer_name(self)}: spk_fun must be callable; got {type(spk_fun).__name__}.")
        if spk_reset not in ("soft", "hard"):
            raise ValueError(f"{layer_name(self)}: spk_reset must be 'soft' or 'hard'; got {spk_reset!r}.")
        self.V_initializer = V_initializer
        self.spk_fun = spk_fun
        self.spk_reset: ResetMode = spk_reset

    # -- states

    def _init_V(self, batch_size: int | None) -> Any:
        return _initial_value(self, self.V_initializer, "V_initializer", self.varshape, batch_size, self.unit)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Create ``V`` (shape ``(batch_size, *varshape)`` or ``varshape``) from ``V_initializer``."""
        self.V = brainstate.HiddenState(self._init_V(batch_size))

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Re-initialise ``V`` in place (the State object is kept); creates it if missing."""
        reset_hidden(self, "V", self._init_V(batch_size))

    # -- one step

    def _drive(self, x: Any, state: brainstate.State[Any]) -> u.Quantity:
        """Check ``x`` (shape, batch, voltage unit) and return it in the state's unit."""
        _check_features(self, x, self.varshape)
        check_batch_size(self, x, state, n_feature_axes=len(self.varshape))
        if not isinstance(x, u.Quantity) or u.get_dim(x) != self.unit.dim:
            raise ValueError(
                f"{layer_name(self)}: x must be a voltage with a unit like {self.unit} (the weighted synaptic "
                f"drive); got {_unit_text(x)}."
            )
        return x.in_unit(self.unit)

    def _spike(self, V: u.Quantity, threshold: u.Quantity) -> Any:
        return self.spk_fun((V - threshold) / (self.V_th - self.V_reset))

    def _reset(self, V: Any, spike: Any, threshold: Any) -> Any:
        detached = jax.lax.stop_gradient(spike)
        if self.spk_reset == "soft":
            return V - (threshold - self.V_reset) * detached
        return V - (V - self.V_reset) * detached


# --------------------------------------------------------------------------- IF


class IF(_SpikingNeuron):
    r"""Integrate-and-fire neurons (no leak).

    With :math:`\Delta t` = ``brainstate.environ.get_dt()`` and input :math:`x`
    (a voltage), one :meth:`update` computes

    .. math::

        V' &= V + \frac{\Delta t}{\tau}\, x, \\
        s &= f\!\left(\frac{V' - V_{th}}{V_{th} - V_{reset}}\right), \\
        V &\leftarrow \begin{cases}
            V' - (V_{th} - V_{reset})\,\mathrm{sg}(s) & \text{soft} \\
            V' - (V' - V_{reset})\,\mathrm{sg}(s) & \text{hard}
        \end{cases}

    (forward Euler of :math:`\tau\,\dot V = x`; :math:`\mathrm{sg}` = stop-gradient,
    the reset's spike is detached). Returns :math:`s`.

    Parameters
    ----------
    in_size : int or tuple of int
        Population shape (the trailing axes of ``x``).
    V_th, V_reset : Quantity
        Threshold and reset potential (voltages; ``V_th > V_reset``), scalars or
        broadcastable to ``in_size``. Defaults 1 mV and 0 mV. The state ``V`` is
        kept in ``V_th``'s unit.
    tau : Quantity
        Integration time constant (a time, > 0). Default 5 ms.
    V_initializer : initializer, array or Quantity
        Initial ``V``; a plain result is read in ``V_th``'s unit. Default zeros in mV.
    spk_fun : callable
        Surrogate spike function of the dimensionless normalised potential.
        Default :class:`~etp_nn.SigmoidSurrogate` (``alpha=4``).
    spk_reset : {'soft', 'hard'}
        Reset mode. Default ``'soft'``.
    name : str, optional

    Attributes
    ----------
    V : brainstate.HiddenState
        Membrane potential, ``(*batch, *in_size)``, in ``V_th``'s unit (after :meth:`init_state`).

    Examples
    --------
    >>> import brainstate, saiunit as u, jax.numpy as jnp
    >>> import etp_nn
    >>> neuron = etp_nn.IF(3)
    >>> neuron.init_state(batch_size=2)
    >>> with brainstate.environ.context(dt=1.0 * u.ms):
    ...     spikes = neuron(jnp.full((2, 3), 6.0) * u.mV)
    >>> spikes.shape
    (2, 3)
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        V_th: QuantityLike = _ONE_MV,
        V_reset: QuantityLike = _ZERO_MV,
        tau: QuantityLike = _FIVE_MS,
        V_initializer: Initializer = _ZEROS_MV,
        spk_fun: SpikeFunction = _SIGMOID_SURROGATE,
        spk_reset: ResetMode = "soft",
        name: str | None = None,
    ) -> None:
        super().__init__(_size_tuple(in_size), V_th, V_reset, V_reset, tau, V_initializer, spk_fun, spk_reset, name)

    def update(self, x: Any) -> Any:
        """One step with input ``x`` (a voltage, shape ``(*batch, *in_size)``); returns the spikes (float, same shape)."""
        state = require_state(self, "V")
        drive = self._drive(x, state)
        V = state.value + _time_step(self) / self.tau * drive
        spike = self._spike(V, self.V_th)
        _store(state, self._reset(V, spike, self.V_th))
        return spike


# --------------------------------------------------------------------------- LIF


class LIF(_SpikingNeuron):
    r"""Leaky integrate-and-fire neurons.

    With :math:`\Delta t` = ``brainstate.environ.get_dt()`` and input :math:`x`
    (a voltage), one :meth:`update` computes

    .. math::

        V' &= V + \frac{\Delta t}{\tau}\,\bigl(V_{rest} - V + x\bigr), \\
        s &= f\!\left(\frac{V' - V_{th}}{V_{th} - V_{reset}}\right), \\
        V &\leftarrow \begin{cases}
            V' - (V_{th} - V_{reset})\,\mathrm{sg}(s) & \text{soft} \\
            V' - (V' - V_{reset})\,\mathrm{sg}(s) & \text{hard}
        \end{cases}

    (forward Euler of :math:`\tau\,\dot V = V_{rest} - V + x`, stable for
    :math:`\Delta t < 2\tau`; :math:`\mathrm{sg}` = stop-gradient, the reset's
    spike is detached). A constant :math:`x` drives :math:`V` towards
    :math:`V_{rest} + x`. Returns :math:`s`.

    Parameters
    ----------
    in_size : int or tuple of int
        Population shape (the trailing axes of ``x``).
    V_th, V_reset, V_rest : Quantity
        Threshold, reset and resting potential (voltages; ``V_th > V_reset``),
        scalars or broadcastable to ``in_size``. Defaults 1, 0, 0 mV. The state
        ``V`` is kept in ``V_th``'s unit.
    tau : Quantity
        Membrane time constant (a time, > 0). Default 5 ms.
    V_initializer : initializer, array or Quantity
        Initial ``V``; a plain result is read in ``V_th``'s unit. Default zeros in mV.
    spk_fun : callable
        Surrogate spike function. Default :class:`~etp_nn.SigmoidSurrogate`.
    spk_reset : {'soft', 'hard'}
        Reset mode. Default ``'soft'``.
    name : str, optional

    Attributes
    ----------
    V : brainstate.HiddenState
        Membrane potential, ``(*batch, *in_size)`` (after :meth:`init_state`).

    Examples
    --------
    >>> import brainstate, saiunit as u, jax.numpy as jnp
    >>> import etp_nn
    >>> lif = etp_nn.LIF(4, tau=10.0 * u.ms)
    >>> lif.init_state()
    >>> with brainstate.environ.context(dt=1.0 * u.ms):
    ...     for _ in range(3):
    ...         spikes = lif(jnp.full(4, 2.0) * u.mV)
    >>> u.get_unit(lif.V.value)
    Unit("mV")
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        V_th: QuantityLike = _ONE_MV,
        V_reset: QuantityLike = _ZERO_MV,
        V_rest: QuantityLike = _ZERO_MV,
        tau: QuantityLike = _FIVE_MS,
        V_initializer: Initializer = _ZEROS_MV,
        spk_fun: SpikeFunction = _SIGMOID_SURROGATE,
        spk_reset: ResetMode = "soft",
        name: str | None = None,
    ) -> None:
        super().__init__(_size_tuple(in_size), V_th, V_reset, V_rest, tau, V_initializer, spk_fun, spk_reset, name)

    def _step(self, drive: u.Quantity, state: brainstate.State[Any]) -> Any:
        V = state.value
        V = V + _time_step(self) / self.tau * (self.V_rest - V + drive)
        spike = self._spike(V, self.V_th)
        _store(state, self._reset(V, spike, self.V_th))
        return spike

    def update(self, x: Any) -> Any:
        """One step with input ``x`` (a voltage, shape ``(*batch, *in_size)``); returns the spikes (float, same shape)."""
        state = require_state(self, "V")
        return self._step(self._drive(x, state), state)


# --------------------------------------------------------------------------- ALIF


class ALIF(_SpikingNeuron):
    r"""Adaptive leaky integrate-and-fire neurons: an LIF whose threshold rises with each spike.

    Two hidden states per unit, the potential :math:`V` and the dimensionless
    adaptation :math:`a` (a leaky spike count). One :meth:`update` with input
    :math:`x` (a voltage) computes, in this order,

    .. math::

        V' &= V + \frac{\Delta t}{\tau}\,\bigl(V_{rest} - V + x\bigr), \\
        \theta &= V_{th} + \beta\, a, \\
        s &= f\!\left(\frac{V' - \theta}{V_{th} - V_{reset}}\right), \\
        V &\leftarrow \begin{cases}
            V' - (\theta - V_{reset})\,\mathrm{sg}(s) & \text{soft} \\
            V' - (V' - V_{reset})\,\mathrm{sg}(s) & \text{hard}
        \end{cases} \\
        a &\leftarrow e^{-\Delta t/\tau_a}\, a + s .

    The threshold of a step uses the adaptation *before* that step's spike;
    the new spike then increments :math:`a` (with its surrogate gradient, not
    detached). Only the spike in the reset term is stop-gradient'ed. The
    normaliser of the spike function is the fixed gap :math:`V_{th} - V_{reset}`.

    Parameters
    ----------
    in_size : int or tuple of int
        Population shape.
    V_th, V_reset, V_rest : Quantity
        Base threshold, reset and resting potential (voltages). Defaults 1, 0, 0 mV.
    tau : Quantity
        Membrane time constant. Default 5 ms.
    tau_a : Quantity
        Adaptation time constant (a time, > 0). Default 100 ms.
    beta : Quantity
        Threshold increase per unit of adaptation (a voltage, >= 0). Default 0.1 mV.
    V_initializer : initializer, array or Quantity
        Initial ``V``. Default zeros in mV.
    a_initializer : initializer or array
        Initial ``a`` (dimensionless). Default zeros.
    spk_fun : callable
        Surrogate spike function. Default :class:`~etp_nn.SigmoidSurrogate`.
    spk_reset : {'soft', 'hard'}
        Reset mode. Default ``'soft'``.
    name : str, optional

    Attributes
    ----------
    V : brainstate.HiddenState
        Membrane potential (unit of ``V_th``).
    a : brainstate.HiddenState
        Adaptation (plain array), same shape as ``V``.

    Examples
    --------
    >>> import brainstate, saiunit as u, jax.numpy as jnp
    >>> import etp_nn
    >>> alif = etp_nn.ALIF(2, beta=0.5 * u.mV)
    >>> alif.init_state()
    >>> with brainstate.environ.context(dt=1.0 * u.ms):
    ...     spikes = alif(jnp.full(2, 10.0) * u.mV)
    >>> alif.a.value.tolist()
    [1.0, 1.0]
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        V_th: QuantityLike = _ONE_MV,
        V_reset: QuantityLike = _ZERO_MV,
        V_rest: QuantityLike = _ZERO_MV,
        tau: QuantityLike = _FIVE_MS,
        tau_a: QuantityLike = _HUNDRED_MS,
        beta: QuantityLike = _TENTH_MV,
        V_initializer: Initializer = _ZEROS_MV,
        a_initializer: Initializer = _ZEROS,
        spk_fun: SpikeFunction = _SIGMOID_SURROGATE,
        spk_reset: ResetMode = "soft",
        name: str | None = None,
    ) -> None:
        varshape = _size_tuple(in_size)
        super().__init__(varshape, V_th, V_reset, V_rest, tau, V_initializer, spk_fun, spk_reset, name)
        self.tau_a = _quantity_like(self, tau_a, "tau_a", _TIME, "a time")
        self.beta = _quantity_like(self, beta, "beta", self.unit, "a voltage")
        _check_param_shape(self, self.tau_a, "tau_a", varshape)
        _check_param_shape(self, self.beta, "beta", varshape)
        _check_positive(self, self.tau_a, "tau_a")
        if not np.all(np.asarray(self.beta.mantissa) >= 0):
            raise ValueError(f"{layer_name(self)}: beta must be >= 0; got {self.beta}.")
        self.a_initializer = a_initializer

    def _init_a(self, batch_size: int | None) -> Any:
        return _initial_value(self, self.a_initializer, "a_initializer", self.varshape, batch_size, u.UNITLESS)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Create ``V`` and ``a`` (shape ``(batch_size, *varshape)`` or ``varshape``)."""
        super().init_state(batch_size)
        self.a = brainstate.HiddenState(self._init_a(batch_size))

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Re-initialise ``V`` and ``a`` in place; creates them if missing."""
        super().reset_state(batch_size)
        reset_hidden(self, "a", self._init_a(batch_size))

    def update(self, x: Any) -> Any:
        """One step with input ``x`` (a voltage, shape ``(*batch, *in_size)``); returns the spikes (float, same shape)."""
        V_state = require_state(self, "V")
        a_state = require_state(self, "a")
        drive = self._drive(x, V_state)
        dt = _time_step(self)
        V, a = V_state.value, a_state.value
        V = V + dt / self.tau * (self.V_rest - V + drive)
        threshold = self.V_th + self.beta * a
        spike = self._spike(V, threshold)
        _store(V_state, self._reset(V, spike, threshold))
        _store(a_state, _decay(dt, self.tau_a) * a + spike)
        return spike
