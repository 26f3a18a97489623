"""``ETraceVmap`` and ``compile(..., vmap=True)`` against the learner of the batched model (float64, 1e-12).

A per-sample learner mapped over the batch must give the outputs, the online
gradients (summed over the batch through the shared parameters), the hidden
states and the traces of a learner built on the batched model, step after
step with SGD updates in between, for D_RTRL and ES_D_RTRL.
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

import etp_algorithms
import etp_primitives as etp
from etp_algorithms import D_RTRL, ES_D_RTRL, ETraceAlgorithm, ETraceVmap

Array = jax.Array
T, B, I, O, K = 5, 3, 4, 5, 2

LEARNERS: dict[str, Callable[[brainstate.nn.Module], ETraceAlgorithm]] = {
    "D_RTRL": lambda model: D_RTRL(model),
    "ES_D_RTRL": lambda model: ES_D_RTRL(model, 0.8),
}
NAMES = {"D_RTRL": ("d_rtrl", {}), "ES_D_RTRL": ("es_d_rtrl", {"decay_or_rank": 0.8})}


class Leaky(brainstate.nn.Module):
    """``h' = a * tanh(h) + x W + b``, output ``h R`` (both ETP ops); ``h`` from ``init_state`` (random if asked)."""

    def __init__(self, seed: int = 3, random_start: bool = False) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.random_start = random_start
        self.w = brainstate.ParamState(
            {"weight": jnp.asarray(rng.normal(size=(I, O))), "bias": jnp.asarray(rng.normal(size=O))}
        )
        self.r = brainstate.ParamState({"weight": jnp.asarray(rng.normal(size=(O, K)))})
        self.a = jnp.asarray(rng.uniform(0.5, 0.95, size=O))

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        shape = (O,) if batch_size is None else (batch_size, O)
        start = brainstate.random.normal(size=shape) if self.random_start else jnp.zeros(shape)
        self.h = brainstate.HiddenState(jnp.asarray(start, jnp.float64))

    def update(self, x: Array) -> Array:
        self.h.value = self.a * jnp.tanh(self.h.value) + etp.matmul(x, self.w.value["weight"], self.w.value["bias"])
        return etp.matmul(self.h.value, self.r.value["weight"])


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _batched_learner(kind: str, x0: Array) -> tuple[ETraceAlgorithm, Leaky]:
    model = Leaky()
    brainstate.nn.init_all_states(model, batch_size=B)
    learner = LEARNERS[kind](model)
    _quiet(lambda: learner.compile_graph(x0))
    return learner, model


def _per_sample_learner(kind: str, x0: Array) -> tuple[ETraceAlgorithm, Leaky]:
    model = Leaky()
    brainstate.nn.init_all_states(model)
    learner = LEARNERS[kind](model)
    _quiet(lambda: learner.compile_graph(x0[0]))
    return learner, model


def _traces(kind: str, learner: ETraceAlgorithm) -> Any:
    """Per-sample traces (ES_D_RTRL's step counter, batched only when vmapped, left out)."""
    value = learner.etrace.value
    return value.relations if kind == "ES_D_RTRL" else value


def _close(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-14)


