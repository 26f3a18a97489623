"""``jit_in_place``: a jitted step whose written states are updated in place (donated buffers)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from ._compat import assign_state_values, read_state_values, stateful_function, traced_states

__all__ = ["jit_in_place"]

Out = TypeVar("Out")


def _undonated_copies(written: Sequence[Any], others: Sequence[Any]) -> tuple[Any, ...]:
    """``written`` with a copy of every leaf whose buffer is also passed elsewhere in the call.

    XLA refuses to donate one buffer twice, and donating a buffer that is also a plain
    argument would delete that argument; states initialised from one shared array (zeros,
    typically) hit this on the first call only.
    """
    seen = {id(leaf) for leaf in jax.tree.leaves(others)}

    def fresh(leaf: Any) -> Any:
        if id(leaf) in seen:
            return jnp.array(leaf, copy=True)
        seen.add(id(leaf))
        return leaf

    return tuple(jax.tree.map(fresh, value) for value in written)


def jit_in_place(fun: Callable[..., Out]) -> Callable[..., Out]:
    r"""Like :func:`brainstate.transform.jit`, but the states the step writes are donated to XLA.

    An online learner's traces are read and rewritten at every step. Called step by step
    from Python under :func:`brainstate.transform.jit`, every call allocates fresh output
    buffers for them (and, on CPU, faults the new pages in), which can cost several times
    the step itself for D_RTRL's parameter-sized traces. Here the buffers of every state the
    step writes (eligibility traces, hidden states, the bias-correction counter, parameters
    updated by an optimiser) are donated, so XLA writes the new values where the old ones
    were. States only read are passed as usual.

    Inside a loop that is already jitted (``for_loop``/``scan``) the carry is updated in
    place anyway; this matters for steps called one at a time.

    Parameters
    ----------
    fun : callable
        The step, reading and writing :class:`brainstate.State` objects; positional and
        keyword array arguments (no static arguments).

    Returns
    -------
    callable
        ``fun`` jitted; same arguments and outputs, same state updates as
        :func:`brainstate.transform.jit`.

    Notes
    -----
    After a call, the arrays that were the written states' values before it are deleted
    (JAX's donation): keep a copy (``jnp.array(state.value)``) of any value you want to
    look at later, rather than the array itself. States initialised from one shared array
    are copied on the first call instead of donated twice.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_algorithms
    >>> counter = brainstate.State(jnp.zeros(3))
    >>> @etp_algorithms.jit_in_place
    ... def step(x):
    ...     counter.value = counter.value + x
    ...     return counter.value.sum()
    >>> float(step(jnp.ones(3))), float(step(jnp.ones(3)))
    (3.0, 6.0)
    """
    stateful = stateful_function(fun, "jit_in_place")

    def run(written_values: Any, read_values: Any, written: tuple[bool, ...], *args: Any, **kwargs: Any) -> Any:
        written_iter, read_iter = iter(written_values), iter(read_values)
        state_values = tuple(next(written_iter) if flag else next(read_iter) for flag in written)
        new_values, out = stateful.jaxpr_call(state_values, *args, **kwargs)
        return tuple(value for value, flag in zip(new_values, written, strict=True) if flag), out

    compiled = jax.jit(run, static_argnums=2, donate_argnums=0)

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        state_trace, written, values = traced_states(stateful, *args, **kwargs)
        read_values = tuple(value for value, flag in zip(values, written, strict=True) if not flag)
        written_values = _undonated_copies(
            [value for value, flag in zip(values, written, strict=True) if flag], [read_values, args, kwargs]
        )
        restore_read = read_state_values(state_trace)
        new_written, out = compiled(written_values, read_values, written, *args, **kwargs)
        new_iter = iter(new_written)
        assign_state_values(state_trace, restore_read, [next(new_iter) if flag else None for flag in written])
        return out

    return call
