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
import jax.numpy as jnp
import numpy as np
import saiunit as u
from brainstate.nn import init

import etp_primitives as etp

from ._neurons import _SIGMOID_SURROGATE, LIF, ResetMode, SpikeFunction
from ._units import (
    _FIVE_MS,
    _ONE_MV,
    _TIME,
    _ZERO_MV,
    _ZEROS,
    _ZEROS_MV,
    Initializer,
    QuantityLike,
    _check_positive,
    _decay,
    _environment_dt,
    _initial_value,
    _quantity_like,
    _size_tuple,
    _store,
    _unit_text,
)
from ._utils import check_batch_size, check_last_dim, layer_name, one_of_keywords, require_state, reset_hidden

__all__ = ["LeakyRateReadout", "LeakySpikeReadout"]

_KAIMING_NORMAL = init.KaimingNormal()


def _weight_state(w_init: Initializer, n_in: int, n_out: int) -> brainstate.ParamState:
    return brainstate.ParamState({"weight": init.param(w_init, (n_in, n_out), allow_none=False)})


def _time_constant(layer: brainstate.nn.Module, value: Any, argument: str) -> Any:
    """``value`` as a positive time Quantity (in ms), or as a positive plain array (for a unitless ``dt``).

    A plain ``value`` while the environment's ``dt`` is set to a time raises ``ValueError`` here already.
    """
    if isinstance(value, u.Unit) or (isinstance(value, u.Quantity) and not value.is_unitless):
        time = _quantity_like(layer, value, argument, _TIME, "a time (or a plain number, used with a plain dt)")
        _check_positive(layer, time, argument)
        return time
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number, np.ndarray, jnp.ndarray, u.Quantity)):
        raise TypeError(
            f"{layer_name(layer)}: {argument} must be a time (e.g. 5.0 * saiunit.ms) or a plain positive number "
            f"(used with a plain dt); got {type(value).__name__}."
        )
    dt = brainstate.environ.get("dt", None)  # may be unset while the model is built
    if isinstance(dt, u.Quantity) and not dt.is_unitless:
        raise ValueError(
            f"{layer_name(layer)}: {argument} must be a time (e.g. 5.0 * saiunit.ms) when the environment time step "
            f"dt has a unit (it is {dt}); a plain {argument} ({value!r}) needs a plain dt (e.g. "
            "brainstate.environ.context(dt=0.1))."
        )
    tau = jnp.asarray(u.get_mantissa(value))
    if not jnp.issubdtype(tau.dtype, jnp.inexact):
        tau = tau.astype(brainstate.environ.dftype())
    if not np.all(np.asarray(tau) > 0):
        raise ValueError(f"{layer_name(layer)}: {argument} must be > 0; got {value!r}.")
    return tau


def _leak(layer: brainstate.nn.Module, tau: Any) -> Any:
    r""":math:`e^{-\Delta t/\tau}` for the environment's ``dt``: both times, or both plain numbers."""
    dt = _environment_dt(layer)
    dt_is_time = isinstance(dt, u.Quantity) and u.get_dim(dt) == _TIME.dim
    if isinstance(tau, u.Quantity):
        if not dt_is_time:
            raise ValueError(
                f"{layer_name(layer)}: tau is a time ({tau}), so the environment time step dt must be a time too "
                f"(e.g. brainstate.environ.context(dt=0.1 * saiunit.ms)); got {_unit_text(dt)} ({dt!r})."
            )
        return _decay(dt, tau)
    if not u.get_unit(dt).is_unitless:
        raise ValueError(
            f"{layer_name(layer)}: tau is a plain number ({tau}), so the environment time step dt must be a plain "
            f"number too (e.g. brainstate.environ.context(dt=0.1)); got {_unit_text(dt)} ({dt!r}). Give tau as "
            "a time (e.g. 5.0 * saiunit.ms) to use a dt with a unit."
        )
    return jnp.exp(-u.get_mantissa(dt) / tau)


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
    tau : Quantity or float or array
        Decay time constant, > 0: a time (default 5 ms), or a plain number
        when the environment's ``dt`` is a plain number too (then
        :math:`\Delta t/\tau` is the ratio of the two numbers). A plain ``tau``
        while ``dt`` is set to a time raises ``ValueError`` (when the layer is
        built, and at the step), as does a time ``tau`` with a plain ``dt``.
    w_init : initializer or array
        Weight ``(in, out)``; default Kaiming normal.
    r_initializer : initializer, array, Quantity or None
        Initial ``r``; ``None`` (default) for zeros.
    name : str, optional
    r_init : initializer, array, Quantity or None
        braintrace 0.2.8's keyword for ``r_initializer`` (give one of the two;
        both raise ``TypeError``).

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

    Without units (a plain ``tau`` with a plain ``dt``), with braintrace
    0.2.8's keyword ``r_init``:

    >>> readout = etp_nn.LeakyRateReadout(3, 2, tau=5.0, r_init=brainstate.nn.init.Constant(1.0))
    >>> readout.init_state()
    >>> with brainstate.environ.context(dt=1.0):
    ...     r = readout(jnp.zeros(3))
    >>> bool(jnp.allclose(r, jnp.exp(-1.0 / 5.0)))
    True
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        out_size: int | tuple[int, ...],
        tau: QuantityLike | float | Any = _FIVE_MS,
        w_init: Initializer = _KAIMING_NORMAL,
        r_initializer: Initializer | None = None,
        name: str | None = None,
        *,
        r_init: Initializer | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]  # brainstate hides Module.__init__ from type checkers
        self.in_size = in_size
        self.out_size = out_size
        self.n_in: int = _size_tuple(in_size)[-1]
        self.n_out: int = _size_tuple(out_size)[-1]
        self.tau = _time_constant(self, tau, "tau")
        self.weight = _weight_state(w_init, self.n_in, self.n_out)
        self.r_initializer: Initializer = one_of_keywords(
            self, ("r_initializer", r_initializer), ("r_init", r_init), default=_ZEROS
        )

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
        _store(state, _leak(self, self.tau) * state.value + drive)
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
