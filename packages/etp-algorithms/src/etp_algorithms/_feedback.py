r"""Helpers of e-prop (Bellec et al. 2020): a fixed random feedback matrix and the readout's leaky filter.

:class:`FixedRandomFeedback` sends an output error :math:`\delta^t` (shape ``(..., n_target)``)
to the hidden units through a matrix :math:`B` drawn once from a key (random e-prop):

.. math::

    L^t_j = \sum_k B_{jk}\, \delta^t_k, \qquad B_{jk} \sim \mathcal N(0, \sigma^2),

with :math:`\sigma` = ``init_scale``. :class:`KappaFilter` is the leaky filter
:math:`\mathcal F_\kappa` of the paper's filtered eligibility trace,

.. math::

    \bar x^t = \kappa\, \bar x^{t-1} + x^t, \qquad 0 \le \kappa < 1,

as a brainstate module (state ``value``) and as a pure step (:meth:`KappaFilter.step`).
Memory: :math:`B` holds ``n_layer * n_target`` numbers; the filter one array of ``init_value``'s shape.
"""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp

from ._rule_helpers import as_scalar

__all__ = ["FixedRandomFeedback", "KappaFilter", "check_kappa"]


def check_kappa(kappa: Any, what: str = "kappa") -> float:
    """``kappa`` as a float in ``[0, 1)``; a ``ValueError`` naming the value otherwise."""
    value = float(as_scalar(kappa, what))
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (a filter's decay per step), got {value!r}.")
    return value


def _positive_int(value: Any, what: str) -> int:
    number = as_scalar(value, what)
    if not isinstance(number, int) or number < 1:
        raise ValueError(f"FixedRandomFeedback: {what} must be a positive integer, got {value!r}.")
    return number


class FixedRandomFeedback:
    r"""A fixed random matrix :math:`B` of shape ``(n_layer, n_target)`` (random e-prop's feedback).

    Parameters
    ----------
    n_target : int
        Size of the error (the readout's outputs).
    n_layer : int
        Number of hidden units the error is sent to.
    key : jax.Array
        A PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``); the same key gives the same matrix.
    init_scale : float
        Standard deviation :math:`\sigma` of the Gaussian entries (default 0.1).

    Attributes
    ----------
    matrix : jax.Array
        :math:`B`, shape ``(n_layer, n_target)``, drawn once.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from etp_algorithms import FixedRandomFeedback
    >>> fb = FixedRandomFeedback(2, 5, jax.random.PRNGKey(0))
    >>> fb.matrix.shape, fb.project(jnp.ones((3, 2))).shape
    ((5, 2), (3, 5))
    """

    def __init__(self, n_target: int, n_layer: int, key: Any, init_scale: float = 0.1) -> None:
        self.n_target = _positive_int(n_target, "n_target")
        self.n_layer = _positive_int(n_layer, "n_layer")
        scale = float(as_scalar(init_scale, "FixedRandomFeedback: init_scale"))
        if not scale > 0.0:
            raise ValueError(f"FixedRandomFeedback: init_scale must be > 0, got {init_scale!r}.")
        self.init_scale = scale
        try:
            draw = jax.random.normal(key, (self.n_layer, self.n_target))
        except (TypeError, ValueError) as error:
            raise TypeError(f"FixedRandomFeedback: key must be a JAX PRNG key, got {key!r} ({error}).") from None
        self.matrix: jax.Array = scale * draw

    def project(self, y_target: Any) -> jax.Array:
        r""":math:`L = \delta B^\top`: an error of shape ``(..., n_target)`` sent to ``(..., n_layer)``."""
        error = jnp.asarray(y_target)
        if error.ndim == 0 or error.shape[-1] != self.n_target:
            raise ValueError(
                f"FixedRandomFeedback.project: expected an error with a trailing axis of size {self.n_target} "
                f"(n_target), got shape {error.shape}."
            )
        result: jax.Array = error @ self.matrix.T.astype(error.dtype)
        return result

    def __repr__(self) -> str:
        return f"FixedRandomFeedback(n_target={self.n_target}, n_layer={self.n_layer}, init_scale={self.init_scale})"


class KappaFilter(brainstate.nn.Module):
    r"""The leaky filter :math:`\bar x^t = \kappa \bar x^{t-1} + x^t` with its state.

    Parameters
    ----------
    init_value : pytree of arrays
        The filter's initial value (also what :meth:`reset_state` restores); fixes the shapes.
    kappa : float
        The decay per step, in ``[0, 1)`` (``0``: no filtering, :math:`\bar x^t = x^t`).

    Attributes
    ----------
    value : brainstate.ShortTermState
        :math:`\bar x^{t}`, a pytree like ``init_value``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from etp_algorithms import KappaFilter
    >>> f = KappaFilter(jnp.zeros(2), 0.5)
    >>> _ = f(jnp.ones(2)); f(jnp.ones(2)).tolist()
    [1.5, 1.5]
    >>> KappaFilter.step(jnp.ones(2), jnp.ones(2), 0.5).tolist()
    [1.5, 1.5]
    """

    def __init__(self, init_value: Any, kappa: float) -> None:
        super().__init__(name=None)  # type: ignore[call-arg]
        self.kappa = check_kappa(kappa, "KappaFilter: kappa")
        self._init_value = jax.tree.map(jnp.asarray, init_value)
        self.value = brainstate.ShortTermState(self._init_value)

    @staticmethod
    def step(previous: Any, x: Any, kappa: float) -> Any:
        r"""The pure update :math:`\kappa\,\bar x^{t-1} + x^t` (pytrees of the same structure)."""
        return jax.tree.map(lambda p, v: kappa * p + v, previous, x)

    def update(self, x: Any) -> Any:
        """Filter one step's ``x`` (a pytree like ``init_value``); returns and stores the new value."""
        if str(jax.tree.structure(x)) != str(jax.tree.structure(self.value.value)):
            raise ValueError(
                f"KappaFilter: x has the structure {jax.tree.structure(x)}, expected that of init_value "
                f"{jax.tree.structure(self.value.value)}."
            )
        self.value.value = self.step(self.value.value, x, self.kappa)
        return self.value.value

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Set the value back to ``init_value`` (``batch_size`` is accepted for brainstate's API and ignored)."""
        self.value.value = self._init_value
