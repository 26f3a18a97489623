r"""Readout layers: a leaky rate integrator and a spiking (LIF) readout, weights through ETP ``matmul``.

Both hold their weight as ``ParamState({'weight': (in, out)})`` (no bias) and
apply it with :func:`etp_primitives.matmul` (``etp_mm`` for batched input,
``etp_mv`` for a single sample), so an online learner traces the weight into
the readout's :class:`brainstate.HiddenState`, whose dynamics are element-wise
per output unit. As for the neurons, the hidden state keeps the dtype it was
created with (``brainstate.environ.dftype()``).
"""

from __future__ import annotations

from typing import Any

import brainstate
import saiunit as u
from brainstate.nn import init

import etp_primitives as etp

from ._neurons import _SIGMOID_SURROGATE, LIF, ResetMode, SpikeFunction
from ._units import (
    _FIVE_MS,
    _ONE_MV,
    _ZERO_MV,
    _ZEROS,
    _ZEROS_MV,
    Initializer,
    QuantityLike,
    _check_positive,
    _decay,
    _initial_value,
    _quantity_like,
    _size_tuple,
    _store,
    _time_step,
    _unit_text,
)
from ._utils import check_batch_size, check_last_dim, layer_name, require_state, reset_hidden

__all__ = ["LeakyRateReadout", "LeakySpikeReadout"]

_KAIMING_NORMAL = init.KaimingNormal()


def _weight_state(w_init: Initializer, n_in: int, n_out: int) -> brainstate.ParamState:
    return brainstate.ParamState({"weight": init.param(w_init, (n_in, n_out), allow_none=False)})


