"""IF, LIF, ALIF, Expon: the documented update written out, spike timing and resets, gradients, units,
batching, transformations, states and errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp_nn

DT = 0.5  # ms


@pytest.fixture(autouse=True)
def time_step() -> Iterator[None]:
    with brainstate.environ.context(dt=DT * u.ms):
        yield


def _mV(value: Any) -> np.ndarray:
    """Mantissa in mV (asserting the unit)."""
    assert u.get_unit(value) == u.mV
    return np.asarray(u.get_mantissa(value))


def _batch_shape(batch: int | None, n: int) -> tuple[int, ...]:
    return (n,) if batch is None else (batch, n)


# --------------------------------------------------------------------------- documented updates, written out


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("batch", [None, 3])
def test_lif_matches_written_update(rng: np.random.Generator, reset: str, batch: int | None) -> None:
    n, tau, v_th, v_reset, v_rest = 5, 4.0, 1.0, -0.3, 0.2
    lif = etp_nn.LIF(n, V_th=v_th * u.mV, V_reset=v_reset * u.mV, V_rest=v_rest * u.mV, tau=tau * u.ms, spk_reset=reset)
    lif.init_state(batch)
    x = rng.uniform(0.0, 4.0, size=_batch_shape(batch, n))
    V = np.zeros_like(x)
    total = 0.0
    for _ in range(15):
        spikes = lif(jnp.asarray(x) * u.mV)
        V = V + DT / tau * (v_rest - V + x)
        s = (V > v_th).astype(float)
        V = V - (v_th - v_reset) * s if reset == "soft" else V - (V - v_reset) * s
        np.testing.assert_array_equal(spikes, s)
        np.testing.assert_allclose(_mV(lif.V.value), V, rtol=1e-12, atol=1e-12)
        assert spikes.dtype == jnp.float64 and spikes.shape == x.shape
        total += s.sum()
    assert total > 0  # the inputs were chosen to make some units fire


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_if_matches_written_update(rng: np.random.Generator, reset: str) -> None:
    n, tau, v_th, v_reset = 4, 2.0, 1.5, 0.5
    neuron = etp_nn.IF(n, V_th=v_th * u.mV, V_reset=v_reset * u.mV, tau=tau * u.ms, spk_reset=reset)
    neuron.init_state(2)
    x = rng.uniform(-0.5, 3.0, size=(2, n))
    V = np.zeros_like(x)
    for _ in range(12):
        spikes = neuron(jnp.asarray(x) * u.mV)
        V = V + DT / tau * x
        s = (V > v_th).astype(float)
        V = V - (v_th - v_reset) * s if reset == "soft" else V - (V - v_reset) * s
        np.testing.assert_array_equal(spikes, s)
        np.testing.assert_allclose(_mV(neuron.V.value), V, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("batch", [None, 2])
def test_alif_matches_written_update(rng: np.random.Generator, reset: str, batch: int | None) -> None:
    n, tau, tau_a, beta, v_th, v_reset = 4, 3.0, 10.0, 0.4, 1.0, 0.0
    alif = etp_nn.ALIF(n, tau=tau * u.ms, tau_a=tau_a * u.ms, beta=beta * u.mV, spk_reset=reset)
    alif.init_state(batch)
    x = rng.uniform(1.0, 6.0, size=_batch_shape(batch, n))
    V, a = np.zeros_like(x), np.zeros_like(x)
    for _ in range(20):
        spikes = alif(jnp.asarray(x) * u.mV)
        V = V + DT / tau * (0.0 - V + x)
        theta = v_th + beta * a  # adaptation before this step's spike
        s = (V > theta).astype(float)
        V = V - (theta - v_reset) * s if reset == "soft" else V - (V - v_reset) * s
        a = np.exp(-DT / tau_a) * a + s
        np.testing.assert_array_equal(spikes, s)
        np.testing.assert_allclose(_mV(alif.V.value), V, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(alif.a.value, a, rtol=1e-12, atol=1e-12)
    assert a.max() > 1.0  # adaptation actually built up


@pytest.mark.parametrize("batch", [None, 3])
def test_expon_matches_written_update(rng: np.random.Generator, batch: int | None) -> None:
    n, tau = 4, 7.0
    syn = etp_nn.Expon(n, tau=tau * u.ms)
    syn.init_state(batch)
    g = np.zeros(_batch_shape(batch, n))
    for _ in range(6):
        x = rng.normal(size=g.shape)
        out = syn(jnp.asarray(x) * u.mV)
        g = np.exp(-DT / tau) * g + x
        np.testing.assert_allclose(_mV(out), g, rtol=1e-12)
        np.testing.assert_allclose(_mV(syn.g.value), g, rtol=1e-12)


def test_expon_unitless_and_other_units(rng: np.random.Generator) -> None:
    plain = etp_nn.Expon(3, unit=u.UNITLESS)
    plain.init_state()
    x = jnp.asarray(rng.normal(size=3))
    np.testing.assert_allclose(plain(x), x)
    assert not isinstance(plain.g.value, u.Quantity)
    current = etp_nn.Expon(3, unit=u.nA, g_initializer=jnp.ones(3) * u.pA)
    current.init_state()
    out = current(jnp.ones(3) * u.pA)
    assert u.get_unit(out) == u.nA
    np.testing.assert_allclose(u.get_mantissa(out), np.exp(-DT / 5.0) * 1e-3 + 1e-3, rtol=1e-12)
    with pytest.raises(ValueError, match=r"Expon: x must have a unit like nA; got unit mV"):
        current(jnp.ones(3) * u.mV)


# --------------------------------------------------------------------------- spike timing and reset


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_lif_spikes_exactly_at_crossing_step(reset: str) -> None:
    """x = 2 mV, tau = 2.5 ms, dt = 0.5 ms: V = 0.4, 0.72, 0.976, 1.1808 -> the 4th step crosses 1 mV."""
    lif = etp_nn.LIF(1, tau=2.5 * u.ms, spk_reset=reset)
    lif.init_state()
    x = jnp.asarray([2.0]) * u.mV
    spikes = [float(lif(x)[0]) for _ in range(3)]
    np.testing.assert_allclose(_mV(lif.V.value), [0.976], rtol=1e-12)
    spikes.append(float(lif(x)[0]))
    assert spikes == [0.0, 0.0, 0.0, 1.0]
    after = 1.1808 - 1.0 if reset == "soft" else 0.0
    np.testing.assert_allclose(_mV(lif.V.value), [after], rtol=1e-12, atol=1e-14)
    # the next step starts from the reset value
    assert float(lif(x)[0]) == 0.0
    np.testing.assert_allclose(_mV(lif.V.value), [after + 0.2 * (2.0 - after)], rtol=1e-12)


def test_if_spikes_exactly_at_crossing_step() -> None:
    neuron = etp_nn.IF(2, tau=1.0 * u.ms, spk_reset="hard")
    neuron.init_state()
    x = jnp.asarray([0.9, 0.3]) * u.mV  # +0.45 and +0.15 mV per step
    out = np.stack([np.asarray(neuron(x)) for _ in range(3)])
    np.testing.assert_array_equal(out, [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(_mV(neuron.V.value), [0.0, 0.45], rtol=1e-12)


def test_no_spike_below_threshold() -> None:
    lif = etp_nn.LIF(3)
    alif = etp_nn.ALIF(3)
    for neuron in (lif, alif):
        neuron.init_state()
        x = jnp.asarray([0.0, 0.5, 0.99]) * u.mV  # steady state V_rest + x stays below 1 mV
        spikes = brainstate.transform.for_loop(lambda i, x=x, neuron=neuron: neuron(x), jnp.arange(200))
        np.testing.assert_array_equal(spikes, 0.0)
    np.testing.assert_allclose(_mV(lif.V.value), [0.0, 0.5, 0.99], rtol=1e-6)


# --------------------------------------------------------------------------- gradients


def test_single_step_surrogate_gradient_is_exact() -> None:
    """ds/dx = f'((V'-V_th)/(V_th-V_reset)) * (dt/tau) / (V_th - V_reset) for one step from V = 0."""
    surrogate = etp_nn.SigmoidSurrogate(alpha=3.0)
    lif = etp_nn.LIF(3, V_reset=-1.0 * u.mV, tau=2.0 * u.ms, spk_fun=surrogate)
    lif.init_state()

    def spikes(xm: jax.Array) -> jax.Array:
        lif.reset_state()
        return jnp.sum(lif(xm * u.mV))

    x = jnp.asarray([2.0, 4.0, 5.5])
    grad = brainstate.transform.grad(spikes, argnums=0)(x)
    v = DT / 2.0 * x
    want = surrogate.grad((v - 1.0) / 2.0) * (DT / 2.0) / 2.0
    np.testing.assert_allclose(grad, want, rtol=1e-12)


@pytest.mark.parametrize("cls", [etp_nn.IF, etp_nn.LIF, etp_nn.ALIF])
def test_spike_count_gradient_nonzero_near_threshold(cls: Any) -> None:
    neuron = cls(3, spk_fun=etp_nn.PiecewiseLinearSurrogate(width=0.5))
    neuron.init_state()

    def count(xm: jax.Array) -> jax.Array:
        neuron.reset_state()
        return sum((jnp.sum(neuron(xm * u.mV)) for _ in range(10)), jnp.asarray(0.0))

    grad = brainstate.transform.grad(count, argnums=0)(jnp.asarray([1.0, 2.0, -50.0]))
    assert np.all(np.isfinite(grad))
    assert grad[0] > 0 and grad[1] > 0  # near / around threshold
    assert grad[2] == 0.0  # far below threshold the triangular surrogate is exactly zero


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_reset_spike_is_detached(reset: str) -> None:
    """After a spiking step, dV/dx is that of the integration alone for 'soft' (dt/tau) and 0 for 'hard'."""
    lif = etp_nn.LIF(2, tau=2.0 * u.ms, spk_reset=reset)
    lif.init_state()

    def potential(xm: jax.Array) -> jax.Array:
        lif.reset_state()
        lif(xm * u.mV)
        return jnp.sum(u.get_mantissa(lif.V.value))

    grad = brainstate.transform.grad(potential, argnums=0)(jnp.asarray([6.0, 1.0]))  # unit 0 spikes, unit 1 not
    np.testing.assert_allclose(grad, [DT / 2.0 if reset == "soft" else 0.0, DT / 2.0], rtol=1e-12)


def test_alif_dynamics_are_elementwise(rng: np.random.Generator) -> None:
    """The Jacobian of one step's new (V, a) w.r.t. the input is diagonal: no coupling between units."""
    alif = etp_nn.ALIF(4, beta=0.5 * u.mV)
    alif.init_state()
    alif.V.value = jnp.asarray(rng.uniform(0.5, 1.2, size=4)) * u.mV
    alif.a.value = jnp.asarray(rng.uniform(0.0, 2.0, size=4))
    V0, a0 = alif.V.value, alif.a.value

    def step(xm: jax.Array) -> jax.Array:
        alif.V.value, alif.a.value = V0, a0
        alif(xm * u.mV)
        return jnp.concatenate([u.get_mantissa(alif.V.value), alif.a.value])

    jac = np.asarray(brainstate.transform.jacrev(step)(jnp.asarray(rng.uniform(0.5, 3.0, size=4))))
    for block in (jac[:4], jac[4:]):
        np.testing.assert_array_equal(block - np.diag(np.diag(block)), 0.0)
    assert np.all(np.diag(jac[:4]) != 0.0)


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("cls", [etp_nn.IF, etp_nn.LIF, etp_nn.ALIF])
def test_state_units_and_input_conversion(cls: Any) -> None:
    a, b = cls(3), cls(3)
    a.init_state()
    b.init_state()
    assert u.get_unit(a.V.value) == u.mV
    x = jnp.asarray([0.5, 3.0, 8.0])
    for _ in range(4):
        np.testing.assert_array_equal(a(x * u.mV), b(x * 1e-3 * u.volt))
    assert u.get_unit(b.V.value) == u.mV
    np.testing.assert_allclose(_mV(a.V.value), _mV(b.V.value), rtol=1e-12)
    if cls is etp_nn.ALIF:
        assert not isinstance(a.a.value, u.Quantity)


