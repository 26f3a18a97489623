"""RTRL: the full influence matrix, exact for any model.

Oracle: BPTT, ``jax.grad`` through the unrolled model itself (``_bptt_of``), in float64.
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from algorithms_testing import _rel
from test_multi_step import TwoLayer, _bptt_of

import etp_nn
from etp_algorithms import ETraceVmap, MultiStepData, _rtrl
from etp_algorithms._rtrl import RTRL
from etp_compiler import CompilationError

Array = jax.Array


class RecurrentSNN(brainstate.nn.Module):
    """LIF neurons driven by their input and by their own spikes of the previous step (a recurrent Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = etp_nn.Linear(3, 5)
        self.rec = etp_nn.Linear(5, 5)
        self.lif = etp_nn.LIF(5, tau=4.0 * u.ms, V_th=0.5 * u.mV)
        self.out = etp_nn.LeakyRateReadout(5, 2, tau=3.0 * u.ms)
        self.spikes = brainstate.HiddenState(jnp.zeros(5))

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.spikes.value = jnp.zeros((5,) if batch_size is None else (batch_size, 5))

    def update(self, x: Array) -> Array:
        spikes = self.lif((self.inp(x) + self.rec(self.spikes.value)) * u.mV)
        self.spikes.value = spikes
        return self.out(spikes)


MODELS: dict[str, tuple[Any, int]] = {
    "gru": (lambda: etp_nn.GRUCell(3, 4), 4),
    "lstm": (lambda: etp_nn.LSTMCell(3, 4), 4),
    "lstm->gru": (TwoLayer, 3),
    "recurrent-snn": (RecurrentSNN, 2),
}


def _setup(kind: str, batch: int | None, rng: np.random.Generator, steps: int = 5, **options: Any) -> Any:
    brainstate.random.seed(7)
    make, out = MODELS[kind]
    model = make()
    brainstate.nn.init_all_states(model, batch_size=batch)
    lead = () if batch is None else (batch,)
    xs = jnp.asarray(rng.normal(size=(steps, *lead, 3)))
    target = jnp.asarray(rng.normal(size=(steps, *lead, out)))
    want = _bptt_of(model, xs, target)
    learner = RTRL(model, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GRU's reset gate has no relation: RTRL learns it anyway
        learner.compile_graph(xs[0])
    return model, learner, xs, target, want


def _assert_equal(got: Any, want: Any, tol: float) -> None:
    assert set(got) == set(want)
    for path, value in want.items():
        for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(value), strict=True):
            assert jnp.all(jnp.isfinite(a)), path
            assert _rel(a, b) < tol, (path, _rel(a, b))


def _loss(learner: Any, x: Array, y: Array) -> Array:
    return jnp.sum((learner(x) - y) ** 2)


@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("kind", list(MODELS))
def test_rtrl_equals_bptt_by_the_driver(kind: str, batch: int | None, rng: np.random.Generator) -> None:
    with brainstate.environ.context(dt=1.0 * u.ms):
        model, learner, xs, target, want = _setup(kind, batch, rng)
        got = learner.etrace_grad(xs, target, step_fn=lambda x, y: _loss(learner, x, y), reduction="sum")
    _assert_equal(got, want, 1e-10)


@pytest.mark.parametrize("mode", ["rows", "columns"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_both_ways_of_propagating_the_influence_equal_bptt(
    kind: str, mode: str, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reverse mode (a VJP per hidden entry, then J @ M) and forward mode (a JVP per parameter) are both exact."""
    chosen = []

    def forced(hidden: Any, theta: Any) -> str:
        chosen.append(mode)
        return mode

    monkeypatch.setattr(_rtrl, "_cheaper_mode", forced)
    with brainstate.environ.context(dt=1.0 * u.ms):
        model, learner, xs, target, want = _setup(kind, 2, rng)
        got = learner.etrace_grad(xs, target, step_fn=lambda x, y: _loss(learner, x, y), reduction="sum")
    assert chosen  # the forced mode was the one used
    _assert_equal(got, want, 1e-10)


@pytest.mark.parametrize(
    ("hidden", "params", "want"),
    [
        (((4, 32),), 3 * 96 * 32, "rows"),  # a GRU of 32 units, batch 4: 128 hidden entries, 9216 weights
        (((32, 64),), 3 * 128 * 64, "columns"),  # batch 32, 64 units: the dense (2048, 2048) product costs more
        (((5,),), 75, "rows"),  # unbatched
        # a recurrent LIF (spikes and potential) of 32 units at batch 4 (measured 7.5 vs 21.7 ms per step)
        (((4, 32), (4, 32)), 5152, "rows"),
        (((32, 16), (32, 16)), 2490, "columns"),  # and of 16 units at batch 32 (39.6 vs 12.6 ms per step)
    ],
)
def test_the_cheaper_propagation_is_chosen(hidden: tuple[tuple[int, ...], ...], params: int, want: str) -> None:
    states = {(f"h{i}",): jnp.zeros(shape) for i, shape in enumerate(hidden)}
    assert _rtrl._cheaper_mode(states, {"w": jnp.zeros(params)}) == want


def test_an_unknown_propagation_mode_is_named(rng: np.random.Generator) -> None:
    from etp_algorithms.extend import RuleContext

    model, learner, xs, target, want = _setup("gru", 2, rng)
    values = learner.executor.step(learner.executor.current_invals(xs[0]))
    with pytest.raises(ValueError, match="mode must be None, 'rows' or 'columns', got 'diagonal'"):
        _rtrl.propagate_influence(RuleContext(learner.graph), values, _rtrl_blocks(learner), mode="diagonal")


def _rtrl_blocks(learner: Any) -> dict[Any, dict[Any, Array]]:
    out: dict[Any, dict[Any, Array]] = {}
    for key, path, block in learner.etrace.value.blocks():
        out.setdefault(key, {})[path] = block
    return out


@pytest.mark.parametrize("kind", list(MODELS))
def test_rtrl_equals_bptt_step_by_step(kind: str, rng: np.random.Generator) -> None:
    """The hand loop: brainstate.transform.grad of each step's loss through learner(x), summed over the steps."""
    with brainstate.environ.context(dt=1.0 * u.ms):
        model, learner, xs, target, want = _setup(kind, 2, rng)
        params = model.states(brainstate.ParamState)
        total = None
        for t in range(xs.shape[0]):
            g = brainstate.transform.grad(lambda t=t: _loss(learner, xs[t], target[t]), params)()
            total = g if total is None else jax.tree.map(jnp.add, total, g)
    _assert_equal(total, want, 1e-10)
    # the influence is non-trivial: the history term is needed (the instantaneous gradient alone is not BPTT)
    assert any(float(jnp.abs(b).max()) > 0 for _, _, b in learner.etrace.value.blocks())


@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("kind", ["gru", "lstm->gru", "recurrent-snn"])
def test_rtrl_windows_equal_bptt(kind: str, batch: int | None, rng: np.random.Generator) -> None:
    """Windows of 2 steps (a ragged last one of 1): exact inside by reverse mode, exact across by the influence."""
    with brainstate.environ.context(dt=1.0 * u.ms):
        model, learner, xs, target, want = _setup(kind, batch, rng, vjp_method="multi-step")

        def window_loss(x: Array, y: Array) -> Array:
            return jnp.sum((learner(MultiStepData(x)) - y) ** 2, axis=tuple(range(1, y.ndim)))

        got = learner.etrace_grad(xs, target, step_fn=window_loss, chunk_size=2, reduction="sum")
    _assert_equal(got, want, 1e-10)


def test_the_instantaneous_gradient_alone_is_not_bptt(rng: np.random.Generator) -> None:
    """Guard on the oracle tests: zeroing the influence (the history term) moves the gradient away from BPTT."""
    model, learner, xs, target, want = _setup("gru", 2, rng)
    params = model.states(brainstate.ParamState)
    total = None
    for t in range(xs.shape[0]):
        learner.init_etrace_state()
        g = brainstate.transform.grad(lambda t=t: _loss(learner, xs[t], target[t]), params)()
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    errors = [_rel(a, b) for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(want), strict=True)]
    assert max(errors) > 1e-2


def test_rtrl_float32_is_close_to_float64(rng: np.random.Generator) -> None:
    model, learner, xs, target, want = _setup("gru", 2, rng)
    start = {path: state.value for path, state in model.states().items()}
    got64 = learner.etrace_grad(xs, target, step_fn=lambda x, y: _loss(learner, x, y), reduction="sum")
    _assert_equal(got64, want, 1e-10)
    for path, state in model.states().items():  # the same start, in float32
        state.value = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), start[path])
    learner.compile_graph(xs[0].astype(jnp.float32))
    assert all(b.dtype == jnp.float32 for _, _, b in learner.etrace.value.blocks())
    x32, y32 = xs.astype(jnp.float32), target.astype(jnp.float32)
    got32 = learner.etrace_grad(x32, y32, step_fn=lambda x, y: _loss(learner, x, y), reduction="sum")
    for path, value in got64.items():
        for a, b in zip(jax.tree.leaves(got32[path]), jax.tree.leaves(value), strict=True):
            assert a.dtype == jnp.float32 and jnp.all(jnp.isfinite(a)), path
            assert _rel(a, b) < 1e-4, (path, _rel(a, b))


def test_the_influence_has_the_documented_shapes_and_size(rng: np.random.Generator) -> None:
    model, learner, xs, target, want = _setup("lstm->gru", 2, rng)
    hidden = {p: s.value for p, s in learner.hidden_states.items()}
    leaves = {
        (path, tuple(k.key for k in kp)): leaf
        for path, state in learner.param_states.items()
        for kp, leaf in jax.tree_util.tree_flatten_with_path(state.value)[0]
    }
    trace = learner.etrace.value
    assert set(trace.keys) == set(leaves) and set(trace.paths) == set(hidden)
    for key, path, block in trace.blocks():
        assert block.shape == (*hidden[path].shape, *leaves[key].shape), (key, path)
    expected = sum(h.size * leaf.size * 8 for h in hidden.values() for leaf in leaves.values())
    assert learner.trace_bytes() == expected


def test_a_too_large_influence_is_refused_at_compile(rng: np.random.Generator) -> None:
    cell = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(cell, batch_size=2)
    # dh/dW: hidden (2, 4) against 3 gates of weight (7, 4) and bias (4,), float64
    size = 2 * 4 * 3 * (7 * 4 + 4) * 8
    learner = RTRL(cell, max_influence_bytes=size - 1)
    with pytest.raises(CompilationError, match=rf"GRUCell would take {size} bytes .*max_influence_bytes={size - 1}"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner.compile_graph(jnp.zeros((2, 3)))
    learner = RTRL(cell, max_influence_bytes=size)  # exactly at the limit: accepted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(jnp.zeros((2, 3)))
    assert learner.trace_bytes() == size


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB"])
def test_bad_limits_are_named(bad: Any) -> None:
    cell = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(cell)
    with pytest.raises(
        (TypeError, ValueError), match=rf"RTRL: max_influence_bytes must be a positive int, got {bad!r}"
    ):
        RTRL(cell, max_influence_bytes=bad)


def test_a_vmapped_per_sample_rtrl_equals_bptt(rng: np.random.Generator) -> None:
    """ETraceVmap: one sample's learner run over a batch of 2 gives the batched model's BPTT gradient."""
    xs = jnp.asarray(rng.normal(size=(4, 2, 3)))
    target = jnp.asarray(rng.normal(size=(4, 2, 4)))
    brainstate.random.seed(7)
    batched = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(batched, batch_size=2)
    want = _bptt_of(batched, xs, target)
    brainstate.random.seed(7)
    single = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(single)
    learner = RTRL(single)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0, 0])
        wrapped = ETraceVmap(learner, axis_size=2)
    params = single.states(brainstate.ParamState)
    total = None
    for t in range(4):
        g = brainstate.transform.grad(lambda t=t: jnp.sum((wrapped(xs[t]) - target[t]) ** 2), params)()
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    _assert_equal(total, want, 1e-10)


@pytest.mark.parametrize(("name", "warned"), [("rtrl", False), ("uoro", False), ("d_rtrl", True)])
def test_the_excluded_weight_warning_follows_the_learner(name: str, warned: bool) -> None:
    """The compiler keeps a GRU's reset-gate weight out of its relations and warns that it learns from its
    instantaneous gradient: true for a relations learner (D_RTRL), untrue for RTRL and UORO, which carry every
    weight's history (RTRL's gradient of it equals BPTT's: test_rtrl_equals_bptt_by_the_driver on the GRU)."""
    from etp_algorithms import compile as compile_learner

    brainstate.random.seed(1)
    model = etp_nn.GRUCell(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_learner(model, name, jnp.zeros((2, 3)), batch_size=2)
    excluded = [w for w in caught if "only through another trainable ETP primitive" in str(w.message)]
    assert len(excluded) == (1 if warned else 0), [str(w.message) for w in caught]
    if warned:
        assert "'Wr'" in str(excluded[0].message)
