r"""``GradExpon``: a leaky running sum of gradients.

For gradients :math:`g^t` (any pytree) and a decay :math:`a \in [0, 1)`,

.. math::

    G^t = a\, G^{t-1} + g^t, \qquad G^0 = 0,

with :math:`a` given directly or from a time constant :math:`\tau` as
:math:`a = e^{-\Delta t/\tau}` (:math:`\Delta t` = ``brainstate.environ.get_dt()``
at construction). Used to accumulate online gradients between parameter
updates with a forgetting factor. Memory: one array per gradient leaf;
compute: one multiply-add per element per step.
"""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import saiunit as u

from ._feedback import check_kappa

__all__ = ["GradExpon"]


class GradExpon(brainstate.nn.Module):
    r"""The leaky running sum :math:`G^t = a G^{t-1} + g^t` of a gradient pytree.

    Parameters
    ----------
    grad_shape : pytree
        Arrays (or ``jax.ShapeDtypeStruct``) with the gradients' shapes and dtypes, e.g. the gradients
        themselves; the sum starts at zeros of these.
    tau_or_decay : float or saiunit.Quantity
        A decay :math:`a` in ``[0, 1)``, or a time constant :math:`\tau > 0` (a time Quantity), giving
        :math:`a = e^{-\Delta t/\tau}` with the environment's ``dt``.

    Attributes
    ----------
    decay : float
        :math:`a`.
    value : brainstate.ShortTermState
        :math:`G^t`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from etp_algorithms import GradExpon
    >>> acc = GradExpon({"w": jnp.zeros(2)}, 0.5)
    >>> _ = acc.update({"w": jnp.ones(2)}); acc.update({"w": jnp.ones(2)})["w"].tolist()
    [1.5, 1.5]
    """

    def __init__(self, grad_shape: Any, tau_or_decay: Any) -> None:
        super().__init__(name=None)  # type: ignore[call-arg]
        if isinstance(tau_or_decay, u.Quantity):
            if u.get_dim(tau_or_decay) != u.second.dim:
                raise ValueError(f"GradExpon: a Quantity tau_or_decay must be a time, got {tau_or_decay}.")
            tau = float(tau_or_decay.to_decimal(u.ms))
            if not tau > 0.0:
                raise ValueError(f"GradExpon: the time constant must be > 0, got {tau_or_decay}.")
            dt = float(u.Quantity(brainstate.environ.get_dt()).to_decimal(u.ms))
            self.decay = float(jnp.exp(-dt / tau))
        else:
            self.decay = check_kappa(tau_or_decay, "GradExpon: tau_or_decay (a decay)")
        self._zeros = jax.tree.map(lambda leaf: jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf)), grad_shape)
        self.value = brainstate.ShortTermState(self._zeros)

    def update(self, grads: Any) -> Any:
        """Add one step's ``grads`` (a pytree like ``grad_shape``) to the decayed sum; returns the new sum."""
        if str(jax.tree.structure(grads)) != str(jax.tree.structure(self._zeros)):
            raise ValueError(
                f"GradExpon: grads have the structure {jax.tree.structure(grads)}, expected that of grad_shape "
                f"{jax.tree.structure(self._zeros)}."
            )
        self.value.value = jax.tree.map(lambda s, g: self.decay * s + g, self.value.value, grads)
        return self.value.value

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Set the sum back to zeros."""
        self.value.value = self._zeros
