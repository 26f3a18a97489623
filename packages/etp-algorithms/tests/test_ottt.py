"""OTTT (Xiao et al. 2022): presynaptic leaky traces times the instantaneous cotangent of the weight op.

Oracles: the paper's equations written out by hand for an etp_nn Linear -> LIF layer (the sigmoid
surrogate's derivative by hand, soft and hard reset), BPTT (``jax.grad`` through an unrolled loop) on
plain leaky integrators whose leak equals the decay and on etp_nn LIF networks where the math says
OTTT is exact (one feed-forward LIF layer with the soft detached reset), and where it says it is not
(a hard reset, a layer below another LIF layer, a decay other than the leak).
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
from algorithms_testing import Driven, _bptt, _cases, _rel
from test_ostl import _train_snn

import etp_nn
import etp_primitives as etp
from etp_algorithms import ETraceAlgorithm
from etp_algorithms._ottt import OTTT, OTTTTrace, ottt
from etp_compiler import NotSupportedError

Array = jax.Array
B, I, H, T = 2, 3, 4, 5


@pytest.fixture(autouse=True)
def _dt() -> Any:
    with brainstate.environ.context(dt=1.0 * u.ms):
        yield


def _compiled(learner: ETraceAlgorithm, x: Array) -> ETraceAlgorithm:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(x)
    return learner


class LIFLayer(brainstate.nn.Module):
    """etp_nn.Linear -> etp_nn.LIF; returns the spikes."""

    def __init__(self, w: Array, b: Array, reset: str = "soft") -> None:
        super().__init__()
        self.inp = etp_nn.Linear(w.shape[0], w.shape[1])
        self.inp.weight.value = {"weight": w, "bias": b}
        self.lif = etp_nn.LIF(w.shape[1], tau=4.0 * u.ms, V_th=0.5 * u.mV, spk_reset=reset)  # type: ignore[arg-type]

    def update(self, x: Array) -> Array:
        return self.lif(self.inp(x) * u.mV)


class TwoLayers(brainstate.nn.Module):
    """Linear -> LIF -> Linear -> LIF; returns the second layer's spikes."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = etp_nn.Linear(I, H, w_init=brainstate.nn.init.KaimingNormal(3.0))
        self.n1 = etp_nn.LIF(H, tau=4.0 * u.ms, V_th=0.5 * u.mV)
        self.l2 = etp_nn.Linear(H, 2, w_init=brainstate.nn.init.KaimingNormal(3.0))
        self.n2 = etp_nn.LIF(2, tau=2.0 * u.ms, V_th=0.5 * u.mV)

    def update(self, x: Array) -> Array:
        return self.n2(self.l2(self.n1(self.l1(x) * u.mV)) * u.mV)


def _psi(z: Array) -> Array:
    """The sigmoid surrogate's derivative (alpha = 4), by hand."""
    sig = 1.0 / (1.0 + jnp.exp(-4.0 * z))
    return 4.0 * sig * (1.0 - sig)


