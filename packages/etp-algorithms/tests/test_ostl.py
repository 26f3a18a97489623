"""OSTL (Bohnstingl et al. 2022): OSTLRecurrent is D_RTRL, OSTLFeedforward is ES_D_RTRL with a decay.

Oracles: D_RTRL / ES_D_RTRL themselves on a GRU and a LIF network (the same rule, so equal to the
last bit), BPTT (``jax.grad`` through the unrolled model) on leaky integrators, the instantaneous
(spatial) gradient for OSTLFeedforward's default decay, and both rules written out by hand for a
tiny LIF layer with a sigmoid surrogate over a few steps.
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
from algorithms_testing import CASES, Driven, _bptt, _cases, _rel

import etp_nn
import etp_primitives as etp
from etp_algorithms import D_RTRL, ES_D_RTRL, ETraceAlgorithm, MultiStepData
from etp_algorithms import compile as etp_compile
from etp_algorithms._ostl import OSTLFeedforward, OSTLRecurrent

Array = jax.Array
B, I, H = 2, 3, 5


@pytest.fixture(autouse=True)
def _dt() -> Any:
    with brainstate.environ.context(dt=1.0 * u.ms):
        yield


class SNN(brainstate.nn.Module):
    """Linear -> etp_nn.LIF with recurrent spikes -> leaky readout."""

    def __init__(self, n_in: int = I, n_hidden: int = H, n_out: int = 2) -> None:
        super().__init__()
        self.n_hidden = n_hidden
        self.inp = etp_nn.Linear(n_in, n_hidden, w_init=brainstate.nn.init.KaimingNormal(3.0))
        self.rec = etp_nn.Linear(n_hidden, n_hidden, b_init=None)
        self.lif = etp_nn.LIF(n_hidden, tau=4.0 * u.ms, V_th=0.5 * u.mV)
        self.out = etp_nn.LeakyRateReadout(n_hidden, n_out, tau=3.0 * u.ms)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        shape = (self.n_hidden,) if batch_size is None else (batch_size, self.n_hidden)
        self.spikes = brainstate.HiddenState(jnp.zeros(shape))

    def update(self, x: Array) -> Array:
        self.spikes.value = self.lif((self.inp(x) + self.rec(self.spikes.value)) * u.mV)
        return self.out(self.spikes.value)


def _model(kind: str, seed: int = 3, batch: int | None = B) -> brainstate.nn.Module:
    brainstate.random.seed(seed)
    model = etp_nn.GRUCell(I, H) if kind == "gru" else SNN()
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


def _compiled(learner: ETraceAlgorithm, x: Array) -> ETraceAlgorithm:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(x)
    return learner


def _sequence_grads(learner: ETraceAlgorithm, xs: Array, ys: Array) -> Any:
    with brainstate.environ.context(dt=1.0 * u.ms):
        return learner.etrace_grad(xs, ys, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2), reduction="sum")


def _assert_same(got: Any, want: Any, tol: float = 0.0) -> None:
    assert set(got) == set(want)
    for path in want:
        for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path]), strict=True):
            assert _rel(a, b) <= tol, path


def _data(rng: np.random.Generator, kind: str, steps: int = 6, batch: int = B) -> tuple[Array, Array]:
    out = H if kind == "gru" else 2
    return jnp.asarray(rng.normal(size=(steps, batch, I))), jnp.asarray(rng.normal(size=(steps, batch, out)))


@pytest.mark.parametrize("kind", ["gru", "snn"])
def test_ostl_recurrent_equals_d_rtrl(kind: str, rng: np.random.Generator) -> None:
    xs, ys = _data(rng, kind)
    want = _sequence_grads(_compiled(D_RTRL(_model(kind)), xs[0]), xs, ys)
    learner = _compiled(OSTLRecurrent(_model(kind)), xs[0])
    assert learner.rule.name == "OSTLRecurrent"
    got = _sequence_grads(learner, xs, ys)
    _assert_same(got, want, tol=1e-13)
    assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(got))


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("name", CASES)
def test_ostl_recurrent_equals_bptt_on_leaky_integrators(name: str, steps: int, rng: np.random.Generator) -> None:
    op, weights, xs, leak, h_shape = _cases(rng)[name]
    leak_full = jnp.broadcast_to(leak, h_shape)
    r = jnp.asarray(rng.normal(size=h_shape))
    model = Driven(op, weights, leak_full, h_shape)
    learner = _compiled(OSTLRecurrent(model), xs[0])
    got = learner.etrace_grad(xs[:steps], step_fn=lambda x: jnp.sum(r * jnp.sin(learner(x))), reduction="sum")
    want = _bptt(op, weights, xs, leak_full, h_shape, r, steps)
    for key in want:
        assert _rel(got[("w",)][key], want[key]) < 1e-10, key


@pytest.mark.parametrize("decay_or_rank", [0.6, 3, 1e-6])
@pytest.mark.parametrize("kind", ["gru", "snn"])
def test_ostl_feedforward_equals_es_d_rtrl(kind: str, decay_or_rank: float | int, rng: np.random.Generator) -> None:
    xs, ys = _data(rng, kind)
    reference = _compiled(ES_D_RTRL(_model(kind), decay_or_rank), xs[0])
    learner = _compiled(OSTLFeedforward(_model(kind), decay_or_rank), xs[0])
    assert learner.decay == reference.decay and learner.rule.name == "OSTLFeedforward"
    _assert_same(_sequence_grads(learner, xs, ys), _sequence_grads(reference, xs, ys), tol=1e-13)


def test_ostl_feedforward_default_is_the_spatial_gradient(rng: np.random.Generator) -> None:
    """a = 1e-6: every step's gradient is the instantaneous one (h^{t-1} held fixed), up to O(a)."""
    op, weights, xs, leak, h_shape = _cases(rng)["mm+bias"]
    r = jnp.asarray(rng.normal(size=h_shape))
    learner = _compiled(OSTLFeedforward(Driven(op, weights, leak, h_shape)), xs[0])
    assert learner.decay == 1e-6
    params = learner.param_states
    h = jnp.zeros(h_shape)
    for t in range(6):
        got = brainstate.transform.grad(lambda x: jnp.sum(r * jnp.sin(learner(x))), params)(xs[t])[("w",)]
        want = jax.grad(lambda w, h=h, x=xs[t]: jnp.sum(r * jnp.sin(leak * h + op(x, w))))(weights)
        h = leak * h + op(xs[t], weights)
        for key in want:
            err = _rel(got[key], want[key])
            assert err < 1e-5, (t, key, err)
            if t > 0:  # not the full gradient: the history is dropped
                full = (
                    _bptt(op, weights, xs, leak, h_shape, r, t + 1)[key]
                    - _bptt(op, weights, xs, leak, h_shape, r, t)[key]
                )
                assert _rel(got[key], full) > 1e-3


