"""RFLO against Murray's (2019) rule written out by hand on a leaky tanh RNN, and against D_RTRL.

The model: ``u^t = x^t W_in + h^{t-1} W_rec``, ``h^t = (1-a) h^{t-1} + a tanh(u^t)``,
``y^t = h^t W_out + b`` (all ETP matmuls; the readout drives no hidden state), loss
``L^t = |y^t - y*^t|^2 / 2``. The hand rule: ``e^t = (1-a) e^{t-1} + a tanh'(u^t) r^t``,
``dW += sum_b (eps^t B^T)_i e^t_ji``, the readout by the delta rule (float64, 1e-10).
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algorithms_testing import _rel

import etp_primitives as etp
from etp_algorithms import D_RTRL, ETraceAlgorithm, MultiStepData
from etp_algorithms import compile as etp_compile
from etp_algorithms._rflo import RFLO, feedback_layout, rflo
from etp_compiler import CompilationError, NotSupportedError

Array = jax.Array
T, B, I, N, O, A = 7, 3, 2, 5, 2, 0.4


class LeakyRNN(brainstate.nn.Module):
    """Murray's leaky tanh RNN; ``bypass``: ``x W_in`` also reaches the output directly (W_in not hidden-only)."""

    def __init__(self, seed: int = 0, bypass: bool = False, hidden: int = N, inputs: int = I) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.bypass = bypass
        self.w_in = brainstate.ParamState(jnp.asarray(rng.normal(size=(inputs, hidden))))
        self.w_rec = brainstate.ParamState(jnp.asarray(rng.normal(size=(hidden, hidden)) / np.sqrt(hidden)))
        self.out = brainstate.ParamState(
            {"weight": jnp.asarray(rng.normal(size=(hidden, O)) / np.sqrt(hidden)), "bias": jnp.zeros(O)}
        )
        self.hidden = hidden

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.hidden) if batch_size else (self.hidden,)))

    def update(self, x: Array) -> Array:
        y_in = etp.matmul(x, self.w_in.value)
        u = y_in + etp.matmul(self.h.value, self.w_rec.value)
        self.h.value = (1 - A) * self.h.value + A * jnp.tanh(u)
        y = etp.matmul(self.h.value, self.out.value["weight"], self.out.value["bias"])
        return y + 0.5 * y_in[..., :O] if self.bypass else y


def _model(batch: int | None = B, **kwargs: Any) -> LeakyRNN:
    model = LeakyRNN(**kwargs)
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


def _data(seed: int = 1, batch: int | None = B) -> tuple[Array, Array]:
    rng = np.random.default_rng(seed)
    lead = (T, batch) if batch else (T,)
    return jnp.asarray(rng.normal(size=(*lead, I))), jnp.asarray(rng.normal(size=(*lead, O)))


def _online(learner: ETraceAlgorithm, xs: Array, ys: Array) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    return learner.etrace_grad(xs, ys, step_fn=lambda x, y: 0.5 * jnp.sum((learner(x) - y) ** 2), reduction="sum")


def _by_hand(model: LeakyRNN, xs: Array, ys: Array, feedback: Array, bypass: bool = False) -> dict[str, Array]:
    """Murray's RFLO: leak-only traces, the error sent back through ``feedback`` (hidden x output)."""
    w_in, w_rec = model.w_in.value, model.w_rec.value
    w_out, b = model.out.value["weight"], model.out.value["bias"]
    h = jnp.zeros((xs.shape[1], N))
    e_in, e_rec = jnp.zeros((xs.shape[1], I, N)), jnp.zeros((xs.shape[1], N, N))
    g = {k: 0.0 for k in ("w_in", "w_rec", "weight", "bias")}
    for t in range(xs.shape[0]):
        x = xs[t]
        u = x @ w_in + h @ w_rec
        h_new = (1 - A) * h + A * jnp.tanh(u)
        y = h_new @ w_out + b + (0.5 * (x @ w_in)[:, :O] if bypass else 0.0)
        eps = y - ys[t]
        dphi = A * (1 - jnp.tanh(u) ** 2)
        e_in = (1 - A) * e_in + x[:, :, None] * dphi[:, None, :]
        e_rec = (1 - A) * e_rec + h[:, :, None] * dphi[:, None, :]
        signal = eps @ feedback.T
        g["w_in"] = g["w_in"] + jnp.einsum("bi,bji->ji", signal, e_in)
        g["w_rec"] = g["w_rec"] + jnp.einsum("bi,bji->ji", signal, e_rec)
        if bypass:  # the route x W_in -> y that skips h: its exact instantaneous gradient
            g["w_in"] = g["w_in"] + jax.grad(lambda w, x=x, eps=eps: jnp.sum(eps * 0.5 * (x @ w)[:, :O]))(w_in)
        g["weight"] = g["weight"] + h_new.T @ eps
        g["bias"] = g["bias"] + eps.sum(0)
        h = h_new
    return g