def _spikes(rng: np.random.Generator, steps: int = T, batch: int | None = B) -> Array:
    shape = (steps, I) if batch is None else (steps, batch, I)
    return jnp.asarray(rng.uniform(size=shape) < 0.6, dtype=jnp.float64)


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_ottt_written_out_by_hand_on_a_lif_layer(reset: str, jit: bool, rng: np.random.Generator) -> None:
    w, b = jnp.asarray(rng.normal(size=(I, H))) * 2.0, jnp.asarray(rng.normal(size=H)) * 0.5
    xs, target = _spikes(rng), jnp.asarray(rng.uniform(size=(B, H)))
    model = LIFLayer(w, b, reset)
    brainstate.nn.init_all_states(model, batch_size=B)
    learner = _compiled(OTTT(model), xs[0])
    assert learner.decays == (0.75,)

    def grads(x: Array) -> Any:
        return brainstate.transform.grad(lambda x: jnp.sum((learner(x) - target) ** 2), learner.param_states)(x)

    step = brainstate.transform.jit(grads) if jit else grads
    lam, c, th, gap = 0.75, 0.25, 0.5, 0.5  # 1 - dt/tau, dt/tau, V_th, V_th - V_reset
    a_hat, count, v, spiked = jnp.zeros((B, I)), 0.0, jnp.zeros((B, H)), 0.0
    for t in range(T):
        got = step(xs[t])[("inp", "weight")]
        v_new = lam * v + c * (xs[t] @ w + b)  # V' = V + dt/tau (V_rest - V + x), V_rest = 0
        z = (v_new - th) / gap
        s = jnp.asarray(z > 0, jnp.float64)
        delta = c * 2 * (s - target) * _psi(z) / gap  # dL^t/dy^t: the step's surrogate only
        a_hat, count = lam * a_hat + xs[t], lam * count + 1.0
        np.testing.assert_allclose(got["weight"], a_hat.T @ delta, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(got["bias"], count * delta.sum(0), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(learner.get_etrace_of(model.inp.weight).x, a_hat, rtol=1e-13)
        v = v_new - th * s if reset == "soft" else v_new - v_new * s
        spiked += float(jnp.sum(s))
    assert spiked > 0  # the reset was exercised


def _leaky_cases() -> list[str]:
    return ["mm+bias", "mv+bias", "conv1d+bias", "lora+bias", "sparse-csr+bias"]


@pytest.mark.parametrize("name", _leaky_cases())
def test_equals_bptt_on_a_leaky_integrator_whose_leak_is_the_decay(name: str, rng: np.random.Generator) -> None:
    op, weights, xs, _, h_shape = _cases(np.random.default_rng(0))[name]
    leak, steps = 0.8, 4
    r = jnp.asarray(rng.normal(size=h_shape))
    for decay, exact in [(leak, True), (0.3, False)]:
        learner = _compiled(OTTT(Driven(op, dict(weights), jnp.asarray(leak), h_shape), decay=decay), xs[0])
        got = learner.etrace_grad(
            xs[:steps], step_fn=lambda x, lr=learner: jnp.sum(r * jnp.sin(lr(x))), reduction="sum"
        )[("w",)]
        want = _bptt(op, weights, xs, jnp.asarray(leak), h_shape, r, steps)
        for key in want:
            if exact:
                assert _rel(got[key], want[key]) < 1e-12, key
            else:
                assert _rel(got[key], want[key]) > 1e-3, key


def _bptt_lif(model: brainstate.nn.Module, xs: Array, ys: Array) -> Any:
    """BPTT: jax.grad of the summed loss through the model unrolled over the sequence (no learner)."""
    params = model.states(brainstate.ParamState)

    def loss() -> Array:
        brainstate.nn.reset_all_states(model, batch_size=xs.shape[1])
        return sum((jnp.sum((model(xs[t]) - ys[t]) ** 2) for t in range(xs.shape[0])), jnp.zeros(()))

    return brainstate.transform.grad(loss, params)()


def _sequence(learner: ETraceAlgorithm, xs: Array, ys: Array) -> Any:
    return learner.etrace_grad(xs, ys, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2), reduction="sum")


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_a_feedforward_lif_layer_with_a_soft_reset_equals_bptt(reset: str, rng: np.random.Generator) -> None:
    w, b = jnp.asarray(rng.normal(size=(I, H))) * 2.0, jnp.asarray(rng.normal(size=H)) * 0.5
    xs, ys = _spikes(rng), jnp.asarray(rng.uniform(size=(T, B, H)))
    model = LIFLayer(w, b, reset)
    brainstate.nn.init_all_states(model, batch_size=B)
    want = _bptt_lif(model, xs, ys)
    brainstate.nn.init_all_states(model, batch_size=B)
    got = _sequence(_compiled(OTTT(model), xs[0]), xs, ys)
    err = max(_rel(got[("inp", "weight")][k], want[("inp", "weight")][k]) for k in ("weight", "bias"))
    if reset == "soft":  # the detached soft reset keeps dV^t/dV^{t-1} = lambda: forward mode = BPTT
        assert err < 1e-12
    else:  # a hard reset multiplies it by 1 - s^t, which OTTT ignores
        assert err > 1e-3


def test_below_another_lif_layer_ottt_drops_the_upper_layers_memory(rng: np.random.Generator) -> None:
    xs, ys = _spikes(rng, steps=6), jnp.asarray(rng.uniform(size=(6, B, 2)))
    brainstate.random.seed(5)
    model = TwoLayers()
    brainstate.nn.init_all_states(model, batch_size=B)
    want = _bptt_lif(model, xs, ys)
    brainstate.nn.init_all_states(model, batch_size=B)
    learner = _compiled(OTTT(model), xs[0])
    assert learner.decays == (0.75, 0.5)  # each weight's own postsynaptic leak
    got = _sequence(learner, xs, ys)
    assert _rel(got[("l2", "weight")]["weight"], want[("l2", "weight")]["weight"]) < 1e-12
    assert _rel(got[("l1", "weight")]["weight"], want[("l1", "weight")]["weight"]) > 1e-3
    assert float(jnp.max(jnp.abs(want[("l1", "weight")]["weight"]))) > 0


def test_an_unbatched_model_and_the_rule_as_a_value(rng: np.random.Generator) -> None:
    op, weights, xs, _, h_shape = _cases(np.random.default_rng(0))["mv+bias"]
    r = jnp.asarray(rng.normal(size=h_shape))
    learner = _compiled(ETraceAlgorithm(Driven(op, dict(weights), jnp.asarray(0.6), h_shape), ottt(0.6)), xs[0])
    got = learner.etrace_grad(xs[:3], step_fn=lambda x: jnp.sum(r * jnp.sin(learner(x))), reduction="sum")
    want = _bptt(op, weights, xs, jnp.asarray(0.6), h_shape, r, 3)
    for key in want:
        assert _rel(got[("w",)][key], want[key]) < 1e-12
    trace = learner.get_etrace_of(("w",))
    assert isinstance(trace, OTTTTrace) and trace.x.shape == xs.shape[1:] and trace.decay == 0.6
    np.testing.assert_allclose(trace.count, 1 + 0.6 + 0.36)
    np.testing.assert_allclose(trace["x"], xs[2] + 0.6 * xs[1] + 0.36 * xs[0], rtol=1e-13)
    learner.reset_state()
    assert float(jnp.max(jnp.abs(learner.get_etrace_of(("w",)).x))) == 0.0


def test_bad_input_gets_clear_errors() -> None:
    model = LIFLayer(jnp.ones((I, H)), jnp.zeros(H))
    brainstate.nn.init_all_states(model)
    for bad, kind in [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError), ("0.5", TypeError)]:
        with pytest.raises(kind, match="OTTT: decay"):
            OTTT(model, decay=bad)
    with pytest.raises(TypeError, match="one float leak lambda"):
        OTTT(model, decay=jnp.asarray([0.5, 0.6]))
    with pytest.raises(RuntimeError, match="compile_graph"):
        _ = OTTT(model).decays
    with pytest.raises(NotSupportedError, match="multi-step"):
        OTTT(model, vjp_method="multi-step")
    leaky = Driven(lambda x, w: etp.matmul(x, w["weight"]), {"weight": jnp.ones((I, H))}, jnp.asarray(0.5), (H,))
    with pytest.raises(ValueError, match=r"weight w .*pass decay="):
        OTTT(leaky).compile_graph(jnp.zeros(I))
    assert OTTT(leaky, decay=0.5).compile_graph(jnp.zeros(I)) is not None

    class IFLayer(brainstate.nn.Module):  # no leak: lambda = 1 is outside [0, 1)
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.neu = etp_nn.Linear(I, H), etp_nn.IF(H)

        def update(self, x: Array) -> Array:
            return self.neu(self.inp(x) * u.mV)

    if_layer = IFLayer()
    brainstate.nn.init_all_states(if_layer)
    with pytest.raises(ValueError, match=r"inp\.weight.*pass decay="):
        OTTT(if_layer).compile_graph(jnp.zeros(I))


