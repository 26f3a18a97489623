"""ModuleInfo owns the step jaxpr's invar order: flatten inputs, read and unflatten outputs, find and write states.

The oracle is the model itself: the step jaxpr evaluated by ``jax.core.eval_jaxpr``
on ``flatten_inputs(...)`` must give what calling the model gives (its output
and the states it leaves behind).
"""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_compiler
import etp_primitives as etp
from etp_compiler import ModuleInfo, extract_module_info


class Leaky(brainstate.nn.Module):
    def __init__(self, n_in: int, n: int, seed: int) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = brainstate.ParamState({"weight": jnp.asarray(rng.normal(size=(n_in, n))), "bias": jnp.ones(n) * 0.1})
        self.scale = brainstate.ParamState(jnp.asarray(rng.uniform(0.5, 1.5, size=n)))
        self.h = brainstate.HiddenState(jnp.asarray(rng.normal(size=n)))
        self.log = brainstate.ShortTermState(jnp.zeros(n))
        self.count = brainstate.ShortTermState(jnp.zeros(()))

    def update(self, x: Any) -> Any:
        self.h.value = 0.9 * jnp.tanh(self.h.value) + etp.matmul(x, self.w.value["weight"], self.w.value["bias"])
        self.log.value = self.h.value * self.scale.value
        self.count.value = self.count.value + 1.0
        return self.h.value


class Net(brainstate.nn.Module):
    """Two layers and a structured output (a dict holding a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Leaky(3, 4, seed=1)
        self.b = Leaky(4, 2, seed=2)

    def update(self, x: Any, gain: Any) -> Any:
        h = self.a(x)
        out = self.b(h * gain)
        return {"out": out, "extra": (h.sum(), out * 2.0)}


def _net() -> tuple[Net, ModuleInfo, tuple[jax.Array, jax.Array]]:
    model = Net()
    args = (jnp.linspace(-1.0, 1.0, 3), jnp.asarray(0.7))
    return model, extract_module_info(model, *args), args


def _leaves_by_path(minfo: ModuleInfo) -> dict[Any, list[Any]]:
    return {path: jax.tree.leaves(state.value) for path, state in minfo.weight_states.items()}


def _others(minfo: ModuleInfo) -> list[list[Any]]:
    return [jax.tree.leaves(minfo.state_at(p).value) for p in minfo.other_state_paths]


def _call_model(model: Net, args: Any) -> tuple[Any, dict[Any, Any]]:
    """The oracle: call the model itself; return its output and every state's value afterwards."""
    out = model(*args)
    return out, {path: state.value for path, state in model.states().items()}


def test_flatten_inputs_feeds_the_step_jaxpr_what_the_model_computes() -> None:
    model, minfo, args = _net()
    invals = minfo.flatten_inputs(_leaves_by_path(minfo), _others(minfo), minfo.flatten_args(*args))
    assert len(invals) == len(minfo.jaxpr.invars)
    outs = jax.core.eval_jaxpr(minfo.jaxpr, minfo.closed_jaxpr.consts, *invals)
    env = dict(zip(minfo.jaxpr.outvars, outs, strict=True))
    outputs, new_states = minfo.read_outputs(env)
    expected_out, expected_states = _call_model(model, args)
    jax.tree.map(np.testing.assert_allclose, minfo.unflatten_outputs(outputs), expected_out)
    assert set(new_states) == set(minfo.state_outvars)
    for path, leaves in new_states.items():
        jax.tree.map(np.testing.assert_allclose, minfo.unflatten_state(path, leaves), expected_states[path])


def test_weights_by_path_in_any_order_or_by_position_give_the_same_inputs() -> None:
    _, minfo, args = _net()
    by_path = _leaves_by_path(minfo)
    reference = minfo.flatten_inputs(by_path, _others(minfo), minfo.flatten_args(*args))
    shuffled = dict(reversed(list(by_path.items())))
    positional = [by_path[p] for p in minfo.weight_states]
    for weights in (shuffled, positional):
        again = minfo.flatten_inputs(weights, _others(minfo), minfo.flatten_args(*args))
        assert len(again) == len(reference) and all(a is b for a, b in zip(again, reference, strict=True))
    # the arguments come first, then each compiled state's leaves in invar order
    assert reference[0] is args[0] and reference[1] is args[1]
    assert all(np.array_equal(a, b) for a, b in zip(minfo.current_inputs(*args), reference, strict=True))
    weights, others = minfo.current_state_leaves()
    assert len(weights) == len(minfo.weight_states) and len(others) == len(minfo.other_state_paths)


def test_current_inputs_match_the_invars_one_by_one() -> None:
    _, minfo, args = _net()
    invals = minfo.current_inputs(*args)
    for var, value in zip(minfo.jaxpr.invars, invals, strict=True):
        assert tuple(var.aval.shape) == tuple(np.shape(value))
    for path, invars in minfo.state_invars.items():
        leaves = jax.tree.leaves(minfo.state_at(path).value)
        position = minfo.jaxpr.invars.index(invars[0])
        for offset, leaf in enumerate(leaves):
            np.testing.assert_array_equal(invals[position + offset], leaf)


