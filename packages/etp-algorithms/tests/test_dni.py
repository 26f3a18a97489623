"""DNI (Jaderberg et al. 2017): BPTT inside a window plus a synthetic gradient at its end, and the synthesizer's training.

Oracles written here: jax.grad through the unrolled window of the model's equations (with the synthetic term
<sg(g_hat(h_T)), h_T> added by hand, g_hat = h_T W + b), the bootstrapped target of the synthesizer by jax.grad
with respect to the window's start state, and the true future gradient of a linear system from its Lyapunov
equation.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from test_multi_step import SNN  # Linear -> LIF (surrogate spikes) -> leaky readout: two hidden groups

import etp_nn
import etp_primitives as etp
from etp_algorithms import MultiStepData, SingleStepData
from etp_algorithms._dni import DNI, train_synthetic_gradient
from etp_algorithms._synthetic_gradient import SyntheticGradient
from etp_compiler import NotSupportedError

Array = jax.Array
B, I, H = 2, 3, 4


class TanhRNN(brainstate.nn.Module):
    """h^t = tanh(x^t W_in + h^{t-1} U + b)."""

    def __init__(self, rng: np.random.Generator, batch: int = B) -> None:
        super().__init__()
        self.w_in = brainstate.ParamState({"weight": jnp.asarray(rng.normal(size=(I, H)) / np.sqrt(I))})
        self.w_rec = brainstate.ParamState(
            {"weight": jnp.asarray(rng.normal(size=(H, H)) / np.sqrt(H)), "bias": jnp.asarray(rng.normal(size=H))}
        )
        self.h = brainstate.HiddenState(jnp.zeros((batch, H)))

    def update(self, x: Array) -> Array:
        rec = self.w_rec.value
        self.h.value = jnp.tanh(
            etp.matmul(x, self.w_in.value["weight"]) + etp.matmul(self.h.value, rec["weight"], rec["bias"])
        )
        return self.h.value

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.h.value = jnp.zeros((H,) if batch_size is None else (batch_size, H))


def _params(model: TanhRNN) -> dict[str, Any]:
    return {"w_in": model.w_in.value, "w_rec": model.w_rec.value}


def _unrolled(p: dict[str, Any], h: Array, xs: Array) -> tuple[list[Array], Array]:
    hs = []
    for t in range(xs.shape[0]):
        h = jnp.tanh(xs[t] @ p["w_in"]["weight"] + h @ p["w_rec"]["weight"] + p["w_rec"]["bias"])
        hs.append(h)
    return hs, h


def _loss(hs: Array, r: Array) -> Array:
    return jnp.sum(r * jnp.sin(hs))


def _oracle(p: dict[str, Any], h0: Array, xs: Array, r: Array, W: Array, b: Array) -> Any:
    """jax.grad of the window's loss plus <sg(h_T W + b), h_T>: BPTT in the window and the synthetic bootstrap."""

    def objective(p: dict[str, Any]) -> Array:
        hs, hT = _unrolled(p, h0, xs)
        g_hat = jax.lax.stop_gradient(hT @ W + b)
        return _loss(jnp.stack(hs), r) + jnp.sum(g_hat * hT)

    return jax.grad(objective)(p)