def test_state_kept_in_threshold_unit() -> None:
    lif = etp_nn.LIF(2, V_th=1.0 * u.volt, V_reset=0.0 * u.mV, V_rest=0.0 * u.mV)
    lif.init_state()
    assert u.get_unit(lif.V.value) == u.volt
    out = lif(jnp.asarray([3000.0, 10.0]) * u.mV)  # 3 V and 0.01 V drive
    assert u.get_unit(lif.V.value) == u.volt
    np.testing.assert_allclose(u.get_mantissa(lif.V.value), [0.3, 0.001], rtol=1e-12)
    np.testing.assert_array_equal(out, [0.0, 0.0])


@pytest.mark.parametrize("cls", [etp_nn.IF, etp_nn.LIF, etp_nn.ALIF])
def test_wrong_input_unit(cls: Any) -> None:
    neuron = cls(3)
    neuron.init_state()
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"{name}: x must be a voltage with a unit like mV .*; got unit mA"):
        neuron(jnp.ones(3) * u.mA)
    with pytest.raises(ValueError, match=rf"{name}: x must be a voltage .*; got no unit \(a plain number/array\)"):
        neuron(jnp.ones(3))


# --------------------------------------------------------------------------- batching and transformations


@pytest.mark.parametrize("cls", [etp_nn.IF, etp_nn.LIF, etp_nn.ALIF, etp_nn.Expon])
def test_batched_matches_unbatched(cls: Any, rng: np.random.Generator) -> None:
    xs = jnp.asarray(rng.uniform(-1.0, 5.0, size=(8, 3, 4))) * u.mV
    batched = cls(4)
    batched.init_state(3)
    out = np.stack([np.asarray(u.get_mantissa(batched(x))) for x in xs])
    for row in range(3):
        single = cls(4)
        single.init_state()
        got = np.stack([np.asarray(u.get_mantissa(single(x[row]))) for x in xs])
        np.testing.assert_allclose(got, out[:, row], rtol=1e-12)
    assert u.get_unit(batched(xs[0])) == (u.mV if cls is etp_nn.Expon else u.UNITLESS)