def _check(got: Any, want: dict[str, Array]) -> None:
    pairs = {
        "w_in": got[("w_in",)],
        "w_rec": got[("w_rec",)],
        "weight": got[("out",)]["weight"],
        "bias": got[("out",)]["bias"],
    }
    for key, value in pairs.items():
        assert value.dtype == jnp.float64
        assert float(jnp.abs(want[key]).max()) > 0, key
        assert _rel(value, want[key]) < 1e-10, key


@pytest.mark.parametrize("bypass", [False, True])
def test_rflo_equals_murrays_rule_by_hand(bypass: bool) -> None:
    xs, ys = _data()
    model = _model(bypass=bypass)
    learner = RFLO(model, feedback_key=7)
    got = _online(learner, xs, ys)
    (path, fb), *rest = learner.feedback_matrices.items()
    assert path == ("h",) and fb.shape == (N, O) and not rest
    want = _by_hand(_model(bypass=bypass), xs, ys, fb, bypass=bypass)
    _check(got, want)
    # the feedback is not the readout's transpose, so this is not D-RTRL's gradient
    d = _online(D_RTRL(_model(bypass=bypass)), xs, ys)
    assert _rel(got[("w_rec",)], d[("w_rec",)]) > 1e-2
    # the matrix is fixed: drawn from the key, the same after a reset and for another learner with that key
    np.testing.assert_array_equal(learner.feedback_matrices[("h",)], fb)
    for key in (jax.random.key(7), jax.random.PRNGKey(7), np.int64(7)):
        other = RFLO(_model(), feedback_key=key)
        other.compile_graph(xs[0])
        np.testing.assert_array_equal(other.feedback_matrices[("h",)], fb)
    another = RFLO(_model(), feedback_key=8)
    another.compile_graph(xs[0])
    assert float(jnp.abs(another.feedback_matrices[("h",)] - fb).max()) > 0.1
    scaled = RFLO(_model(), feedback_key=7, feedback_scale=2.0)
    scaled.compile_graph(xs[0])
    np.testing.assert_allclose(scaled.feedback_matrices[("h",)], fb * 2.0 * np.sqrt(O), rtol=1e-6)


@pytest.mark.parametrize("bypass", [False, True])
def test_symmetric_feedback_equals_d_rtrl_and_the_hand_rule_with_the_readout(bypass: bool) -> None:
    xs, ys = _data(2)
    got = _online(RFLO(_model(bypass=bypass), feedback="symmetric"), xs, ys)
    want = _online(D_RTRL(_model(bypass=bypass)), xs, ys)
    for path in want:
        for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path]), strict=True):
            assert _rel(a, b) < 1e-10, path
    model = _model(bypass=bypass)
    # B = W_out (hidden x output): eps B^T is the true dL/dh
    _check(got, _by_hand(model, xs, ys, model.out.value["weight"], bypass=bypass))


def test_unbatched_model_and_vmap_equal_the_batched_learner() -> None:
    xs, ys = _data(3)
    want = _online(RFLO(_model(), feedback_key=4), xs, ys)
    # one sample, unbatched: h (N,), outputs (O,) -> the same (N, O) matrix
    single = RFLO(_model(batch=None), feedback_key=4)
    got = _online(single, xs[:, 0], ys[:, 0])
    model = _model(batch=None)
    _check(got, _by_hand(model, xs[:, :1], ys[:, :1], single.feedback_matrices[("h",)]))
    # the per-sample learner vmapped over the batch: the batched learner's gradients
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vmapped = etp_compile(LeakyRNN(), RFLO, xs[0], batch_size=B, vmap=True, feedback_key=4)
    params = vmapped.module.model.states(brainstate.ParamState)
    for p, state in params.items():  # the batched learner's initial weights
        state.value = _model().states(brainstate.ParamState)[p].value
    got = vmapped.etrace_grad(xs, ys, step_fn=lambda x, y: 0.5 * jnp.sum((vmapped(x) - y) ** 2), reduction="sum")
    for path in want:
        for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path]), strict=True):
            assert _rel(a, b) < 1e-10, path