class LeakyRateReadout(brainstate.nn.Module):
    r"""Leaky integrator of weighted input: a rate readout.

    With :math:`\Delta t` = ``brainstate.environ.get_dt()``, one :meth:`update` computes

    .. math::

        r \leftarrow e^{-\Delta t/\tau}\, r + x W

    and returns the new :math:`r`; :math:`x W` goes through
    :func:`etp_primitives.matmul`. Units: :math:`r` has the unit of
    ``r_initializer``'s values (default: none); :math:`x W` must have the same
    dimension and is converted to it.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Feature sizes; the last entry is the number of features.
    tau : Quantity
        Decay time constant (a time, > 0). Default 5 ms.
    w_init : initializer or array
        Weight ``(in, out)``; default Kaiming normal.
    r_initializer : initializer, array or Quantity
        Initial ``r``. Default zeros.
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (in, out)}``.
    r : brainstate.HiddenState
        Readout, ``(*batch, out)`` (after :meth:`init_state`).

    Examples
    --------
    >>> import brainstate, saiunit as u, jax.numpy as jnp
    >>> import etp_nn
    >>> readout = etp_nn.LeakyRateReadout(3, 2)
    >>> readout.init_state(batch_size=4)
    >>> with brainstate.environ.context(dt=1.0 * u.ms):
    ...     r = readout(jnp.ones((4, 3)))
    >>> r.shape
    (4, 2)
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        out_size: int | tuple[int, ...],
        tau: QuantityLike = _FIVE_MS,
        w_init: Initializer = _KAIMING_NORMAL,
        r_initializer: Initializer = _ZEROS,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]  # brainstate hides Module.__init__ from type checkers
        self.in_size = in_size
        self.out_size = out_size
        self.n_in: int = _size_tuple(in_size)[-1]
        self.n_out: int = _size_tuple(out_size)[-1]
        self.tau = _quantity_like(self, tau, "tau", u.ms, "a time")
        _check_positive(self, self.tau, "tau")
        self.weight = _weight_state(w_init, self.n_in, self.n_out)
        self.r_initializer = r_initializer

    def _init_r(self, batch_size: int | None) -> Any:
        return _initial_value(self, self.r_initializer, "r_initializer", (self.n_out,), batch_size, None)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Create ``r`` (shape ``(batch_size, out)`` or ``(out,)``) from ``r_initializer``."""
        self.r = brainstate.HiddenState(self._init_r(batch_size))

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Re-initialise ``r`` in place; creates it if missing."""
        reset_hidden(self, "r", self._init_r(batch_size))

    def update(self, x: Any) -> Any:
        """One step with input ``x`` of shape ``(*batch, in)``; returns ``r`` of shape ``(*batch, out)``."""
        state = require_state(self, "r")
        check_last_dim(self, x, self.n_in)
        check_batch_size(self, x, state)
        drive = etp.matmul(x, self.weight.value["weight"])  # type: ignore[index]
        unit = u.get_unit(state.value)
        if u.get_dim(drive) != unit.dim:
            raise ValueError(
                f"{layer_name(self)}: x @ weight must have a unit like the readout's ({unit}, set by "
                f"r_initializer); got {_unit_text(drive)}."
            )
        if isinstance(drive, u.Quantity):
            drive = drive.to_decimal() if unit.is_unitless else drive.in_unit(unit)
        _store(state, _decay(_time_step(self), self.tau) * state.value + drive)
        return state.value


class LeakySpikeReadout(LIF):
    r"""Spiking readout: an :class:`~etp_nn.LIF` population driven by :math:`x W`.

    With :math:`\Delta t` = ``brainstate.environ.get_dt()``, one :meth:`update` computes

    .. math::

        I &= x W \quad (\text{in the unit of } V_{th}), \\
        V' &= V + \frac{\Delta t}{\tau}\,\bigl(V_{rest} - V + I\bigr), \\
        s &= f\!\left(\frac{V' - V_{th}}{V_{th} - V_{reset}}\right), \\
        V &\leftarrow \begin{cases}
            V' - (V_{th} - V_{reset})\,\mathrm{sg}(s) & \text{soft} \\
            V' - (V' - V_{reset})\,\mathrm{sg}(s) & \text{hard}
        \end{cases}

    and returns the spikes :math:`s` of shape ``(*batch, out)``; the reset's
    spike is detached (:math:`\mathrm{sg}` = stop-gradient), as in :class:`~etp_nn.LIF`.
    :math:`x W` goes through :func:`etp_primitives.matmul`. A dimensionless
    :math:`x W` (plain ``x`` and weight, the default) is read in the unit of
    ``V_th``, i.e. the weight is "volts of drive per unit of input"; a voltage
    :math:`x W` is converted; any other unit raises ``ValueError``.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Feature sizes; the last entry is the number of features.
    tau : Quantity
        Membrane time constant. Default 5 ms.
    V_th : Quantity
        Threshold. Default 1 mV.
    w_init : initializer or array
        Weight ``(in, out)``; default Kaiming normal.
    spk_fun : callable
        Surrogate spike function. Default :class:`~etp_nn.SigmoidSurrogate`.
    V_reset, V_rest : Quantity
        Reset and resting potential. Defaults 0 mV.
    V_initializer : initializer, array or Quantity
        Initial ``V``. Default zeros in mV.
    spk_reset : {'soft', 'hard'}
        Reset mode. Default ``'soft'``.
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (in, out)}``.
    V : brainstate.HiddenState
        Membrane potential, ``(*batch, out)`` (after :meth:`init_state`).

    Examples
    --------
    >>> import brainstate, saiunit as u, jax.numpy as jnp
    >>> import etp_nn
    >>> readout = etp_nn.LeakySpikeReadout(3, 2)
    >>> readout.init_state()
    >>> with brainstate.environ.context(dt=1.0 * u.ms):
    ...     spikes = readout(jnp.ones(3))
    >>> spikes.shape
    (2,)
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        out_size: int | tuple[int, ...],
        tau: QuantityLike = _FIVE_MS,
        V_th: QuantityLike = _ONE_MV,
        w_init: Initializer = _KAIMING_NORMAL,
        spk_fun: SpikeFunction = _SIGMOID_SURROGATE,
        V_reset: QuantityLike = _ZERO_MV,
        V_rest: QuantityLike = _ZERO_MV,
        V_initializer: Initializer = _ZEROS_MV,
        spk_reset: ResetMode = "soft",
        name: str | None = None,
    ) -> None:
        n_in, n_out = _size_tuple(in_size)[-1], _size_tuple(out_size)[-1]
        super().__init__(
            n_out,
            V_th=V_th,
            V_reset=V_reset,
            V_rest=V_rest,
            tau=tau,
            V_initializer=V_initializer,
            spk_fun=spk_fun,
            spk_reset=spk_reset,
            name=name,
        )
        self.in_size = in_size
        self.out_size = out_size
        self.n_in: int = n_in
        self.weight = _weight_state(w_init, n_in, n_out)

    def update(self, x: Any) -> Any:
        """One step with input ``x`` of shape ``(*batch, in)``; returns spikes of shape ``(*batch, out)``."""
        state = require_state(self, "V")
        check_last_dim(self, x, self.n_in)
        check_batch_size(self, x, state)
        drive = etp.matmul(x, self.weight.value["weight"])  # type: ignore[index]
        if u.get_dim(drive) == u.DIMENSIONLESS:
            mantissa = drive.to_decimal() if isinstance(drive, u.Quantity) else drive
            drive = u.Quantity(mantissa, unit=self.unit)
        elif u.get_dim(drive) != self.unit.dim:
            raise ValueError(
                f"{layer_name(self)}: x @ weight must be a voltage (unit like {self.unit}) or dimensionless "
                f"(read in {self.unit}); got {_unit_text(drive)}."
            )
        return self._step(drive.in_unit(self.unit), state)