@pytest.mark.parametrize("cls", [etp_nn.IF, etp_nn.LIF, etp_nn.ALIF, etp_nn.Expon])
def test_jit_for_loop_and_vmap_agree_with_eager(cls: Any, rng: np.random.Generator) -> None:
    xs = jnp.asarray(rng.uniform(-1.0, 5.0, size=(6, 3, 4))) * u.mV
    neuron = cls(4)
    neuron.init_state(3)
    eager = [u.get_mantissa(neuron(x)) for x in xs]
    final = [np.asarray(u.get_mantissa(s.value)) for s in neuron.states(brainstate.HiddenState).values()]

    def check(outputs: Any) -> None:
        np.testing.assert_allclose(np.stack([np.asarray(u.get_mantissa(o)) for o in outputs]), np.stack(eager))
        states = [np.asarray(u.get_mantissa(s.value)) for s in neuron.states(brainstate.HiddenState).values()]
        for got, want in zip(states, final, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12)

    neuron.reset_state(3)
    step = brainstate.transform.jit(lambda x: neuron(x))
    check([step(x) for x in xs])
    neuron.reset_state(3)
    check(brainstate.transform.for_loop(lambda x: neuron(x), xs))
    # per-sample (unbatched) states, mapped over the batch axis
    neuron.reset_state(3)
    mapped = brainstate.transform.vmap2(
        lambda x: neuron(x),
        state_in_axes={0: brainstate.HiddenState},
        state_out_axes={0: brainstate.HiddenState},
    )
    check([mapped(x) for x in xs])