class TinyLIF(brainstate.nn.Module):
    """v^t = alpha v^{t-1} - theta sg(s(v^{t-1})) + x^t W, output s(v^t); s the sigmoid surrogate spike."""

    def __init__(self, w: Array, alpha: float, theta: float, batch: int) -> None:
        super().__init__()
        self.alpha, self.theta = alpha, theta
        self.spike = etp_nn.SigmoidSurrogate(alpha=4.0)
        self.w = brainstate.ParamState(w)
        self.v = brainstate.HiddenState(jnp.zeros((batch, w.shape[1])))

    def update(self, x: Array) -> Array:
        reset = self.theta * jax.lax.stop_gradient(self.spike(self.v.value - self.theta))
        self.v.value = self.alpha * self.v.value - reset + etp.matmul(x, self.w.value)
        return self.spike(self.v.value - self.theta)


def _psi(u_: Array) -> Array:
    """The sigmoid surrogate's derivative, alpha = 4."""
    sig = jax.nn.sigmoid(4.0 * u_)
    return 4.0 * sig * (1 - sig)


@pytest.mark.parametrize("decay_or_rank", [0.6, 1e-6])
def test_ostl_rules_written_out_by_hand_on_a_lif_layer(decay_or_rank: float, rng: np.random.Generator) -> None:
    T, Bt, It, O, alpha, theta = 6, 2, 3, 4, 0.8, 0.4
    w = jnp.asarray(rng.normal(size=(It, O)))
    xs = jnp.asarray(rng.uniform(size=(T, Bt, It)) < 0.5, dtype=jnp.float64)
    target = jnp.asarray(rng.uniform(size=(Bt, O)))
    ff_model, rec_model = TinyLIF(w, alpha, theta, Bt), TinyLIF(w, alpha, theta, Bt)
    ff = _compiled(OSTLFeedforward(ff_model, decay_or_rank), xs[0])
    rec = _compiled(OSTLRecurrent(rec_model), xs[0])
    a = decay_or_rank
    eps_x, eps_f, e, v = jnp.zeros((Bt, It)), jnp.zeros((Bt, O)), jnp.zeros((Bt, It)), jnp.zeros((Bt, O))
    spiked = 0.0
    for t in range(T):
        got_ff = brainstate.transform.grad(lambda x: jnp.sum((ff(x) - target) ** 2), ff.param_states)(xs[t])
        got_rec = brainstate.transform.grad(lambda x: jnp.sum((rec(x) - target) ** 2), rec.param_states)(xs[t])
        s_prev = jnp.asarray(v - theta > 0, jnp.float64)
        spiked = spiked + float(jnp.sum(s_prev))
        v = alpha * v - theta * s_prev + xs[t] @ w
        s = jnp.asarray(v - theta > 0, jnp.float64)
        g = 2 * (s - target) * _psi(v - theta)  # the spatial learning signal dL/dv^t (surrogate)
        # OSTLFeedforward: eps_x, eps_f with D = alpha, D_f = 1; bias-corrected
        eps_x = a * eps_x + xs[t]
        eps_f = a * alpha * eps_f + (1 - a)
        want_ff = eps_x.T @ (g * eps_f) / (1 - a ** (t + 1))
        # OSTLRecurrent: e^t = alpha e^{t-1} + x^t (the same for every output unit), dW = sum_b e g
        e = alpha * e + xs[t]
        want_rec = e.T @ g
        np.testing.assert_allclose(got_ff[("w",)], want_ff, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got_rec[("w",)], want_rec, rtol=1e-10, atol=1e-12)
    assert spiked > 0  # the reset was exercised


