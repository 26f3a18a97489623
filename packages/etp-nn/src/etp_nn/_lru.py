r"""The linear recurrent unit (LRU): a diagonal complex linear recurrence with a real read-out.

The life cycle is that of :mod:`etp_nn._rnn`.
"""

from __future__ import annotations

import math
from typing import Any

import brainstate
import jax.numpy as jnp
from brainstate.nn import init

import etp_primitives as etp

from ._linear import Initializer, Linear
from ._rnn import _ZEROS, Size, _RecurrentCell
from ._utils import layer_name

__all__ = ["LRUCell"]


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