@pytest.mark.parametrize("cls", [etp_nn.LIF, etp_nn.ALIF, etp_nn.Expon, etp_nn.LeakyRateReadout])
def test_states_keep_their_dtype_under_scan(cls: Any) -> None:
    """float32 states (environment precision) fed float64 input stay float32, so scan carries stay stable."""
    with brainstate.environ.context(precision=32):
        neuron = cls(4, 4) if cls is etp_nn.LeakyRateReadout else cls(4)
        neuron.init_state(2)
    xs = jnp.full((5, 2, 4), 2.0, dtype=jnp.float64)
    xs = xs if cls is etp_nn.LeakyRateReadout else xs * u.mV
    brainstate.transform.for_loop(lambda x: neuron(x), xs)
    for state in neuron.states(brainstate.HiddenState).values():
        assert u.get_mantissa(state.value).dtype == jnp.float32


def test_multidimensional_population(rng: np.random.Generator) -> None:
    lif = etp_nn.LIF((2, 3))
    lif.init_state(4)
    assert lif.V.value.shape == (4, 2, 3)
    x = jnp.asarray(rng.uniform(0.0, 9.0, size=(4, 2, 3))) * u.mV
    assert lif(x).shape == (4, 2, 3)
    with pytest.raises(ValueError, match=r"LIF: x must end with the population shape \(2, 3\)"):
        lif(jnp.ones((4, 3, 2)) * u.mV)


