"""LeakyRateReadout and LeakySpikeReadout: the documented equations over several steps, the ETP marker on
the weight, batching, jit, states and errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import brainstate
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from nn_testing import param_leaves_reaching_etp

import etp_nn

DT = 1.0  # ms


@pytest.fixture(autouse=True)
def time_step() -> Iterator[None]:
    with brainstate.environ.context(dt=DT * u.ms):
        yield


def _shape(batch: int | None, n: int) -> tuple[int, ...]:
    return (n,) if batch is None else (batch, n)


@pytest.mark.parametrize("batch", [None, 3])
def test_rate_readout_formula(rng: np.random.Generator, batch: int | None) -> None:
    tau = 4.0
    w = rng.normal(size=(5, 2))
    readout = etp_nn.LeakyRateReadout(5, 2, tau=tau * u.ms, w_init=jnp.asarray(w))
    readout.init_state(batch)
    r = np.zeros(_shape(batch, 2))
    for _ in range(6):
        x = rng.normal(size=_shape(batch, 5))
        out = readout(jnp.asarray(x))
        r = np.exp(-DT / tau) * r + x @ w
        np.testing.assert_allclose(out, r, rtol=1e-12)
        np.testing.assert_allclose(readout.r.value, r, rtol=1e-12)
        assert out.dtype == jnp.float64 and out.shape == r.shape


def test_rate_readout_initial_value_and_units(rng: np.random.Generator) -> None:
    w = rng.normal(size=(3, 2))
    readout = etp_nn.LeakyRateReadout(3, 2, tau=2.0 * u.ms, w_init=jnp.asarray(w), r_initializer=jnp.ones(2) * u.mV)
    readout.init_state()
    x = rng.normal(size=3)
    out = readout(jnp.asarray(x) * u.volt)  # x W in volts, converted to the state's mV
    assert u.get_unit(out) == u.mV
    np.testing.assert_allclose(u.get_mantissa(out), np.exp(-DT / 2.0) * 1.0 + 1e3 * (x @ w), rtol=1e-12)
    with pytest.raises(ValueError, match=r"LeakyRateReadout: x @ weight must have a unit like the readout's \(mV"):
        readout(jnp.asarray(x))


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("batch", [None, 3])
def test_spike_readout_formula(rng: np.random.Generator, batch: int | None, reset: str) -> None:
    tau, v_th, v_reset, v_rest = 3.0, 1.0, -0.2, 0.1
    w = rng.normal(size=(4, 3))
    readout = etp_nn.LeakySpikeReadout(
        4,
        3,
        tau=tau * u.ms,
        V_th=v_th * u.mV,
        w_init=jnp.asarray(w),
        V_reset=v_reset * u.mV,
        V_rest=v_rest * u.mV,
        spk_reset=reset,
    )
    readout.init_state(batch)
    V = np.zeros(_shape(batch, 3))
    total = 0.0
    for _ in range(10):
        x = rng.uniform(0.0, 3.0, size=_shape(batch, 4))
        spikes = readout(jnp.asarray(x))
        V = V + DT / tau * (v_rest - V + x @ w)
        s = (V > v_th).astype(float)
        V = V - (v_th - v_reset) * s if reset == "soft" else V - (V - v_reset) * s
        np.testing.assert_array_equal(spikes, s)
        assert u.get_unit(readout.V.value) == u.mV
        np.testing.assert_allclose(u.get_mantissa(readout.V.value), V, rtol=1e-12, atol=1e-12)
        total += s.sum()
    assert total > 0


def test_spike_readout_voltage_weights_and_wrong_units(rng: np.random.Generator) -> None:
    w = rng.normal(size=(2, 3))
    plain = etp_nn.LeakySpikeReadout(2, 3, w_init=jnp.asarray(w))
    volts = etp_nn.LeakySpikeReadout(2, 3, w_init=jnp.asarray(w) * 1e-3 * u.volt)
    plain.init_state()
    volts.init_state()
    for _ in range(5):
        x = jnp.asarray(rng.uniform(0.0, 4.0, size=2))
        np.testing.assert_array_equal(plain(x), volts(x))
    np.testing.assert_allclose(u.get_mantissa(plain.V.value), u.get_mantissa(volts.V.value), rtol=1e-12)
    with pytest.raises(ValueError, match=r"LeakySpikeReadout: x @ weight must be a voltage .*; got unit mA"):
        plain(jnp.ones(2) * u.mA)


@pytest.mark.parametrize("cls", [etp_nn.LeakyRateReadout, etp_nn.LeakySpikeReadout])
def test_weight_reaches_etp_primitive(cls: Any) -> None:
    readout = cls(5, 2)
    readout.init_state(4)
    assert param_leaves_reaching_etp(readout, jnp.ones((4, 5))) == {("weight", "weight"): {"etp_mm"}}
    readout.init_state()
    assert param_leaves_reaching_etp(readout, jnp.ones(5)) == {("weight", "weight"): {"etp_mv"}}


@pytest.mark.parametrize("cls", [etp_nn.LeakyRateReadout, etp_nn.LeakySpikeReadout])
def test_batched_matches_unbatched_and_jit(cls: Any, rng: np.random.Generator) -> None:
    w = jnp.asarray(rng.normal(size=(4, 3)))
    xs = jnp.asarray(rng.uniform(0.0, 2.0, size=(6, 2, 4)))
    batched = cls(4, 3, w_init=w)
    batched.init_state(2)
    eager = np.stack([np.asarray(batched(x)) for x in xs])
    for row in range(2):
        single = cls(4, 3, w_init=w)
        single.init_state()
        np.testing.assert_allclose(np.stack([np.asarray(single(x[row])) for x in xs]), eager[:, row], rtol=1e-12)
    batched.reset_state(2)
    step = brainstate.transform.jit(lambda x: batched(x))
    np.testing.assert_allclose(np.stack([np.asarray(step(x)) for x in xs]), eager, rtol=1e-12)
    batched.reset_state(2)
    np.testing.assert_allclose(brainstate.transform.for_loop(lambda x: batched(x), xs), eager, rtol=1e-12)


def test_states_and_parameters() -> None:
    rate = etp_nn.LeakyRateReadout(5, 2)
    spike = etp_nn.LeakySpikeReadout(5, 2)
    for readout, hidden in [(rate, "r"), (spike, "V")]:
        brainstate.nn.init_all_states(readout, batch_size=3)
        states = readout.states(brainstate.HiddenState)
        assert [path[-1] for path in states] == [hidden]
        assert next(iter(states.values())).value.shape == (3, 2)
        params = readout.states(brainstate.ParamState)
        assert list(params) == [("weight",)]
        assert set(readout.weight.value) == {"weight"} and readout.weight.value["weight"].shape == (5, 2)
        before = next(iter(states.values()))
        readout(jnp.ones((3, 5)))
        brainstate.nn.reset_all_states(readout, batch_size=3)
        assert next(iter(readout.states(brainstate.HiddenState).values())) is before
        np.testing.assert_array_equal(u.get_mantissa(before.value), 0.0)
    assert rate.in_size == (5,) and rate.out_size == (2,)
    assert spike.in_size == (5,) and spike.out_size == (2,)


@pytest.mark.parametrize("cls", [etp_nn.LeakyRateReadout, etp_nn.LeakySpikeReadout])
def test_errors(cls: Any) -> None:
    readout = cls(5, 2)
    name = cls.__name__
    state = "r" if cls is etp_nn.LeakyRateReadout else "V"
    with pytest.raises(RuntimeError, match=rf"{name}: state '{state}' is used before it exists"):
        readout(jnp.ones(5))
    readout.init_state(3)
    with pytest.raises(ValueError, match=rf"{name}: x must have 5 features .* got shape \(3, 2\)"):
        readout(jnp.ones((3, 2)))
    with pytest.raises(ValueError, match=rf"{name}: input batch shape \(4,\)"):
        readout(jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=rf"{name}: tau must be a time"):
        cls(5, 2, tau=1.0)