def test_an_snn_trained_online_reduces_its_loss() -> None:
    """test_ostl's 3-class Poisson spike-pattern task (Linear + recurrent LIF + leaky readout), Adam online."""
    made: list[OTTT] = []

    def make(model: brainstate.nn.Module) -> OTTT:
        made.append(OTTT(model))
        return made[-1]

    first, last = _train_snn(make)
    assert np.isfinite(last) and last < 0.8 * first, (first, last)
    assert made[0].decays == pytest.approx((0.75, 0.75, float(np.exp(-1 / 3))))  # LIF's twice, the readout's


class Stack(brainstate.nn.Module):
    """Linear -> a neuron layer -> LeakyRateReadout (the decays are derived per weight)."""

    def __init__(self, neuron: brainstate.nn.Module) -> None:
        super().__init__()
        self.inp, self.neuron = etp_nn.Linear(I, H), neuron
        self.out = etp_nn.LeakyRateReadout(H, 2, tau=3.0 * u.ms)

    def update(self, x: Array) -> Array:
        return self.out(self.neuron(self.inp(x) * u.mV))


@pytest.mark.parametrize(
    "make, dt, lam",
    [
        (lambda: etp_nn.LIF(H, tau=4.0 * u.ms), 1.0, 0.75),
        (lambda: etp_nn.ALIF(H, tau=5.0 * u.ms), 1.0, 0.8),
        (lambda: etp_nn.LIF(H, tau=4.0 * u.ms), 0.5, 0.875),
    ],
    ids=["lif", "alif", "lif-dt0.5"],
)
def test_the_leak_is_derived_per_weight_from_the_etp_nn_layers(make: Any, dt: float, lam: float) -> None:
    with brainstate.environ.context(dt=dt * u.ms):
        model = Stack(make())
        brainstate.nn.init_all_states(model)
        learner = _compiled(OTTT(model), jnp.zeros(I))
        assert learner.decays == pytest.approx((lam, float(np.exp(-dt / 3.0))), rel=1e-12)
        assert _compiled(OTTT(model, decay=0.5), jnp.zeros(I)).decays == (0.5, 0.5)