# --------------------------------------------------------------------------- states


def test_states_are_hidden_states() -> None:
    for cls, names in [(etp_nn.IF, {"V"}), (etp_nn.LIF, {"V"}), (etp_nn.ALIF, {"V", "a"}), (etp_nn.Expon, {"g"})]:
        neuron = cls(5)
        neuron.init_state(2)
        hidden = neuron.states(brainstate.HiddenState)
        assert {path[-1] for path in hidden} == names
        assert len(neuron.states(brainstate.ParamState)) == 0
        assert all(state.value.shape == (2, 5) for state in hidden.values())


@pytest.mark.parametrize("cls", [etp_nn.IF, etp_nn.LIF, etp_nn.ALIF, etp_nn.Expon])
def test_reset_state_restores_in_place(cls: Any) -> None:
    neuron = cls(3)
    brainstate.nn.init_all_states(neuron, batch_size=2)
    before = {k: (s, np.asarray(u.get_mantissa(s.value))) for k, s in neuron.states(brainstate.HiddenState).items()}
    for _ in range(5):
        neuron(jnp.full((2, 3), 7.0) * u.mV)
    assert any(not np.allclose(u.get_mantissa(s.value), v) for s, v in before.values())
    brainstate.nn.reset_all_states(neuron, batch_size=2)
    for key, state in neuron.states(brainstate.HiddenState).items():
        assert state is before[key][0]
        np.testing.assert_array_equal(u.get_mantissa(state.value), before[key][1])
    neuron.reset_state()  # re-shapes to unbatched
    assert all(s.value.shape == (3,) for s in neuron.states(brainstate.HiddenState).values())


def test_initializers() -> None:
    lif = etp_nn.LIF(3, V_initializer=0.5 * u.mV)
    lif.init_state(2)
    np.testing.assert_array_equal(_mV(lif.V.value), np.full((2, 3), 0.5))
    assert lif.V.value.dtype == jnp.float64
    plain = etp_nn.LIF(3, V_initializer=jnp.asarray([0.1, 0.2, 0.3]))  # plain values read in V_th's unit
    plain.init_state()
    np.testing.assert_allclose(_mV(plain.V.value), [0.1, 0.2, 0.3])
    alif = etp_nn.ALIF(3, a_initializer=jnp.ones(3))
    alif.init_state()
    np.testing.assert_array_equal(alif.a.value, np.ones(3))
    with pytest.raises(ValueError, match=r"LIF: V_initializer must give values with a unit like mV; got unit ms"):
        etp_nn.LIF(3, V_initializer=1.0 * u.ms).init_state()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", [etp_nn.IF, etp_nn.LIF, etp_nn.ALIF, etp_nn.Expon])