def _train_snn(make: Any, iters: int = 30, labels_box: dict[str, Array] | None = None) -> tuple[float, float]:
    """A 3-class Poisson spike-pattern task (examples/snn_online.py, small); Adam every step, online.

    ``labels_box``: the trial's labels are put there (for a modulator that reads them).
    """
    n_in, n_classes, steps, batch = 12, 3, 12, 16
    rng = np.random.default_rng(0)
    templates = rng.uniform(0.05, 0.5, size=(n_classes, n_in))
    with brainstate.environ.context(dt=1.0 * u.ms):
        brainstate.random.seed(1)
        model = SNN(n_in, 16, n_classes)
        brainstate.nn.init_all_states(model, batch_size=batch)
        learner = _compiled(make(model), jnp.zeros((batch, n_in)))
        params = learner.param_states
        # Adam (Kingma & Ba), written out: the test needs no optimizer library
        zeros = {k: jax.tree.map(jnp.zeros_like, s.value) for k, s in params.items()}
        opt = brainstate.ShortTermState((zeros, zeros, jnp.zeros(())))

        def adam(grads: Any) -> None:
            m, v, t = opt.value
            t = t + 1
            m = jax.tree.map(lambda a, g: 0.9 * a + 0.1 * g, m, grads)
            v = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grads)
            for k, s in params.items():
                step = jax.tree.map(
                    lambda mk, vk: 2e-2 * (mk / (1 - 0.9**t)) / (jnp.sqrt(vk / (1 - 0.999**t)) + 1e-8), m[k], v[k]
                )
                s.value = jax.tree.map(lambda p, d: p - d, s.value, step)
            opt.value = (m, v, t)

        def loss_fn(x: Array, labels: Array, **kwargs: Any) -> Array:
            logits = learner(x, **kwargs)
            return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, n_classes), -1))

        @brainstate.transform.jit
        def trial(xs: Array, labels: Array) -> Array:
            brainstate.nn.reset_all_states(model, batch_size=batch)
            learner.reset_state()
            if labels_box is not None:
                labels_box["labels"] = labels

            def one(x: Array) -> Array:
                grads, loss = brainstate.transform.grad(loss_fn, params, return_value=True)(x, labels)
                adam(grads)
                return loss

            return jnp.mean(brainstate.transform.for_loop(one, xs))

        losses = []
        for _ in range(iters):
            labels = rng.integers(0, n_classes, size=batch)
            xs = jnp.asarray(rng.uniform(size=(steps, batch, n_in)) < templates[labels], jnp.float64)
            losses.append(float(trial(xs, jnp.asarray(labels))))
    return float(np.mean(losses[:5])), float(np.mean(losses[-5:]))