def test_float32_model() -> None:
    xs, ys = _data(10)
    want = _online(RFLO(_model(), feedback_key=5), xs, ys)
    model = _model()
    for state in model.states().values():
        state.value = jax.tree.map(lambda v: v.astype(jnp.float32), state.value)
    learner = RFLO(model, feedback_key=5)
    got = _online(learner, xs.astype(jnp.float32), ys.astype(jnp.float32))
    assert learner.feedback_matrices[("h",)].dtype == jnp.float32
    for path in want:
        for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path]), strict=True):
            assert a.dtype == jnp.float32 and _rel(a, b) < 1e-4, path


class TwoOutputs(brainstate.nn.Module):
    """Two hidden states in two groups and two outputs (one non-floating)."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(5)
        self.w1 = brainstate.ParamState(jnp.asarray(rng.normal(size=(I, 4))))
        self.w2 = brainstate.ParamState(jnp.asarray(rng.normal(size=(4, 3))))
        self.h1 = brainstate.HiddenState(jnp.zeros((B, 4)))
        self.h2 = brainstate.HiddenState(jnp.zeros((B, 3)))

    def update(self, x: Array) -> Any:
        self.h1.value = 0.5 * self.h1.value + jnp.tanh(etp.matmul(x, self.w1.value))
        self.h2.value = 0.7 * self.h2.value + etp.matmul(self.h1.value, self.w2.value)
        return self.h1.value[:, :2] * 2.0, self.h2.value.reshape(B, 3, 1), self.h2.value > 0


def test_several_outputs_and_hidden_states() -> None:
    model = TwoOutputs()
    learner = RFLO(model, feedback_key=2)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(B, I)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(x)
    layout = feedback_layout(learner.graph)
    assert layout.batch == B and layout.outputs == (0, 1) and layout.size == 5
    fb = learner.feedback_matrices
    assert {p: m.shape for p, m in fb.items()} == {("h1",): (4, 5), ("h2",): (3, 5)}
    h1 = jnp.tanh(x @ model.w1.value)
    ct = jnp.asarray(np.random.default_rng(7).normal(size=(B, 5)))

    def loss(x: Array) -> Array:
        a, b, _ = learner(x)
        return jnp.sum(a * ct[:, :2]) + jnp.sum(b[..., 0] * ct[:, 2:])

    got = brainstate.transform.grad(loss, model.states(brainstate.ParamState))(x)
    # one step from zero states: the traces are the seeds; each state gets its own B_p eps
    s1, s2 = ct @ fb[("h1",)].T, ct @ fb[("h2",)].T
    want1 = x.T @ (s1 * (1 - h1**2))
    want2 = h1.T @ s2
    assert _rel(got[("w1",)], want1) < 1e-10 and _rel(got[("w2",)], want2) < 1e-10


def test_a_copy_task_trained_online_cuts_the_loss() -> None:
    """Reproduce the input through the RNN, SGD every 10 steps, the states carried on (no reset)."""
    hidden, steps, chunk, batch = 32, 600, 10, 8
    rng = np.random.default_rng(8)
    xs = jnp.asarray(rng.normal(size=(steps, batch, I)))
    ys = xs[:, :, :O]  # y^t = x^t through the leaky tanh units
    model = LeakyRNN(seed=3, hidden=hidden)
    brainstate.nn.init_all_states(model, batch_size=batch)
    learner = RFLO(model, feedback_key=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    params = model.states(brainstate.ParamState)

    def step_fn(x: Array, y: Array) -> Array:
        return 0.5 * jnp.mean(jnp.sum((learner(x) - y) ** 2, -1))

    losses = []
    for start in range(0, steps, chunk):
        grads, loss = learner.etrace_grad(
            xs[start : start + chunk], ys[start : start + chunk], step_fn=step_fn, return_value=True
        )
        for path, state in params.items():
            state.value = jax.tree.map(lambda w, g: w - 0.3 * g, state.value, grads[path])
        losses.append(float(jnp.mean(loss)))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert np.isfinite(last) and first / last >= 3.0, (first, last)


def test_symmetric_feedback_runs_multi_step_windows_as_d_rtrl() -> None:
    xs, ys = _data(9)

    def windows(learner: ETraceAlgorithm) -> Any:
        learner.compile_graph(xs[0])

        def loss(x: Any, y: Array) -> Array:
            return 0.5 * jnp.sum((learner(x) - y) ** 2, axis=(1, 2))

        return learner.etrace_grad(
            xs, ys, step_fn=lambda x, y: loss(MultiStepData(x), y), chunk_size=3, reduction="sum"
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = windows(RFLO(_model(), feedback="symmetric", vjp_method="multi-step"))
        want = windows(D_RTRL(_model(), vjp_method="multi-step"))
    for path in want:
        for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path]), strict=True):
            assert _rel(a, b) < 1e-10, path


class Mixing(brainstate.nn.Module):
    """The op's output reaches the hidden states through a mixing matrix: not position-wise."""

    def __init__(self) -> None:
        super().__init__()
        self.w = brainstate.ParamState(jnp.full((I, 4), 0.3))
        self.m = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)))
        self.h = brainstate.HiddenState(jnp.zeros((B, 4)))

    def update(self, x: Array) -> Array:
        self.h.value = 0.5 * self.h.value + jnp.tanh(etp.matmul(x, self.w.value)) @ self.m
        return self.h.value


