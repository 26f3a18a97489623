"""``jit_in_place``: the same steps as ``brainstate.transform.jit``, with the written states donated.

* a train step (online gradient + SGD) of either learner gives, call after call, the same
  gradients, parameters, hidden states and traces as under ``brainstate.transform.jit``, and
  traces once;
* the arrays that were the written states' values are deleted by a call (donated), the
  read-only ones and the arguments are not;
* states sharing one array, or an argument that is a state's array, work (copied, not donated twice);
* a step that fails to trace leaves every state as it was.
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_learner_transforms import (
    LEARNERS,
    _assert_tree_equal,
    _compiled,
    _data,
    _grad_fn,
    _model,
    _train_step,
    _values,
)

from etp_algorithms import EligibilityTrace, jit_in_place

Array = jax.Array


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_same_steps_as_brainstate_jit(kind: str, rng: np.random.Generator) -> None:
    xs, target = _data(rng)
    reference_model, in_place_model = _model(), _model()
    reference_learner = _compiled(kind, reference_model, xs[0])
    in_place_learner = _compiled(kind, in_place_model, xs[0])
    reference_count, in_place_count = [0], [0]
    reference = brainstate.transform.jit(_train_step(reference_learner, reference_model, target, reference_count))
    in_place = jit_in_place(_train_step(in_place_learner, in_place_model, target, in_place_count))
    for t in range(xs.shape[0]):
        _assert_tree_equal(in_place(xs[t]), reference(xs[t]))
    assert in_place_count[0] == 1, f"traced {in_place_count[0]} times"
    for state_type in (brainstate.ParamState, brainstate.HiddenState):
        _assert_tree_equal(_values(in_place_model.states(state_type)), _values(reference_model.states(state_type)))
    _assert_tree_equal(
        _values(in_place_learner.states(EligibilityTrace)), _values(reference_learner.states(EligibilityTrace))
    )


def test_written_states_are_donated_read_ones_are_not(rng: np.random.Generator) -> None:
    xs, target = _data(rng)
    model = _model()
    learner = _compiled("D_RTRL", model, xs[0])
    grads = _grad_fn(learner, model, target)
    step = jit_in_place(lambda x: grads(x))  # no update: the parameters are only read
    step(xs[0])  # the first call may copy states initialised from one shared array
    traces_before = [state.value for state in learner.states(EligibilityTrace).values()]
    params_before = [state.value for state in model.states(brainstate.ParamState).values()]
    hidden_before = model.h.value
    x = xs[1]
    step(x)
    assert traces_before and all(leaf.is_deleted() for leaf in jax.tree.leaves(traces_before))
    assert hidden_before.is_deleted()
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params_before))
    assert not x.is_deleted()
    # the states hold the new, live values
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(_values(learner.states(EligibilityTrace))))


def test_shared_and_argument_buffers_are_copied_not_donated_twice() -> None:
    zeros = jnp.zeros(3)
    first, second = brainstate.State(zeros), brainstate.State(zeros)

    @jit_in_place
    def step(x: Array) -> Array:
        first.value = first.value + x
        second.value = second.value + 2 * x
        return first.value + second.value

    np.testing.assert_array_equal(step(zeros + 1), [3.0, 3.0, 3.0])
    np.testing.assert_array_equal(first.value, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(second.value, [2.0, 2.0, 2.0])
    # a state's own array passed as the argument stays usable
    argument = first.value
    np.testing.assert_array_equal(step(argument), [6.0, 6.0, 6.0])
    assert not argument.is_deleted()
    np.testing.assert_array_equal(argument, [1.0, 1.0, 1.0])
    # the shared array was a written state's value: donated once (as documented)
    assert zeros.is_deleted()


def test_a_step_that_fails_to_trace_changes_nothing() -> None:
    counter = brainstate.State(jnp.arange(3.0))

    @jit_in_place
    def step(x: Array) -> Array:
        counter.value = counter.value + x
        return counter.value

    before = counter.value
    with pytest.raises(TypeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step(jnp.ones(4))  # (3,) + (4,) does not broadcast
    assert counter.value is before and not before.is_deleted()
    np.testing.assert_array_equal(step(jnp.ones(3)), [1.0, 2.0, 3.0])


def test_static_arguments_as_in_jax_jit() -> None:
    """A Python loop length (positional) and a mode (keyword) as static arguments: each value is its own program,
    and the states end as under brainstate.transform.jit with the same static arguments."""
    ours, theirs = brainstate.State(jnp.zeros(3)), brainstate.State(jnp.zeros(3))
    traced = []

    def make(state: brainstate.State) -> Any:
        def step(x: Array, times: int, mode: str = "add") -> Array:
            traced.append((times, mode))
            for _ in range(times):
                state.value = state.value + x if mode == "add" else state.value * x
            return state.value.sum()

        return step

    fast = jit_in_place(make(ours), static_argnums=1, static_argnames="mode")
    slow = brainstate.transform.jit(make(theirs), static_argnums=1, static_argnames="mode")
    for times, mode in [(2, "add"), (3, "add"), (2, "mul"), (2, "add")]:
        x = jnp.asarray([1.0, 2.0, 0.5])
        np.testing.assert_array_equal(fast(x, times, mode=mode), slow(x, times, mode=mode))
        np.testing.assert_array_equal(ours.value, theirs.value)
    assert sorted(set(traced)) == [(2, "add"), (2, "mul"), (3, "add")]
    assert len(traced) == 6  # three programs each, the repeated (2, "add") not traced again
    decorated = jit_in_place(static_argnums=(1,), static_argnames=("mode",))(make(brainstate.State(jnp.zeros(3))))
    assert float(decorated(jnp.ones(3), 1, mode="add")) == 3.0  # the decorator form
    for bad, message in [
        (dict(static_argnums="1"), "static_argnums must be ints"),
        (dict(static_argnums=(True,)), "static_argnums must be ints"),
        (dict(static_argnums=-1), "non-negative"),
        (dict(static_argnames=(1,)), "static_argnames must be strs"),
    ]:
        with pytest.raises(TypeError, match=message):
            jit_in_place(make(brainstate.State(jnp.zeros(3))), **bad)  # type: ignore[arg-type]