def _run_and_compare(kind: str, call_b: Any, model_b: Leaky, learner_b: ETraceAlgorithm, call_s: Any,
                     model_s: Leaky, learner_s: ETraceAlgorithm, rng: np.random.Generator) -> None:  # fmt: skip
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    target = jnp.asarray(rng.normal(size=(B, K)))

    def step(call: Any, model: Leaky, x: Array) -> tuple[Any, Array]:
        params = model.states(brainstate.ParamState)

        def loss(x: Array) -> tuple[Array, Array]:
            out = call(x)
            return jnp.sum((out - target) ** 2), out

        g, out = brainstate.transform.grad(loss, params, has_aux=True)(x)
        for path, state in params.items():
            state.value = jax.tree.map(lambda p, d: p - 0.05 * d, state.value, g[path])
        return g, out

    for t in range(T):
        g_b, out_b = step(call_b, model_b, xs[t])
        g_s, out_s = step(call_s, model_s, xs[t])
        assert out_s.shape == (B, K)
        _close(out_s, out_b)
        _close(g_s, g_b)
        _close(model_s.h.value, model_b.h.value)
        _close(_traces(kind, learner_s), _traces(kind, learner_b))
    assert float(jnp.abs(g_b[("w",)]["weight"]).sum()) > 0
    assert any(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(learner_s.etrace.value))
    if kind == "ES_D_RTRL":
        np.testing.assert_array_equal(learner_s.etrace.value.steps, np.full((B,), T))


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_etrace_vmap_equals_batched_learner(kind: str, rng: np.random.Generator) -> None:
    x0 = jnp.zeros((B, I))
    learner_b, model_b = _batched_learner(kind, x0)
    learner_s, model_s = _per_sample_learner(kind, x0)
    wrapped = ETraceVmap(learner_s, axis_size=B)
    assert isinstance(wrapped, brainstate.nn.Vmap) and wrapped.module is learner_s and wrapped.batch_size == B
    assert model_s.h.value.shape == (B, O)  # the batch axis, given at construction
    _run_and_compare(kind, learner_b, model_b, learner_b, wrapped, model_s, learner_s, rng)


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_compile_vmap_equals_compile_batched(kind: str, rng: np.random.Generator) -> None:
    name, options = NAMES[kind]
    x0 = jnp.asarray(rng.normal(size=(B, I)))
    model_b, model_s = Leaky(), Leaky()
    learner_b = _quiet(lambda: etp_algorithms.compile(model_b, name, x0, batch_size=B, **options))
    wrapped = _quiet(lambda: etp_algorithms.compile(model_s, name, x0, batch_size=B, vmap=True, **options))
    assert isinstance(wrapped, ETraceVmap) and type(wrapped.module) is type(learner_b)
    assert model_s.h.value.shape == (B, O)
    assert wrapped.module.graph.module_info.hidden_states[("h",)] is model_s.h
    # the per-sample graph: the hidden state of one sample
    assert wrapped.module.graph.hidden_groups[0].varshape == (O,)
    _run_and_compare(kind, learner_b, model_b, learner_b, wrapped, model_s, wrapped.module, rng)


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_compile_vmap_lanes_start_as_the_batched_model(kind: str, rng: np.random.Generator) -> None:
    """Each lane starts where the batched model's init_all_states put that sample (same seed), not a copy."""
    name, options = NAMES[kind]
    x0 = jnp.asarray(rng.normal(size=(B, I)))
    model_b, model_s = Leaky(random_start=True), Leaky(random_start=True)
    learner_b = _quiet(lambda: etp_algorithms.compile(model_b, name, x0, batch_size=B, seed=7, **options))
    wrapped = _quiet(lambda: etp_algorithms.compile(model_s, name, x0, batch_size=B, vmap=True, seed=7, **options))
    np.testing.assert_array_equal(model_s.h.value, model_b.h.value)
    assert float(jnp.abs(model_s.h.value[0] - model_s.h.value[1]).max()) > 1e-3
    for _ in range(2):
        x = jnp.asarray(rng.normal(size=(B, I)))
        _close(wrapped(x), learner_b(x))
        _close(model_s.h.value, model_b.h.value)


def test_batch_size_from_the_first_call_and_under_jit(rng: np.random.Generator) -> None:
    x0 = jnp.zeros((B, I))
    learner_s, model_s = _per_sample_learner("D_RTRL", x0)
    wrapped = ETraceVmap(learner_s)
    assert wrapped.batch_size is None and model_s.h.value.shape == (O,)
    learner_b, model_b = _batched_learner("D_RTRL", x0)
    traced = [0]

    def run(x: Array) -> Array:
        traced[0] += 1
        return wrapped(x)

    jitted = brainstate.transform.jit(run)
    for _ in range(4):
        x = jnp.asarray(rng.normal(size=(B, I)))
        _close(jitted(x), learner_b(x))
    # the first call gives the states their batch axis, so the program is traced once more for the
    # batched states, then never again
    assert traced[0] == 2 and wrapped.batch_size == B
    _close(model_s.h.value, model_b.h.value)


def test_reset_state_gets_the_batch_axis_back(rng: np.random.Generator) -> None:
    x0 = jnp.zeros((B, I))
    learner_s, _ = _per_sample_learner("ES_D_RTRL", x0)
    wrapped = ETraceVmap(learner_s, axis_size=B)
    for _ in range(2):
        wrapped(jnp.asarray(rng.normal(size=(B, I))))
    learner_s.reset_state()  # per-sample zero traces
    assert int(learner_s.etrace.value.steps) == 0
    learner_b, _ = _batched_learner("ES_D_RTRL", x0)
    learner_b.model.h.value = learner_s.model.h.value  # same hidden states, fresh traces
    x = jnp.asarray(rng.normal(size=(B, I)))
    _close(wrapped(x), learner_b(x))
    np.testing.assert_array_equal(learner_s.etrace.value.steps, np.ones(B))
    _close(_traces("ES_D_RTRL", learner_s), _traces("ES_D_RTRL", learner_b))