def test_a_weight_whose_true_step_term_is_removed_approximately_is_named_at_compile() -> None:
    with pytest.warns(UserWarning, match=r"RFLO: the step's VJP differentiates the weights \['w.weight'\]"):
        RFLO(Mixing()).compile_graph(jnp.ones((B, I)))
    with warnings.catch_warnings():  # symmetric feedback is D-RTRL: nothing to say
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*mixes positions")
        RFLO(Mixing(), feedback="symmetric").compile_graph(jnp.ones((B, I)))


class BatchReduced(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = brainstate.ParamState(jnp.ones((I, N)))
        self.h = brainstate.HiddenState(jnp.zeros((B, N)))

    def update(self, x: Array) -> Any:
        self.h.value = 0.5 * self.h.value + etp.matmul(x, self.w.value)
        return self.h.value.mean(0), self.h.value > 0


class IntegerOutput(BatchReduced):
    def update(self, x: Array) -> Any:
        self.h.value = 0.5 * self.h.value + etp.matmul(x, self.w.value)
        return self.h.value > 0


def test_bad_input() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"unknown feedback 'bogus'; expected one of \['random', 'symmetric'\]"):
        RFLO(model, feedback="bogus")
    for key in ("a", 1.5, True, jnp.zeros(3)):
        with pytest.raises(TypeError, match="feedback_key must be an int or a concrete JAX PRNG key"):
            RFLO(model, feedback_key=key)
    with pytest.raises(ValueError, match="feedback_scale must be a positive finite number"):
        RFLO(model, feedback_scale=-1.0)
    with pytest.raises(TypeError, match="feedback_scale"):
        RFLO(model, feedback_scale="big")
    with pytest.raises(NotSupportedError, match="vjp_method='multi-step' needs feedback='symmetric'"):
        RFLO(model, vjp_method="multi-step")
    assert RFLO(model, feedback="symmetric", vjp_method="multi-step").rule.supports_windows
    assert not rflo().supports_windows
    x = jnp.zeros((B, I))
    with pytest.raises(CompilationError, match=r"hidden states \{'h': \(3, 5\)\} share a leading batch axis.*\(5,\)"):
        RFLO(BatchReduced()).compile_graph(x)
    with pytest.raises(CompilationError, match="no floating-point output"):
        RFLO(IntegerOutput()).compile_graph(x)
    # symmetric feedback needs no layout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sym = RFLO(BatchReduced(), feedback="symmetric")
        sym.compile_graph(x)
    assert sym.feedback_matrices == {}