@pytest.mark.parametrize("make", [OSTLRecurrent, OSTLFeedforward], ids=["recurrent", "feedforward"])
def test_an_snn_trained_online_reduces_its_loss(make: Any) -> None:
    first, last = _train_snn(make)
    assert np.isfinite(last) and last < 0.8 * first, (first, last)


@pytest.mark.parametrize("make", [OSTLRecurrent, OSTLFeedforward], ids=["recurrent", "feedforward"])
def test_vmap_over_a_batch_equals_the_batched_learner(make: Any, rng: np.random.Generator) -> None:
    xs, ys = _data(rng, "gru")
    want = _sequence_grads(_compiled(make(_model("gru")), xs[0]), xs, ys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vmapped = etp_compile(_model("gru", batch=None), make, xs[0], batch_size=B, vmap=True)
    for path, state in vmapped.module.model.states(brainstate.ParamState).items():
        state.value = _model("gru").states(brainstate.ParamState)[path].value
    got = vmapped.etrace_grad(xs, ys, step_fn=lambda x, y: jnp.sum((vmapped(x) - y) ** 2), reduction="sum")
    _assert_same(got, want, tol=1e-10)


def test_multi_step_windows_equal_the_reference_learners(rng: np.random.Generator) -> None:
    xs, ys = _data(rng, "gru")
    for mine, ref in [
        (OSTLRecurrent(_model("gru"), vjp_method="multi-step"), D_RTRL(_model("gru"), vjp_method="multi-step")),
        (
            OSTLFeedforward(_model("gru"), 0.5, vjp_method="multi-step"),
            ES_D_RTRL(_model("gru"), 0.5, vjp_method="multi-step"),
        ),
    ]:
        _compiled(mine, xs[0]), _compiled(ref, xs[0])
        grads = []
        for learner in (mine, ref):
            grads.append(
                learner.etrace_grad(
                    xs,
                    ys,
                    step_fn=lambda x, y, lr=learner: jnp.sum((lr(MultiStepData(x)) - y) ** 2, axis=(1, 2)),
                    chunk_size=3,
                    reduction="sum",
                )
            )
        _assert_same(grads[0], grads[1], tol=1e-13)


def test_bad_decay_names_the_learner() -> None:
    model = _model("gru")
    for bad, kind in [(0.0, ValueError), (1.0, ValueError), (-2, ValueError), ("0.5", TypeError)]:
        with pytest.raises(kind, match="OSTLFeedforward"):
            OSTLFeedforward(model, bad)
    assert OSTLFeedforward(model, 3).decay == 0.5
    with pytest.raises(ValueError, match="vjp_method"):
        OSTLRecurrent(model, vjp_method="sideways")
