"""The learners under transforms and in their state handling, for D_RTRL and ES_D_RTRL.

* jit: a jitted train step (online gradient + SGD update) matches the eager loop and traces once;
* batching: a batched model equals the unbatched model with the learner call vmapped over the batch
  (``brainstate.transform.vmap``, hidden states and traces declared as batched states);
* units: a hidden state in mV trains end to end; D_RTRL equals BPTT on the mantissas;
* dtype: float64 parameters give float64 traces, a float32 model float32 traces;
* state safety: a call with a wrong input shape raises and changes no state;
* reset: ``reset_state()`` zeroes the traces and the ES_D_RTRL step counter, compiling nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from algorithms_testing import _rel

import etp_primitives as etp
from etp_algorithms import D_RTRL, ES_D_RTRL, ETraceAlgorithm

Array = jax.Array

T, B, I, O, K = 6, 3, 4, 5, 2

LEARNERS: dict[str, Callable[[brainstate.nn.Module], ETraceAlgorithm]] = {
    "D_RTRL": lambda model: D_RTRL(model),
    "ES_D_RTRL": lambda model: ES_D_RTRL(model, 0.8),
}


class LeakyReadout(brainstate.nn.Module):
    """``h' = leak * h + x W + b`` (ETP matmul), then an ETP readout ``h R``; states from ``init_state``."""

    def __init__(self, seed: int, dtype: Any = jnp.float64) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.w = brainstate.ParamState(
            {
                "weight": jnp.asarray(rng.normal(size=(I, O)), dtype=dtype),
                "bias": jnp.asarray(rng.normal(size=(O,)), dtype=dtype),
            }
        )
        self.out = brainstate.ParamState({"weight": jnp.asarray(rng.normal(size=(O, K)), dtype=dtype)})
        self.leak = jnp.asarray(rng.uniform(0.5, 0.95, size=O), dtype=dtype)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        shape = (O,) if batch_size is None else (batch_size, O)
        self.h = brainstate.HiddenState(jnp.zeros(shape, self.dtype))

    def update(self, x: Any) -> Array:
        self.h.value = self.leak * self.h.value + etp.matmul(x, self.w.value["weight"], self.w.value["bias"])
        return etp.matmul(self.h.value, self.out.value["weight"])


def _model(seed: int = 7, batch_size: int | None = B, dtype: Any = jnp.float64) -> LeakyReadout:
    model = LeakyReadout(seed, dtype)
    brainstate.nn.init_all_states(model, batch_size=batch_size)
    return model


def _compiled(kind: str, model: brainstate.nn.Module, x0: Array) -> ETraceAlgorithm:
    learner = LEARNERS[kind](model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(x0)
    return learner


def _data(rng: np.random.Generator, batch: bool = True) -> tuple[Array, Array]:
    lead = (B,) if batch else ()
    xs = jnp.asarray(rng.normal(size=(T, *lead, I)))
    target = jnp.asarray(rng.normal(size=(*lead, K)))
    return xs, target


def _grad_fn(learner: ETraceAlgorithm, model: brainstate.nn.Module, target: Array) -> Callable[[Array], Any]:
    params = model.states(brainstate.ParamState)

    def grads(x: Array) -> Any:
        return brainstate.transform.grad(lambda x: jnp.sum((learner(x) - target) ** 2), params)(x)

    return grads


def _values(states: Any) -> dict[Any, Any]:
    return {path: state.value for path, state in states.items()}


def _assert_tree_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_tree_close(a: Any, b: Any, rtol: float = 1e-12) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-14)


# ---------------------------------------------------------------------------------------------------- 1. jit