def _learner(model: TanhRNN, synthesizer: SyntheticGradient | None = None) -> DNI:
    learner = DNI(model, synthesizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(jnp.zeros((B, I)))
    return learner


def _dni_grads(learner: DNI, model: TanhRNN, xs: Array, r: Array) -> dict[str, Any]:
    params = model.states(brainstate.ParamState)
    g = brainstate.transform.grad(lambda c: _loss(learner(MultiStepData(c)), r), params)(xs)
    return {"w_in": g[("w_in",)], "w_rec": g[("w_rec",)]}


def _close(got: Any, want: Any, tol: float = 1e-12) -> None:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= tol * (1.0 + float(jnp.max(jnp.abs(b)))), (a, b)


def _set_linear(learner: DNI, W: Array, b: Array) -> None:
    ((_, state),) = learner.synthesizer.states_dict().items()
    state.value = {"weight": W, "bias": b}


@pytest.mark.parametrize("K", [1, 4])
def test_window_gradient_is_bptt_plus_the_synthetic_term(K: int, rng: np.random.Generator) -> None:
    model = TanhRNN(rng)
    learner = _learner(model, SyntheticGradient({0: (H, 1)}, scale=1.0, seed=3))
    h0 = jnp.asarray(rng.normal(size=(B, H))) * 0.5
    model.h.value = h0
    xs, r = jnp.asarray(rng.normal(size=(K, B, I))), jnp.asarray(rng.normal(size=(K, B, H)))
    values = learner.synthesizer.param_values()["group_0"]
    want = _oracle(_params(model), h0, xs, r, values["weight"], values["bias"])
    assert float(jnp.max(jnp.abs(values["weight"]))) > 0.1  # the synthetic term is not zero
    _close(_dni_grads(learner, model, xs, r), want)
    _close(model.h.value, _unrolled(_params(model), h0, xs)[1])  # the states advanced over the window


def test_the_synthetic_term_is_the_given_future_gradient(rng: np.random.Generator) -> None:
    """With W = 0, b = c the synthesizer says dL/dh_T = c; DNI minus truncated BPTT is d<c, h_T>/dtheta by hand."""
    model = TanhRNN(rng)
    learner = _learner(model)
    assert learner.synthesizer.param_values()["group_0"]["weight"].shape == (H, H)  # default: per sample
    xs, r = jnp.asarray(rng.normal(size=(3, B, I))), jnp.asarray(rng.normal(size=(3, B, H)))
    truncated = _dni_grads(learner, model, xs, r)  # scale=0: the default synthesizer sends nothing
    model.h.value = jnp.zeros((B, H))
    want_truncated = jax.grad(lambda p: _loss(jnp.stack(_unrolled(p, jnp.zeros((B, H)), xs)[0]), r))(_params(model))
    _close(truncated, want_truncated)
    c = jnp.asarray([0.3, -1.2, 0.7, 2.0])  # dL/dh_T, the same for every sample
    _set_linear(learner, jnp.zeros((H, H)), c)
    got = _dni_grads(learner, model, xs, r)
    p0 = _params(model)
    w_in, U, b = p0["w_in"]["weight"], p0["w_rec"]["weight"], p0["w_rec"]["bias"]
    # the synthetic term written out: delta_T = c, then back through h^t = tanh(a^t), a^t = x^t W_in + h^{t-1} U + b
    hs, h = [], jnp.zeros((B, H))
    for t in range(3):
        h = jnp.tanh(xs[t] @ w_in + h @ U + b)
        hs.append(h)
    delta = jnp.broadcast_to(c, (B, H))
    g_in, g_U, g_b = jnp.zeros_like(w_in), jnp.zeros_like(U), jnp.zeros_like(b)
    for t in reversed(range(3)):
        da = delta * (1 - hs[t] ** 2)
        prev = hs[t - 1] if t else jnp.zeros((B, H))
        g_in, g_U, g_b = g_in + xs[t].T @ da, g_U + prev.T @ da, g_b + da.sum(0)
        delta = da @ U.T
    synthetic = {"w_in": {"weight": g_in}, "w_rec": {"bias": g_b, "weight": g_U}}
    _close(jax.tree.map(jnp.subtract, got, truncated), synthetic)


def test_windows_are_truncated_and_drive_etrace_grad(rng: np.random.Generator) -> None:
    """Each window learns from its own start state held fixed; etrace_grad(chunk_size=k) sums those windows."""
    model = TanhRNN(rng)
    learner = _learner(model, SyntheticGradient({0: (H, 1)}, scale=0.5, seed=1))
    xs, r = jnp.asarray(rng.normal(size=(6, B, I))), jnp.asarray(rng.normal(size=(6, B, H)))
    values = learner.synthesizer.param_values()["group_0"]
    W, b = values["weight"], values["bias"]
    p = _params(model)
    want, h = None, jnp.zeros((B, H))
    for start in (0, 3):
        g = _oracle(p, h, xs[start : start + 3], r[start : start + 3], W, b)
        want = g if want is None else jax.tree.map(jnp.add, want, g)
        h = _unrolled(p, h, xs[start : start + 3])[1]

    def step_loss(x: Array, rr: Array) -> Array:  # one loss per step of the window
        return jnp.sum(rr * jnp.sin(learner(MultiStepData(x))), axis=(1, 2))

    grads = learner.etrace_grad(xs, r, step_fn=step_loss, chunk_size=3, reduction="sum")
    _close({"w_in": grads[("w_in",)], "w_rec": grads[("w_rec",)]}, want)
    _close(model.h.value, h)
    # step by step (plain calls, windows of one step) under etrace_grad's scan
    model.h.value, want, h = jnp.zeros((B, H)), None, jnp.zeros((B, H))
    for step in range(6):
        g = _oracle(p, h, xs[step : step + 1], r[step : step + 1], W, b)
        want = g if want is None else jax.tree.map(jnp.add, want, g)
        h = _unrolled(p, h, xs[step : step + 1])[1]
    grads = learner.etrace_grad(xs, r, step_fn=lambda x, rr: _loss(learner(x), rr), reduction="sum")
    _close({"w_in": grads[("w_in",)], "w_rec": grads[("w_rec",)]}, want)
    out = learner(SingleStepData(xs[0]))
    assert out.shape == (B, H)


@pytest.mark.parametrize("optax_style", [False, True])
def test_one_training_step_regresses_on_the_bootstrapped_target(optax_style: bool) -> None:
    rng = np.random.default_rng(11)
    model = TanhRNN(rng)
    learner = _learner(model, SyntheticGradient({0: (H, 1)}, scale=1.0, seed=5))
    xs, r = jnp.asarray(rng.normal(size=(3, B, I))), jnp.asarray(rng.normal(size=(3, B, H)))
    h0 = jnp.asarray(rng.normal(size=(B, H))) * 0.5
    model.h.value = h0
    values = learner.synthesizer.param_values()["group_0"]
    W, b = values["weight"], values["bias"]
    p = _params(model)

    def future(h: Array) -> Array:  # L_w + <sg(g_hat(h_T)), h_T> as a function of the start state
        hs, hT = _unrolled(p, h, xs)
        return _loss(jnp.stack(hs), r) + jnp.sum(jax.lax.stop_gradient(hT @ W + b) * hT)

    delta = jax.grad(future)(h0)

    def sg_loss(q: dict[str, Array]) -> Array:
        return 0.5 * jnp.sum((h0 @ q["weight"] + q["bias"] - delta) ** 2)

    lr = 0.05
    want_loss, want_grad = jax.value_and_grad(sg_loss)({"weight": W, "bias": b})
    optimizer = _decaying(lr, np.inf) if optax_style else None  # both: one gradient-descent step at rate lr
    losses = train_synthetic_gradient(
        learner, xs, chunk_size=3, loss_fn=lambda out: _loss(out, r), optimizer=optimizer, lr=lr, reset=False
    )
    assert len(losses) == 1 and abs(losses[0] - float(want_loss)) <= 1e-12 * float(want_loss)
    new = learner.synthesizer.param_values()["group_0"]
    _close(new, {"bias": b - lr * want_grad["bias"], "weight": W - lr * want_grad["weight"]})
    _close(_params(model), p)  # the model's parameters are not trained
    _close(model.h.value, _unrolled(p, h0, xs)[1])


class _Decaying(NamedTuple):
    """An optax-style GradientTransformation: gradient descent at the rate ``rate / (1 + count / half)``."""

    init: Any
    update: Any


def _decaying(rate: float, half: float) -> _Decaying:
    def update(grads: Any, count: Array, params: Any) -> tuple[Any, Array]:
        return jax.tree.map(lambda g: -rate / (1.0 + count / half) * g, grads), count + 1

    return _Decaying(init=lambda params: jnp.zeros((), jnp.int32), update=update)


class Linear(brainstate.nn.Module):
    """h^t = h^{t-1} A + x^t (A fixed)."""

    def __init__(self, A: Array, batch: int) -> None:
        super().__init__()
        self.A = brainstate.ParamState({"weight": A})
        self.h = brainstate.HiddenState(jnp.zeros((batch, A.shape[0])))

    def update(self, x: Array) -> Array:
        self.h.value = etp.matmul(self.h.value, self.A.value["weight"]) + x
        return self.h.value

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.h.value = jnp.zeros((self.h.value.shape[0], self.A.value["weight"].shape[0]))


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_a_trained_synthesizer_converges_to_the_true_future_gradient(chunk_size: int) -> None:
    r"""Linear system h^t = h^{t-1} A + x^t, x^t ~ N(0, I), loss 1/2 sum_t |h^t|^2. The expected future gradient is
    E[dL_{>T}/dh_T | h_T] = sum_k h_T A^k (A^k)^T = h_T P with P = A (I + P) A^T (the discrete Lyapunov equation):
    the linear synthesizer's weight must converge to P and its bias to 0."""
    rng = np.random.default_rng(7)
    n, batch = 3, 256
    A = rng.normal(size=(n, n))
    A = 0.6 * A / np.max(np.abs(np.linalg.eigvals(A)))
    P = np.zeros((n, n))
    for _ in range(500):
        P = A @ (np.eye(n) + P) @ A.T
    model = Linear(jnp.asarray(A), batch)
    learner = DNI(model)
    learner.compile_graph(jnp.zeros((batch, n)))
    xs = jnp.asarray(rng.normal(size=(600, batch, n)))
    losses = train_synthetic_gradient(
        learner, xs, chunk_size=chunk_size, loss_fn=lambda out: 0.5 * jnp.sum(out**2), optimizer=_decaying(2e-3, 10.0)
    )
    assert len(losses) == 600 // chunk_size
    values = learner.synthesizer.param_values()["group_0"]
    W, b = np.asarray(values["weight"]), np.asarray(values["bias"])
    assert np.linalg.norm(W - P) / np.linalg.norm(P) < 0.05, (W, P)
    assert np.max(np.abs(b)) < 0.05 * np.max(np.abs(P))
    assert np.linalg.norm(P) > 0.5  # the future gradient is far from the zero the synthesizer started at


def test_mlp_synthesizer(rng: np.random.Generator) -> None:
    sg = SyntheticGradient({0: (2, 3), 1: (4,)}, hidden_width=5, scale=0.7, seed=2)
    assert set(sg.states_dict()) == {("group_0",), ("group_1",)}
    values = sg.param_values()
    assert {k: v.shape for k, v in values["group_0"].items()} == {"w1": (6, 5), "b1": (5,), "w2": (5, 6), "b2": (6,)}
    h0, h1 = jnp.asarray(rng.normal(size=(7, 2, 3))), jnp.asarray(rng.normal(size=(4,)))
    out = sg.apply(values, {0: h0, 1: h1})
    p = values["group_0"]
    want = (jnp.maximum(h0.reshape(7, 6) @ p["w1"] + p["b1"], 0.0) @ p["w2"] + p["b2"]).reshape(7, 2, 3)
    _close(out[0], want)
    assert out[1].shape == (4,)
    zero = SyntheticGradient({0: (2, 3)}, hidden_width=5)
    assert float(jnp.max(jnp.abs(zero.apply(zero.param_values(), {0: h0})[0]))) == 0.0  # scale=0: no gradient yet
    assert float(jnp.max(jnp.abs(zero.param_values()["group_0"]["w1"]))) > 0.0


def test_an_mlp_synthesizer_in_the_window(rng: np.random.Generator) -> None:
    model = TanhRNN(rng)
    sg = SyntheticGradient({0: (B, H, 1)}, hidden_width=6, scale=1.0, seed=4)  # the whole batch's state, one map
    learner = _learner(model, sg)
    xs, r = jnp.asarray(rng.normal(size=(2, B, I))), jnp.asarray(rng.normal(size=(2, B, H)))
    p, q = _params(model), sg.param_values()["group_0"]

    def objective(p: dict[str, Any]) -> Array:
        hs, hT = _unrolled(p, jnp.zeros((B, H)), xs)
        g_hat = (jnp.maximum(hT.reshape(-1) @ q["w1"] + q["b1"], 0.0) @ q["w2"] + q["b2"]).reshape(B, H)
        return _loss(jnp.stack(hs), r) + jnp.sum(jax.lax.stop_gradient(g_hat) * hT)

    _close(_dni_grads(learner, model, xs, r), jax.grad(objective)(p))


def test_bad_input(rng: np.random.Generator) -> None:
    model = TanhRNN(rng)
    with pytest.raises(NotSupportedError, match="vjp_method='single-step' is not supported"):
        DNI(model, vjp_method="single-step")
    with pytest.raises(ValueError, match="unknown vjp_method"):
        DNI(model, vjp_method="windows")
    with pytest.raises(TypeError, match="SyntheticGradient or None"):
        DNI(model, synthesizer={0: (H, 1)})  # type: ignore[arg-type]
    learner = DNI(model)
    with pytest.raises(RuntimeError, match="compile_graph"):
        learner.group_signal_shapes()
    learner.compile_graph(jnp.zeros((B, I)))
    assert learner.group_signal_shapes() == {0: (B, H, 1)}
    with pytest.raises(ValueError, match=r"groups \[1\] are not the model's hidden groups \[0\]"):
        learner.attach_synthesizer(SyntheticGradient({1: (H, 1)}))
    with pytest.raises(
        ValueError, match=r"shape \(5, 1\) of group 0 does not match the group's signal shape \(2, 4, 1\)"
    ):
        learner.attach_synthesizer(SyntheticGradient({0: (5, 1)}))
    with pytest.raises(TypeError, match="expects a SyntheticGradient"):
        learner.attach_synthesizer("linear")  # type: ignore[arg-type]
    wrong = DNI(TanhRNN(rng), SyntheticGradient({0: (3, H, 1)}))
    with pytest.raises(ValueError, match="does not match the group's signal shape"):
        wrong.compile_graph(jnp.zeros((B, I)))
    with pytest.raises(TypeError, match="takes no modulator"):
        learner(jnp.zeros((B, I)), modulator=1.0)
    for shapes, kind in (({}, TypeError), ({"a": (2,)}, TypeError), ({0: ()}, ValueError), ({0: (0, 2)}, ValueError)):
        with pytest.raises(kind, match="SyntheticGradient"):
            SyntheticGradient(shapes)
    with pytest.raises(ValueError, match="hidden_width"):
        SyntheticGradient({0: (2,)}, hidden_width=0)
    with pytest.raises(ValueError, match="scale"):
        SyntheticGradient({0: (2,)}, scale=-1.0)
    sg = SyntheticGradient({0: (H, 1)})
    with pytest.raises(ValueError, match=r"must end with the group's shape \(4, 1\); got shape \(2, 4\)"):
        sg.apply(sg.param_values(), {0: jnp.zeros((B, H))})
    with pytest.raises(ValueError, match="not one of the synthesizer's groups"):
        sg.apply(sg.param_values(), {2: jnp.zeros((H, 1))})
    xs = jnp.zeros((4, B, I))
    with pytest.raises(TypeError, match="expects a DNI learner"):
        train_synthetic_gradient(model, xs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass loss_fn"):
        train_synthetic_gradient(learner, xs)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        train_synthetic_gradient(learner, (xs, xs), chunk_size=0)
    with pytest.raises(ValueError, match="leading time axis"):
        train_synthetic_gradient(learner, (xs, jnp.zeros((3, B, H))))
    with pytest.raises(TypeError, match="optax-style"):
        train_synthetic_gradient(learner, (xs, xs), optimizer="adam")
    with pytest.raises(RuntimeError, match="call it outside jit"):
        jax.jit(lambda x: train_synthetic_gradient(learner, (x, x)))(xs)
    with pytest.raises(ValueError, match="must return a scalar"):
        train_synthetic_gradient(learner, xs, loss_fn=lambda out: out, reset=False)
    with pytest.raises(ValueError, match="pass batch_size="):
        train_synthetic_gradient(learner, xs, loss_fn=jnp.sum)  # TanhRNN resets unbatched: not the compiled shape
    losses = train_synthetic_gradient(learner, (xs, jnp.zeros((4, B, H))), epochs=2, batch_size=B)
    assert len(losses) == 8 and np.all(np.isfinite(losses)) and model.h.value.shape == (B, H)


def _model_oracle(model: brainstate.nn.Module, learner: DNI, xs: Array, target: Array, synthetic: bool = True) -> Any:
    """brainstate.transform.grad through the model's own code over the window, plus <sg(g_hat(h_T)), h_T> summed over
    every hidden state (g_hat from the synthesizer on each group's stacked end states); the states are restored."""
    params = model.states(brainstate.ParamState)
    saved = {p: s.value for p, s in model.states().items()}
    hidden = learner.hidden_states
    synthesizer, q = learner.synthesizer, learner.synthesizer.param_values()

    def loss() -> Array:
        total = jnp.zeros(())
        for t in range(xs.shape[0]):
            total = total + jnp.sum((model(xs[t]) - target[t]) ** 2)
        for g in learner.graph.hidden_groups if synthetic else ():
            ends = [u.get_mantissa(hidden[p].value) for p in g.hidden_paths]
            g_hat = jax.lax.stop_gradient(synthesizer.apply(q, {g.index: jnp.stack(ends, -1)})[g.index])
            total = total + sum(jnp.sum(g_hat[..., s] * end) for s, end in enumerate(ends))
        return total

    grads = brainstate.transform.grad(loss, params)()
    for p, s in model.states().items():
        s.value = saved[p]
    return grads


@pytest.mark.parametrize("kind", ["gru", "snn"])
def test_window_on_etp_nn_models_equals_their_bptt_plus_the_synthetic_term(kind: str, rng: np.random.Generator) -> None:
    with brainstate.environ.context(dt=1.0 * u.ms):
        model = etp_nn.GRUCell(3, 4) if kind == "gru" else SNN()
        brainstate.nn.init_all_states(model, batch_size=B)
        out_size = 4 if kind == "gru" else 2
        xs = jnp.asarray(rng.normal(size=(4, B, 3))) * (1.0 if kind == "gru" else 3.0)
        target = jnp.asarray(rng.normal(size=(4, B, out_size)))
        learner = DNI(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner.compile_graph(xs[0])
        shapes = learner.group_signal_shapes()
        assert len(shapes) == (1 if kind == "gru" else 2)
        learner.attach_synthesizer(SyntheticGradient(shapes, scale=1.0, seed=9))  # the whole batch's signal per group
        brainstate.nn.reset_all_states(model, batch_size=B)
        _ = learner(MultiStepData(xs[:2]))  # a non-zero start state
        want = _model_oracle(model, learner, xs, target)
        bptt = _model_oracle(model, learner, xs, target, synthetic=False)
        params = model.states(brainstate.ParamState)
        got = brainstate.transform.grad(lambda c: jnp.sum((learner(MultiStepData(c)) - target) ** 2), params)(xs)
    assert set(got) == set(want)
    for path in want:
        _close(got[path], want[path], 1e-10)
    # the synthetic term is not negligible here
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(bptt), jax.tree.leaves(want))) > 1e-3


def test_compile_builds_a_dni_with_its_synthesizer(rng: np.random.Generator) -> None:
    import etp_algorithms

    model = etp_nn.GRUCell(3, 4)
    sg = SyntheticGradient({0: (4, 1)}, hidden_width=3, scale=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the compiler's notes on eligibility traces do not concern DNI
        learner = etp_algorithms.compile(model, DNI, jnp.zeros((B, 3)), batch_size=B, synthesizer=sg)
    assert isinstance(learner, DNI) and learner.is_compiled and learner.synthesizer is sg
    assert learner.trace_bytes() == 0  # no eligibility traces
    out = learner(MultiStepData(jnp.asarray(rng.normal(size=(3, B, 3)))))
    assert out.shape == (3, B, 4)


def test_vmapped_per_sample_dni_equals_the_batched_one(rng: np.random.Generator) -> None:
    """ETraceVmap of a per-sample DNI (the synthesizer shared by the samples) gives the batched DNI's gradients."""
    import etp_algorithms

    xs = jnp.asarray(rng.normal(size=(3, B, 3)))
    grads = []
    for vmap, scale in ((True, 1.0), (False, 1.0), (False, 0.0)):
        brainstate.random.seed(0)
        cell = etp_nn.GRUCell(3, 4)
        sg = SyntheticGradient({0: (4, 1)}, scale=scale, seed=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner = etp_algorithms.compile(cell, DNI, jnp.zeros((B, 3)), batch_size=B, vmap=vmap, synthesizer=sg)
        params = cell.states(brainstate.ParamState)
        total = None
        for t in range(3):
            g = brainstate.transform.grad(lambda x, f=learner: jnp.sum(jnp.sin(f(x))), params)(xs[t])
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        grads.append(total)
    _close(grads[0], grads[1])
    assert (
        max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[2]))) > 1e-3
    )


def test_dni_trained_online_on_the_snn_task_reduces_its_loss() -> None:
    """test_ostl's Poisson spike-pattern task, one step per call (a one-step window), Adam every step."""
    from test_ostl import _train_snn

    from etp_algorithms import DNI

    first, last = _train_snn(lambda model: DNI(model))
    assert np.isfinite(last) and last < 0.8 * first, (first, last)