def test_weight_env_maps_each_leaf_invar_to_its_value() -> None:
    _, minfo, _ = _net()
    by_path = _leaves_by_path(minfo)
    env = minfo.weight_env(by_path)
    assert set(env) == set(minfo.invar_to_weight_path)
    for var, (path, keys) in minfo.invar_to_weight_path.items():
        value = minfo.weight_states[path].value
        for key in keys:
            value = value[key]
        assert env[var] is value
    positional = minfo.weight_env([by_path[p] for p in minfo.weight_states])
    assert all(positional[v] is env[v] for v in env)


def test_read_outputs_and_unflatten_outputs_from_run_step() -> None:
    model, minfo, args = _net()
    env = etp_compiler.run_step(minfo, minfo.current_inputs(*args))
    outputs, new_states = minfo.read_outputs(env)
    expected_out, expected_states = _call_model(model, args)
    from_env = minfo.unflatten_outputs(env)
    from_leaves = minfo.unflatten_outputs(outputs)
    assert jax.tree.structure(from_env) == jax.tree.structure(expected_out) == jax.tree.structure(from_leaves)
    jax.tree.map(np.testing.assert_allclose, from_env, expected_out)
    np.testing.assert_allclose(new_states[("b", "count")][0], expected_states[("b", "count")])
    with pytest.raises(ValueError, match="the step has 3 output leaves, got 1"):
        minfo.unflatten_outputs(outputs[:1])


def test_write_states_stores_the_new_values_with_their_structure() -> None:
    model, minfo, args = _net()
    env = etp_compiler.run_step(minfo, minfo.current_inputs(*args))
    _, new_states = minfo.read_outputs(env)
    minfo.write_states(new_states)
    _, expected_states = _call_model(Net(), args)  # a fresh model called once: same initial states (seeded)
    for path in new_states:
        jax.tree.map(np.testing.assert_allclose, model.states()[path].value, expected_states[path])
    # a dict-valued ParamState keeps its keys
    leaves = jax.tree.leaves(model.a.w.value)
    minfo.write_states({("a", "w"): [leaf * 2 for leaf in leaves]})
    assert set(model.a.w.value) == {"weight", "bias"}
    np.testing.assert_allclose(model.a.w.value["bias"], 0.2 * np.ones(4))


def test_state_at_returns_the_model_states_and_names_unknown_paths() -> None:
    model, minfo, _ = _net()
    assert minfo.state_at(("a", "h")) is model.a.h
    assert minfo.state_at(["b", "w"]) is model.b.w
    assert minfo.compiled_state_paths == tuple(minfo.state_paths[id(s)] for s in minfo.compiled_model_states)
    assert set(minfo.other_state_paths) == set(minfo.hidden_states) | set(minfo.other_states)
    with pytest.raises(KeyError, match=r"touches no state at a\.nope; its states: .*a\.h"):
        minfo.state_at(("a", "nope"))


def test_wrong_inputs_are_named() -> None:
    _, minfo, args = _net()
    by_path, others, arg_leaves = _leaves_by_path(minfo), _others(minfo), minfo.flatten_args(*args)
    missing = {p: v for p, v in by_path.items() if p != ("b", "scale")}
    with pytest.raises(ValueError, match=r"no leaves given for the ParamState\(s\) b\.scale"):
        minfo.flatten_inputs(missing, others, arg_leaves)
    with pytest.raises(ValueError, match=r"a\.h: not a ParamState of the step"):
        minfo.flatten_inputs({**by_path, ("a", "h"): [jnp.zeros(4)]}, others, arg_leaves)
    with pytest.raises(ValueError, match=r"state a\.w has 2 leaves in the step, got 1"):
        minfo.flatten_inputs({**by_path, ("a", "w"): by_path[("a", "w")][:1]}, others, arg_leaves)
    with pytest.raises(ValueError, match=r"expected the leaves of 6 non-parameter states"):
        minfo.flatten_inputs(by_path, others[:-1], arg_leaves)
    with pytest.raises(ValueError, match=r"expected 2 argument leaves, got 1"):
        minfo.flatten_inputs(by_path, others, arg_leaves[:1])
    with pytest.raises(ValueError, match=r"expected the leaves of 4 ParamStates, got 3"):
        minfo.flatten_inputs(list(by_path.values())[:3], others, arg_leaves)
    with pytest.raises(ValueError, match=r"compiled for 2 argument leaves, got 1"):
        minfo.flatten_args(args[0])


def test_dict_holds_every_field() -> None:
    _, minfo, _ = _net()
    fields = minfo.dict()
    assert type(fields) is dict and list(fields) == list(ModuleInfo._fields)
    assert all(fields[name] is getattr(minfo, name) for name in ModuleInfo._fields)
