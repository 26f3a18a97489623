"""The one place where etp_algorithms touches JAX and brainstate internals."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import brainstate
import jax
import jax.numpy as jnp

__all__ = [
    "assign_state_values",
    "inside_staging",
    "is_batched",
    "is_tracer",
    "read_state_values",
    "stateful_function",
    "traced_states",
]


# brainstate's state tracing, as jit_in_place uses it (the same API on brainstate 0.5.4 and 0.6).


def stateful_function(
    fun: Callable[..., Any], name: str, static_argnums: tuple[int, ...] = (), static_argnames: tuple[str, ...] = ()
) -> Any:
    """A ``brainstate.transform.StatefulFunction`` returning only the states it writes."""
    return brainstate.transform.StatefulFunction(
        fun, name=name, return_only_write=True, static_argnums=static_argnums, static_argnames=static_argnames
    )


def traced_states(stateful: Any, *args: Any, **kwargs: Any) -> tuple[Any, tuple[bool, ...], list[Any]]:
    """``(state_trace, written flag per state, current values per state)`` for these arguments (traced once)."""
    state_trace = stateful.get_state_trace(*args, compile_if_miss=True, **kwargs)
    written = tuple(bool(flag) for flag in state_trace.been_writen)
    return state_trace, written, list(state_trace.get_state_values())


def read_state_values(state_trace: Any) -> Any:
    """The values of the states the traced call only reads (to restore them after the call)."""
    return state_trace.get_read_state_values(True)


def assign_state_values(state_trace: Any, read_values: Any, written_values: Sequence[Any]) -> None:
    """Restore the read states and write ``written_values`` (``None`` for a read state) into the others."""
    state_trace.assign_state_vals_v2(read_values, list(written_values))


def inside_staging() -> bool:
    """Whether array ops are being staged (inside ``jit`` or another tracing transform), not run eagerly.

    With JAX's stackless tracing, any op made now is bound to the innermost trace: a tracer under a
    staging transform, a concrete array when nothing traces.
    """
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def is_tracer(value: object) -> bool:
    """Whether ``value`` is a traced (abstract) JAX value rather than a concrete one."""
    return isinstance(value, jax.core.Tracer)


def is_batched(value: Any) -> bool:
    """Whether ``value`` is being mapped by ``vmap`` right now (a batching tracer).

    Told by the tracer's class name: JAX exports no public batching-tracer type on every supported
    version (``jax.interpreters.batching.BatchTracer`` is gone from jax 0.12's public names).
    """
    return isinstance(value, jax.core.Tracer) and type(value).__name__ == "BatchTracer"