def test_bad_use(rng: np.random.Generator) -> None:
    model = Leaky()
    brainstate.nn.init_all_states(model)
    with pytest.raises(ValueError, match="not compiled; call learner.compile_graph"):
        ETraceVmap(D_RTRL(model))
    with pytest.raises(TypeError, match="expects a brainstate.nn.Module"):
        ETraceVmap(lambda x: x)  # type: ignore[arg-type]
    learner, _ = _per_sample_learner("D_RTRL", jnp.zeros((B, I)))
    with pytest.raises(ValueError, match="axis_size must be a positive int"):
        ETraceVmap(learner, axis_size=0)
    wrapped = ETraceVmap(learner, axis_size=B)
    learner.model.h.value = jnp.zeros((B + 1, O))
    with pytest.raises(ValueError, match=r"state model\.h has leaf shapes \[\(4, 5\)\]"):
        wrapped(jnp.ones((B, I)))
    with pytest.raises(ValueError, match="the states carry a batch of 3, the inputs a batch of 2"):
        wrapped._batch_states(2)


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_sequence_drivers_equal_the_batched_learners(kind: str, rng: np.random.Generator) -> None:
    x0 = jnp.zeros((B, I))
    learner_b, model_b = _batched_learner(kind, x0)
    learner_s, model_s = _per_sample_learner(kind, x0)
    wrapped = ETraceVmap(learner_s, axis_size=B)
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    ys = jnp.asarray(rng.normal(size=(T, B, K)))

    def loss_of(call: Any) -> Callable[[Array, Array], Array]:
        return lambda x, y: jnp.sum((call(x) - y) ** 2)

    g_b, l_b = learner_b.etrace_grad(xs, ys, step_fn=loss_of(learner_b), return_value=True)
    g_s, l_s = wrapped.etrace_grad(xs, ys, step_fn=loss_of(wrapped), return_value=True)
    _close(g_s, g_b)
    _close(l_s, l_b)
    assert float(jnp.abs(g_b[("w",)]["weight"]).sum()) > 0
    _close(model_s.h.value, model_b.h.value)
    _close(_traces(kind, learner_s), _traces(kind, learner_b))
    out_b = learner_b.etrace_evolve(xs, return_outputs=True)
    out_s = wrapped.etrace_evolve(xs, return_outputs=True)
    assert out_s.shape == (T, B, K)
    _close(out_s, out_b)
    _close(model_s.h.value, model_b.h.value)
    with pytest.raises(ValueError, match="not supported on a vmapped learner"):
        wrapped.etrace_evolve(xs, chunk_size=2)


def test_compile_vmap_of_a_model_whose_states_carry_units(rng: np.random.Generator) -> None:
    """States in mV (etp_nn.LIF): the lanes start as the batched model and step as the batched learner does."""
    import saiunit as u

    import etp_nn

    class Net(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = etp_nn.Linear(I, O)
            self.lif = etp_nn.LIF(O)

        def update(self, x: Array) -> Array:
            return self.lif(self.inp(x) * u.mV)

    with brainstate.environ.context(dt=1.0 * u.ms):
        x0 = jnp.asarray(rng.normal(size=(B, I)))
        model_b, model_s = Net(), Net()
        model_s.inp.weight.value = jax.tree.map(lambda a: a, model_b.inp.weight.value)
        learner_b = _quiet(lambda: etp_algorithms.compile(model_b, "d_rtrl", x0, batch_size=B))
        wrapped = _quiet(lambda: etp_algorithms.compile(model_s, "d_rtrl", x0, batch_size=B, vmap=True))
        assert u.get_unit(model_s.lif.V.value) == u.mV and model_s.lif.V.value.shape == (B, O)
        for _ in range(3):
            x = jnp.asarray(rng.normal(size=(B, I))) * 3.0
            _close(wrapped(x), learner_b(x))
            _close(model_s.lif.V.value.mantissa, model_b.lif.V.value.mantissa)