def _train_step(
    learner: ETraceAlgorithm, model: brainstate.nn.Module, target: Array, counter: list[int], lr: float = 0.05
) -> Callable[[Array], Any]:
    """One online SGD step; returns the gradients and counts how often it is traced (or run eagerly)."""
    grads = _grad_fn(learner, model, target)
    params = model.states(brainstate.ParamState)

    def step(x: Array) -> Any:
        counter[0] += 1
        g = grads(x)
        for path, state in params.items():
            state.value = jax.tree.map(lambda p, d: p - lr * d, state.value, g[path])
        return g

    return step


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_jitted_train_step_equals_eager_and_traces_once(kind: str, rng: np.random.Generator) -> None:
    xs, target = _data(rng)
    eager_model, jit_model = _model(), _model()
    eager_count, jit_count = [0], [0]
    eager = _train_step(_compiled(kind, eager_model, xs[0]), eager_model, target, eager_count)
    jitted = brainstate.transform.jit(_train_step(_compiled(kind, jit_model, xs[0]), jit_model, target, jit_count))
    for t in range(T):
        eager(xs[t])
        jitted(xs[t])
    assert eager_count[0] == T
    assert jit_count[0] == 1, f"the jitted train step was traced {jit_count[0]} times over {T} calls"
    params_eager = _values(eager_model.states(brainstate.ParamState))
    params_jit = _values(jit_model.states(brainstate.ParamState))
    # the parameters moved, and identically
    assert _rel(params_eager[("w",)]["weight"], _model().w.value["weight"]) > 1e-3
    _assert_tree_close(params_jit, params_eager)
    np.testing.assert_allclose(jit_model.h.value, eager_model.h.value, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------- 2. batching


def _vmapped_call(learner: ETraceAlgorithm, model: brainstate.nn.Module) -> Any:
    states = [*model.states(brainstate.HiddenState).values(), learner.etrace]
    return brainstate.transform.vmap(learner, in_axes=0, in_states={0: states}, out_states={0: states})


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_batched_model_equals_vmapped_unbatched_learner(kind: str, rng: np.random.Generator) -> None:
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    target = jnp.asarray(rng.normal(size=(B, K)))
    lr = 0.05

    batched = _model(batch_size=B)
    learner_b = _compiled(kind, batched, xs[0])

    single = _model(batch_size=None)
    learner_s = _compiled(kind, single, xs[0, 0])
    # give the unbatched model's hidden states and traces a leading batch axis
    for state in single.states(brainstate.HiddenState).values():
        state.value = jnp.broadcast_to(state.value, (B, *jnp.shape(state.value)))
    learner_s.etrace.value = jax.tree.map(lambda v: jnp.broadcast_to(v, (B, *jnp.shape(v))), learner_s.etrace.value)
    call_s = _vmapped_call(learner_s, single)

    def step(call: Any, model: brainstate.nn.Module, x: Array) -> tuple[Any, Array]:
        params = model.states(brainstate.ParamState)
        g, out = brainstate.transform.grad(
            lambda x: _loss_and_out(call, x, target),
            params,
            has_aux=True,
        )(x)
        for path, state in params.items():
            state.value = jax.tree.map(lambda p, d: p - lr * d, state.value, g[path])
        return g, out

    for t in range(T):
        g_b, out_b = step(learner_b, batched, xs[t])
        g_s, out_s = step(call_s, single, xs[t])
        np.testing.assert_allclose(out_s, out_b, rtol=1e-12, atol=1e-14)
        _assert_tree_close(g_s, g_b)
        np.testing.assert_allclose(single.h.value, batched.h.value, rtol=1e-12, atol=1e-14)
        _assert_tree_close(_per_sample_traces(kind, learner_s), _per_sample_traces(kind, learner_b))
    assert float(jnp.abs(g_b[("w",)]["weight"]).sum()) > 0
    assert any(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(learner_s.etrace.value))
    if kind == "ES_D_RTRL":
        np.testing.assert_array_equal(learner_s.etrace.value["steps"], np.full((B,), T))
        assert int(learner_b.etrace.value["steps"]) == T
    _assert_tree_close(_values(single.states(brainstate.ParamState)), _values(batched.states(brainstate.ParamState)))


def _per_sample_traces(kind: str, learner: ETraceAlgorithm) -> Any:
    """The traces with a leading batch axis (ES_D_RTRL's step counter, batched only when vmapped, left out)."""
    value = learner.etrace.value
    return value["relations"] if kind == "ES_D_RTRL" else value


def _loss_and_out(call: Any, x: Array, target: Array) -> tuple[Array, Array]:
    out = call(x)
    return jnp.sum((out - target) ** 2), out


# ---------------------------------------------------------------------------------------------------- 3. units


class LeakyMV(brainstate.nn.Module):
    """A leaky integrator in mV: ``V' = a V + (x W) mV``; the output is ``V`` in mV."""

    def __init__(self, w: Array, a: Array) -> None:
        super().__init__()
        self.a = a
        self.w = brainstate.ParamState({"weight": w})
        self.v = brainstate.HiddenState(jnp.zeros((B, w.shape[1])) * u.mV)

    def update(self, x: Any) -> Any:
        self.v.value = self.a * self.v.value + etp.matmul(x, self.w.value["weight"]) * u.mV
        return self.v.value


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_hidden_state_in_millivolts_trains_end_to_end(kind: str, rng: np.random.Generator) -> None:
    w0 = jnp.asarray(rng.normal(size=(I, O)))
    a = jnp.asarray(rng.uniform(0.5, 0.95, size=O))
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    r = jnp.asarray(rng.normal(size=(B, O)))
    model = LeakyMV(w0, a)
    learner = _compiled(kind, model, xs[0])
    params = model.states(brainstate.ParamState)

    def loss_of(out: Any) -> Array:
        return jnp.sum(r * jnp.sin(out.to_decimal(u.mV)))

    steps = T if kind == "D_RTRL" else 1  # ES_D_RTRL is exact at T = 1 only
    total: Any = None
    for t in range(steps):
        g = brainstate.transform.grad(lambda x: loss_of(learner(x)), params)(xs[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    assert isinstance(model.v.value, u.Quantity) and model.v.value.unit == u.mV

    def bptt(w: Array) -> Array:
        v, loss = jnp.zeros((B, O)), jnp.zeros(())
        for t in range(steps):
            v = a * v + xs[t] @ w
            loss = loss + jnp.sum(r * jnp.sin(v))
        return loss

    got = u.get_mantissa(total[("w",)]["weight"])
    assert got.dtype == jnp.float64
    assert _rel(got, jax.grad(bptt)(w0)) < 1e-10

    # end to end: SGD steps under jit keep the unit of V and lower the loss of a fixed sequence
    def run_loss() -> float:
        model.v.value = jnp.zeros((B, O)) * u.mV
        learner.reset_state()
        return float(sum(loss_of(learner(xs[t])) for t in range(T)))

    @brainstate.transform.jit
    def train(x: Array) -> None:
        g = brainstate.transform.grad(lambda x: loss_of(learner(x)), params)(x)
        model.w.value = jax.tree.map(lambda p, d: p - 0.01 * d, model.w.value, g[("w",)])

    before = run_loss()
    for _ in range(5):
        model.v.value = jnp.zeros((B, O)) * u.mV
        learner.reset_state()
        for t in range(T):
            train(xs[t])
    after = run_loss()
    assert model.v.value.unit == u.mV
    assert np.isfinite(after) and after < before


# ---------------------------------------------------------------------------------------------------- 4. dtype


@pytest.mark.parametrize("kind", list(LEARNERS))
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_trace_dtype_follows_parameters(kind: str, dtype: Any, rng: np.random.Generator) -> None:
    xs, target = _data(rng)
    xs, target = xs.astype(dtype), target.astype(dtype)
    model = _model(dtype=dtype)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(_values(model.states(brainstate.ParamState))))
    learner = _compiled(kind, model, xs[0])
    grads = _grad_fn(learner, model, target)

    def check() -> None:
        leaves = jax.tree.leaves(learner.etrace.value)
        assert leaves
        floats = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
        # the only non-float leaf allowed is ES_D_RTRL's integer step counter
        others = [leaf for leaf in leaves if not jnp.issubdtype(leaf.dtype, jnp.floating)]
        assert len(others) == (1 if kind == "ES_D_RTRL" else 0)
        assert all(jnp.issubdtype(leaf.dtype, jnp.integer) and leaf.shape == () for leaf in others)
        assert floats and all(leaf.dtype == dtype for leaf in floats), [leaf.dtype for leaf in floats]

    check()
    for t in range(3):
        g = grads(xs[t])
        check()
        assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(g))
    assert model.h.value.dtype == dtype


# ---------------------------------------------------------------------------------------------------- 5. state safety


@pytest.mark.parametrize("kind", list(LEARNERS))
@pytest.mark.parametrize("bad_shape", [(B, I + 1), (B + 1, I), (I,)])
def test_wrong_input_shape_raises_and_changes_nothing(
    kind: str, bad_shape: tuple[int, ...], rng: np.random.Generator
) -> None:
    xs, target = _data(rng)
    model = _model()
    learner = _compiled(kind, model, xs[0])
    grads = _grad_fn(learner, model, target)
    for t in range(3):  # non-trivial hidden states and traces
        grads(xs[t])
    assert any(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(learner.etrace.value))

    def snapshot() -> tuple[Any, Any, Any]:
        return (
            _values(model.states(brainstate.HiddenState)),
            jax.tree.map(jnp.array, learner.etrace.value),
            _values(model.states(brainstate.ParamState)),
        )

    before = snapshot()
    bad = jnp.asarray(rng.normal(size=bad_shape))
    with pytest.raises(ValueError, match="input shapes"):
        learner(bad)
    _assert_tree_equal(snapshot(), before)
    with pytest.raises(ValueError, match="input shapes"):
        grads(bad)
    _assert_tree_equal(snapshot(), before)
    with pytest.raises(ValueError, match="input shapes"):
        brainstate.transform.jit(grads)(bad)
    _assert_tree_equal(snapshot(), before)
    # and the learner still works after the failures
    grads(xs[3])


# ---------------------------------------------------------------------------------------------------- 6. reset


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_reset_state_restarts_traces_and_bias_correction(kind: str, rng: np.random.Generator) -> None:
    xs, target = _data(rng)
    model = _model()
    learner = _compiled(kind, model, xs[0])
    initial = jax.tree.map(jnp.array, learner.etrace.value)
    grads = _grad_fn(learner, model, target)
    for t in range(4):
        grads(xs[t])
    assert any(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(learner.etrace.value))
    if kind == "ES_D_RTRL":
        assert int(learner.etrace.value["steps"]) == 4

    hidden = _values(model.states(brainstate.HiddenState))
    compiles: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kwargs: compiles.append(event) if event.endswith("backend_compile_duration") else None
    )
    jax.clear_caches()  # so that a zeros kernel compiled earlier in this process cannot hide a compilation
    learner.reset_state()
    assert not compiles, "reset_state() compiled XLA programs; zero traces are made on the host"
    _assert_tree_equal(learner.etrace.value, initial)
    assert all(float(jnp.abs(leaf).sum()) == 0 for leaf in jax.tree.leaves(learner.etrace.value))
    if kind == "ES_D_RTRL":
        assert int(learner.etrace.value["steps"]) == 0
    # reset_state() leaves the model's hidden states alone
    _assert_tree_equal(_values(model.states(brainstate.HiddenState)), hidden)

    after_reset = grads(xs[4])
    traces_after_reset = learner.etrace.value

    # a fresh learner on the same model, from the same hidden states
    for path, state in model.states(brainstate.HiddenState).items():
        state.value = hidden[path]
    fresh = _compiled(kind, model, xs[0])
    first = _grad_fn(fresh, model, target)(xs[4])
    _assert_tree_close(after_reset, first, rtol=1e-13)
    _assert_tree_close(traces_after_reset, fresh.etrace.value, rtol=1e-13)

    # the reset matters: without it the step-5 gradient differs from the first-step one
    for path, state in model.states(brainstate.HiddenState).items():
        state.value = hidden[path]
    stale = _compiled(kind, model, xs[0])
    stale_grads = _grad_fn(stale, model, target)
    for t in range(4):
        stale_grads(xs[t])
    for path, state in model.states(brainstate.HiddenState).items():
        state.value = hidden[path]
    not_reset = stale_grads(xs[4])
    assert _rel(not_reset[("w",)]["weight"], first[("w",)]["weight"]) > 1e-6
