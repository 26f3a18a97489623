r"""``SyntheticGradient``: a model of the future gradient of a learner's hidden groups (Jaderberg et al. 2017).

A decoupled neural interface (:class:`etp_algorithms.DNI`) cuts the backward pass
at the end of a window of steps and replaces what the future would have sent back,
:math:`\partial L_{>T}/\partial h_T`, by a prediction from the final hidden state
alone. This module holds that predictor: for each hidden group :math:`g` of the
learner, with the group's states stacked on a trailing axis (its *signal*, shape
``group_shapes[g]``, flattened to a vector of :math:`n_g` numbers),

.. math::

    \hat g_g(h) = h W_g + b_g \quad (\texttt{hidden\_width=None}), \qquad
    \hat g_g(h) = \mathrm{relu}(h W_{g,1} + b_{g,1})\, W_{g,2} + b_{g,2} \quad (\text{an MLP}).

Leading axes of a signal beyond ``group_shapes[g]`` (a batch, the positions of a
convolution) are broadcast: every one gets the same map. The output layer starts
at ``scale`` times a :math:`\mathcal N(0, 1/\text{fan-in})` draw; ``scale=0`` starts
it at zero, as in the paper, so an untrained synthesizer sends no gradient and
DNI starts as truncated BPTT.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from ._rule_helpers import as_scalar

__all__ = ["SyntheticGradient"]


def _group_shapes(group_shapes: Any) -> dict[int, tuple[int, ...]]:
    """``group index -> shape`` checked: int keys, non-empty tuples of positive ints."""
    if not isinstance(group_shapes, Mapping) or not group_shapes:
        raise TypeError(
            "SyntheticGradient: group_shapes must be a non-empty dict group index (int) -> signal shape (tuple of "
            f"ints), e.g. learner.group_signal_shapes(); got {group_shapes!r}."
        )
    out: dict[int, tuple[int, ...]] = {}
    for key, shape in group_shapes.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"SyntheticGradient: group indices must be ints, got {key!r}.")
        if (
            not isinstance(shape, (tuple, list))
            or not shape
            or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape)
        ):
            raise ValueError(
                f"SyntheticGradient: the shape of group {key} must be a non-empty tuple of positive ints, got {shape!r}."
            )
        out[int(key)] = tuple(int(d) for d in shape)
    return out


class SyntheticGradient:
    r"""A synthetic-gradient model: per hidden group, a linear map or a one-hidden-layer MLP of the group's signal.

    .. math::

        \hat g_g(h) = h W_g + b_g \quad\text{or}\quad \mathrm{relu}(h W_{g,1} + b_{g,1})\, W_{g,2} + b_{g,2},

    with :math:`h` the group's signal flattened over its last ``len(group_shapes[g])`` axes
    (:math:`n_g` numbers; the leading axes are broadcast), and the output reshaped back.

    Parameters
    ----------
    group_shapes : dict of int to tuple of int
        ``group index -> signal shape`` (a suffix of the learner's :meth:`DNI.group_signal_shapes`:
        the learner's own shapes, or those without their batch axes for one map shared by the batch).
    hidden_width : int, optional
        ``None``: a linear map (:math:`W_g` is :math:`n_g \times n_g`). An int: an MLP with that many
        ReLU units.
    scale : float
        The output layer (:math:`W_g`, or :math:`W_{g,2}`) is ``scale`` times a standard normal draw
        divided by :math:`\sqrt{\text{fan-in}}`; ``0.0`` (the default) starts it at zero. Biases start at
        zero; the MLP's first layer is He-initialised (:math:`\mathcal N(0, 2/n_g)`).
    seed : int
        Seed of the initial draw (NumPy's ``default_rng``).

    Attributes
    ----------
    group_shapes : dict of int to tuple of int
    hidden_width : int or None

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from etp_algorithms import SyntheticGradient
    >>> sg = SyntheticGradient({0: (3, 1)}, scale=1.0, seed=0)
    >>> sorted(sg.param_values()["group_0"])
    ['bias', 'weight']
    >>> out = sg.apply(sg.param_values(), {0: jnp.ones((2, 3, 1))})  # a batch of 2 shares the map
    >>> out[0].shape
    (2, 3, 1)
    """

    def __init__(
        self,
        group_shapes: dict[int, tuple[int, ...]],
        hidden_width: int | None = None,
        scale: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.group_shapes = _group_shapes(group_shapes)
        if hidden_width is not None and (
            isinstance(hidden_width, bool) or not isinstance(hidden_width, (int, np.integer)) or hidden_width < 1
        ):
            raise ValueError(f"SyntheticGradient: hidden_width must be None or a positive int, got {hidden_width!r}.")
        self.hidden_width = None if hidden_width is None else int(hidden_width)
        scale = float(as_scalar(scale, "SyntheticGradient: scale"))
        if not np.isfinite(scale) or scale < 0:
            raise ValueError(f"SyntheticGradient: scale must be a finite number >= 0, got {scale}.")
        self.scale = scale
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"SyntheticGradient: seed must be an int, got {seed!r}.")
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        dtype = brainstate.environ.dftype()
        self._states: dict[int, brainstate.ParamState] = {}
        for group, shape in self.group_shapes.items():
            n = int(np.prod(shape))
            if self.hidden_width is None:
                params = {"weight": scale * rng.normal(size=(n, n)) / np.sqrt(n), "bias": np.zeros(n)}
            else:
                k = self.hidden_width
                params = {
                    "w1": rng.normal(size=(n, k)) * np.sqrt(2.0 / n),
                    "b1": np.zeros(k),
                    "w2": scale * rng.normal(size=(k, n)) / np.sqrt(k),
                    "b2": np.zeros(n),
                }
            self._states[group] = brainstate.ParamState({key: jnp.asarray(v, dtype) for key, v in params.items()})

    @staticmethod
    def key_of(group: int) -> str:
        """The name of group ``group``'s parameters in :meth:`param_values` (``'group_<index>'``)."""
        return f"group_{group}"

    def param_values(self) -> dict[str, Any]:
        """``'group_<index>' -> {name: array}``: the current parameters (``weight``/``bias``, or ``w1, b1, w2, b2``)."""
        return {self.key_of(g): state.value for g, state in self._states.items()}

    def states_dict(self) -> dict[tuple[Hashable, ...], brainstate.ParamState]:
        """``('group_<index>',) -> ParamState``: the states holding the parameters (to train or save them)."""
        return {(self.key_of(g),): state for g, state in self._states.items()}

    def apply(self, param_values: dict[str, Any], group_hiddens: dict[int, Any]) -> dict[int, jax.Array]:
        r"""The synthetic gradient :math:`\hat g_g(h_g)` of each given group, in the shape of its signal.

        Parameters
        ----------
        param_values : dict
            As :meth:`param_values` returns them (or any values of that structure, e.g. traced ones).
        group_hiddens : dict of int to array
            ``group index -> signal``, each of shape ``(..., *group_shapes[g])``; a subset of the groups.

        Returns
        -------
        dict of int to jax.Array
            ``group index -> prediction`` of the signal's shape.

        Raises
        ------
        ValueError
            An unknown group, missing parameters, or a signal whose trailing axes are not the group's shape.
        """
        if not isinstance(group_hiddens, Mapping):
            raise TypeError(
                f"SyntheticGradient.apply: group_hiddens must be a dict group index -> array, got {group_hiddens!r}."
            )
        out: dict[int, jax.Array] = {}
        for group, value in group_hiddens.items():
            if group not in self.group_shapes:
                raise ValueError(
                    f"SyntheticGradient.apply: group {group!r} is not one of the synthesizer's groups "
                    f"{sorted(self.group_shapes)}."
                )
            key = self.key_of(group)
            if key not in param_values:
                raise ValueError(
                    f"SyntheticGradient.apply: param_values has no {key!r} (keys: {sorted(param_values)})."
                )
            shape = self.group_shapes[group]
            h = jnp.asarray(value)
            if tuple(h.shape[h.ndim - len(shape) :]) != shape or h.ndim < len(shape):
                raise ValueError(
                    f"SyntheticGradient.apply: the signal of group {group} must end with the group's shape {shape}; "
                    f"got shape {tuple(h.shape)}."
                )
            lead = h.shape[: h.ndim - len(shape)]
            flat = h.reshape((*lead, -1))
            p = param_values[key]
            if self.hidden_width is None:
                y = flat @ p["weight"] + p["bias"]
            else:
                y = jax.nn.relu(flat @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
            out[group] = y.reshape(h.shape).astype(h.dtype)
        return out

    def __repr__(self) -> str:
        return (
            f"SyntheticGradient(group_shapes={self.group_shapes}, hidden_width={self.hidden_width}, "
            f"scale={self.scale}, seed={self.seed})"
        )
