"""Shared checks for the layers: every error names the layer, the argument and what was expected."""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import saiunit as u

__all__ = ["layer_name", "check_last_dim", "require_state", "check_batch_size", "reset_hidden", "one_of_keywords"]


def layer_name(layer: brainstate.nn.Module) -> str:
    """``ClassName`` or ``ClassName(name)`` for messages."""
    name = getattr(layer, "name", None)
    cls = type(layer).__name__
    return f"{cls}({name!r})" if name and not str(name).startswith(cls) else cls


def check_last_dim(layer: brainstate.nn.Module, x: Any, expected: int, argument: str = "x") -> None:
    """Raise ``ValueError`` unless the last axis of ``x`` has ``expected`` features."""
    shape = tuple(u.math.shape(x))
    if len(shape) == 0 or shape[-1] != expected:
        raise ValueError(
            f"{layer_name(layer)}: {argument} must have {expected} features on its last axis, "
            f"i.e. shape (..., {expected}); got shape {shape}."
        )


def require_state(layer: brainstate.nn.Module, attribute: str) -> brainstate.State[Any]:
    """The state ``layer.<attribute>``, or a ``RuntimeError`` saying to initialise states first."""
    state = getattr(layer, attribute, None)
    if not isinstance(state, brainstate.State):
        raise RuntimeError(
            f"{layer_name(layer)}: state {attribute!r} is used before it exists; call "
            "brainstate.nn.init_all_states(model) (or model.init_state()) before running the layer."
        )
    return state


def check_batch_size(
    layer: brainstate.nn.Module, x: Any, state: brainstate.State[Any], n_feature_axes: int = 1
) -> None:
    """Raise ``ValueError`` if the batch axes of ``x`` differ from those the state was initialised with."""
    x_batch = tuple(u.math.shape(x))[:-n_feature_axes] if n_feature_axes else tuple(u.math.shape(x))
    leaves = jax.tree.leaves(state.value)
    if not leaves:
        return
    state_shape = tuple(u.math.shape(leaves[0]))
    state_batch = state_shape[: len(state_shape) - n_feature_axes]
    if x_batch != state_batch:
        raise ValueError(
            f"{layer_name(layer)}: input batch shape {x_batch} (x shape {tuple(u.math.shape(x))}) differs from the "
            f"state's batch shape {state_batch}; re-initialise states with init_all_states(model, batch_size=...)."
        )


def reset_hidden(layer: brainstate.nn.Module, attribute: str, value: Any) -> None:
    """Set ``layer.<attribute>`` to ``value``: in place when the HiddenState exists (so references to it
    stay valid), else as a new ``brainstate.HiddenState``."""
    state = getattr(layer, attribute, None)
    if isinstance(state, brainstate.State):
        state.value = value
    else:
        setattr(layer, attribute, brainstate.HiddenState(value))


def one_of_keywords(layer: brainstate.nn.Module, ours: tuple[str, Any], peers: tuple[str, Any], default: Any) -> Any:
    """The value of an argument that has two keywords: ours and braintrace 0.2.8's (the "peer's").

    ``ours`` and ``peers`` are ``(keyword, value)`` pairs whose value is ``None`` when not given; the
    value given is returned, ``default`` when neither is, and a ``TypeError`` naming the layer and
    both keywords is raised when both are.

    Examples
    --------
    >>> import etp_nn
    >>> from etp_nn._utils import one_of_keywords
    >>> layer = etp_nn.Linear(2, 3)
    >>> one_of_keywords(layer, ("r_initializer", None), ("r_init", 0.5), default=0.0)
    0.5
    >>> one_of_keywords(layer, ("r_initializer", 1.0), ("r_init", 0.5), default=0.0)
    Traceback (most recent call last):
    ...
    TypeError: Linear: got both r_initializer= and r_init= (r_init is braintrace 0.2.8's name for r_initializer); give one of them.
    """
    (our_keyword, our_value), (peer_keyword, peer_value) = ours, peers
    if our_value is not None and peer_value is not None:
        raise TypeError(
            f"{layer_name(layer)}: got both {our_keyword}= and {peer_keyword}= ({peer_keyword} is braintrace "
            f"0.2.8's name for {our_keyword}); give one of them."
        )
    if our_value is not None:
        return our_value
    return default if peer_value is None else peer_value