def test_wrong_feature_size_batch_and_uninitialised(cls: Any) -> None:
    neuron = cls(4)
    name = cls.__name__
    with pytest.raises(RuntimeError, match=rf"{name}: state '(V|g)' is used before it exists"):
        neuron(jnp.ones(4) * u.mV)
    neuron.init_state(3)
    with pytest.raises(ValueError, match=rf"{name}: x must have 4 features .* got shape \(3, 5\)"):
        neuron(jnp.ones((3, 5)) * u.mV)
    with pytest.raises(ValueError, match=rf"{name}: input batch shape \(2,\) .* state's batch shape \(3,\)"):
        neuron(jnp.ones((2, 4)) * u.mV)


def test_missing_time_step(monkeypatch: pytest.MonkeyPatch) -> None:
    def unset(**kwargs: Any) -> Any:
        raise KeyError("dt")

    monkeypatch.setattr(brainstate.environ, "get_dt", unset)
    syn = etp_nn.Expon(2)
    syn.init_state()
    with pytest.raises(RuntimeError, match=r"Expon: the time step is not set; run the layer inside"):
        syn(jnp.ones(2) * u.mV)


def test_time_step_must_be_a_time() -> None:
    lif = etp_nn.LIF(2)
    lif.init_state()
    with brainstate.environ.context(dt=0.1):
        with pytest.raises(ValueError, match=r"LIF: the environment time step dt must be a time"):
            lif(jnp.ones(2) * u.mV)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: etp_nn.LIF(3, tau=5.0 * u.mV),
            ValueError,
            r"LIF: tau must be a time with a unit like ms; got unit mV",
        ),
        (lambda: etp_nn.LIF(3, tau=-1.0 * u.ms), ValueError, r"LIF: tau must be > 0"),
        (lambda: etp_nn.LIF(3, V_th=1.0), ValueError, r"LIF: V_th must be a voltage .* got no unit"),
        (lambda: etp_nn.IF(3, V_reset=0.0 * u.mA), ValueError, r"IF: V_reset must be a voltage .* got unit mA"),
        (lambda: etp_nn.LIF(3, V_th=0.0 * u.mV), ValueError, r"LIF: V_th must be above V_reset"),
        (lambda: etp_nn.LIF(3, V_th=jnp.ones(4) * u.mV), ValueError, r"LIF: V_th must be a scalar or broadcastable"),
        (lambda: etp_nn.LIF(3, spk_reset="zero"), ValueError, r"LIF: spk_reset must be 'soft' or 'hard'"),
        (lambda: etp_nn.LIF(3, spk_fun=1.0), TypeError, r"LIF: spk_fun must be callable"),
        (lambda: etp_nn.ALIF(3, tau_a=0.0 * u.ms), ValueError, r"ALIF: tau_a must be > 0"),
        (lambda: etp_nn.ALIF(3, beta=0.1), ValueError, r"ALIF: beta must be a voltage"),
        (lambda: etp_nn.ALIF(3, beta=-0.1 * u.mV), ValueError, r"ALIF: beta must be >= 0"),
        (lambda: etp_nn.Expon(3, unit="mV"), TypeError, r"Expon: unit must be a saiunit.Unit"),
        (lambda: etp_nn.LIF(3, name="out"), None, None),
    ],
)
def test_bad_construction(make: Any, error: Any, match: str | None) -> None:
    if error is None:
        assert make().name == "out"
        return
    with pytest.raises(error, match=match):
        make()


def test_per_neuron_parameters(rng: np.random.Generator) -> None:
    v_th = np.array([0.5, 1.0, 2.0])
    tau = np.array([1.0, 2.0, 4.0])
    lif = etp_nn.LIF(3, V_th=jnp.asarray(v_th) * u.mV, tau=jnp.asarray(tau) * u.ms)
    lif.init_state(2)
    x = rng.uniform(0.0, 5.0, size=(2, 3))
    V = np.zeros_like(x)
    for _ in range(6):
        spikes = lif(jnp.asarray(x) * u.mV)
        V = V + DT / tau * (-V + x)
        s = (V > v_th).astype(float)
        V = V - v_th * s
        np.testing.assert_array_equal(spikes, s)
        np.testing.assert_allclose(_mV(lif.V.value), V, rtol=1e-12, atol=1e-12)
