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


def jit_in_place(
    fun: Callable[..., Out] | None = None,
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
) -> Any:
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
    fun : callable, optional
        The step, reading and writing :class:`brainstate.State` objects. Without it,
        ``jit_in_place(static_argnums=...)`` returns the decorator.
    static_argnums, static_argnames : int, str or sequences of them
        As in :func:`jax.jit`: arguments that are Python values (a number of sub-steps, a
        mode string), hashed into the compilation key rather than traced; each new value
        compiles the step again. Every other argument is traced (a Python number there
        becomes a traced scalar, so it cannot set a shape or a loop length).

    Returns
    -------
    callable
        ``fun`` jitted; same arguments and outputs, same state updates as
        :func:`brainstate.transform.jit`.

    Raises
    ------
    TypeError
        A static argument index that is not an int, or a name that is not a str.

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
    >>> @etp_algorithms.jit_in_place(static_argnums=1)
    ... def repeat(x, times):
    ...     for _ in range(times):  # a Python loop: times must be static
    ...         counter.value = counter.value + x
    ...     return counter.value.sum()
    >>> float(repeat(jnp.ones(3), 2))
    12.0
    """
    nums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
    if any(isinstance(n, bool) or not isinstance(n, int) for n in nums):
        raise TypeError(f"jit_in_place: static_argnums must be ints, got {static_argnums!r}.")
    if any(not isinstance(n, str) for n in names):
        raise TypeError(f"jit_in_place: static_argnames must be strs, got {static_argnames!r}.")
    if fun is None:
        return functools.partial(jit_in_place, static_argnums=nums, static_argnames=names)
    if any(n < 0 for n in nums):
        raise TypeError(f"jit_in_place: static_argnums must be non-negative positions, got {static_argnums!r}.")
    stateful = stateful_function(fun, "jit_in_place", static_argnums=nums, static_argnames=names)

    def run(written_values: Any, read_values: Any, written: tuple[bool, ...], *args: Any, **kwargs: Any) -> Any:
        written_iter, read_iter = iter(written_values), iter(read_values)
        state_values = tuple(next(written_iter) if flag else next(read_iter) for flag in written)
        new_values, out = stateful.jaxpr_call(state_values, *args, **kwargs)
        return tuple(value for value, flag in zip(new_values, written, strict=True) if flag), out

    # run's own leading arguments: the written and read state values, the static written flags
    compiled = jax.jit(run, static_argnums=(2, *(3 + n for n in nums)), static_argnames=names, donate_argnums=0)

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