def test_a_per_unit_time_constant_is_not_derived() -> None:
    model = Stack(etp_nn.LIF(H, tau=jnp.linspace(2.0, 5.0, H) * u.ms))
    brainstate.nn.init_all_states(model)
    with pytest.raises(ValueError, match=r"inp\.weight.*scalar tau.*pass decay="):
        OTTT(model).compile_graph(jnp.zeros(I))


def test_compile_with_vmap_over_a_batch_equals_the_batched_learner(rng: np.random.Generator) -> None:
    from etp_algorithms import compile as etp_compile

    op, weights, xs, _, h_shape = _cases(np.random.default_rng(0))["mm+bias"]
    r = jnp.asarray(rng.normal(size=h_shape))
    batched = _compiled(OTTT(Driven(op, dict(weights), jnp.asarray(0.8), h_shape), decay=0.8), xs[0])
    want = batched.etrace_grad(xs[:4], step_fn=lambda x: jnp.sum(r * jnp.sin(batched(x))), reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Driven(op, dict(weights), jnp.asarray(0.8), h_shape[1:])
        vmapped = etp_compile(model, OTTT, xs[0], batch_size=xs.shape[1], vmap=True, decay=0.8)
    got = vmapped.etrace_grad(xs[:4], step_fn=lambda x: jnp.sum(r * jnp.sin(vmapped(x))), reduction="sum")
    for key in ("weight", "bias"):
        assert _rel(got[("w",)][key], want[("w",)][key]) < 1e-12, key


def test_a_loss_of_the_stored_potential_reaches_the_weight_through_dL_dh(rng: np.random.Generator) -> None:
    """L^t = sum(r * V^t) of the state after the reset: dL/dV' = r (the reset is detached), delta = c r."""
    w, b = jnp.asarray(rng.normal(size=(I, H))) * 2.0, jnp.asarray(rng.normal(size=H)) * 0.5
    xs, r = _spikes(rng), jnp.asarray(rng.normal(size=(B, H)))
    model = LIFLayer(w, b)
    brainstate.nn.init_all_states(model, batch_size=B)
    learner = _compiled(OTTT(model), xs[0])

    def loss(x: Array) -> Array:
        learner(x)
        return jnp.sum(r * model.lif.V.value.mantissa)

    a_hat, count = jnp.zeros((B, I)), 0.0
    for t in range(T):
        got = brainstate.transform.grad(loss, learner.param_states)(xs[t])[("inp", "weight")]
        a_hat, count = 0.75 * a_hat + xs[t], 0.75 * count + 1.0
        np.testing.assert_allclose(got["weight"], a_hat.T @ (0.25 * r), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(got["bias"], count * 0.25 * r.sum(0), rtol=1e-10, atol=1e-13)


def test_without_dt_a_plain_model_is_asked_for_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    """No dt set: a model without etp_nn neurons is asked for decay= (not brainstate's KeyError about dt)."""
    leaky = Driven(lambda x, w: etp.matmul(x, w["weight"]), {"weight": jnp.ones((I, H))}, jnp.asarray(0.5), (H,))

    def no_dt() -> Any:
        raise KeyError("Key 'dt' not found in environment.")

    monkeypatch.setattr(brainstate.environ, "get_dt", no_dt)
    with pytest.raises(ValueError, match=r"weight w .*pass decay="):
        OTTT(leaky).compile_graph(jnp.zeros(I))
