"""braintrace 0.2.8's keywords on the layers: ``kernel_init``, ``param_type`` and ``in_size`` on LoRA; ``r_init``
and a plain ``tau`` (with a plain ``dt``) on LeakyRateReadout. Each is checked against the same call with our
keyword and against the formula written out in NumPy; giving both keywords is an error."""

from __future__ import annotations

import math
from typing import Any

import brainstate
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from nn_testing import param_leaves_reaching_etp

import etp_nn


def _ramp(scale: float) -> Any:
    """A deterministic initializer ``shape -> scale * (0, 1, 2, ...)`` (a different array for each shape)."""

    def initializer(shape: Any, **kwargs: Any) -> Any:
        shape = tuple(shape)
        return scale * jnp.arange(math.prod(shape), dtype=jnp.float64).reshape(shape)

    return initializer


# ---------------------------------------------------------------------------------------------------------------
# LoRA: kernel_init, param_type, in_size


@pytest.mark.parametrize("kernel", [_ramp(0.1), 0.3, np.float64(-0.7)])
def test_lora_kernel_init_is_both_factor_initializers(rng: np.random.Generator, kernel: Any) -> None:
    peer = etp_nn.LoRA(3, 2, 4, alpha=0.5, kernel_init=kernel)
    ours = etp_nn.LoRA(3, 2, 4, alpha=0.5, B_init=kernel, A_init=kernel)
    B = np.broadcast_to(kernel((3, 2)) if callable(kernel) else kernel, (3, 2))
    A = np.broadcast_to(kernel((2, 4)) if callable(kernel) else kernel, (2, 4))
    for layer in (peer, ours):
        np.testing.assert_array_equal(layer.weight.value["lora_b"], B)
        np.testing.assert_array_equal(layer.weight.value["lora_a"], A)
    x = rng.normal(size=(5, 3))
    np.testing.assert_allclose(peer(jnp.asarray(x)), 0.5 * x @ B @ A, rtol=1e-12)
    np.testing.assert_array_equal(peer(jnp.asarray(x)), ours(jnp.asarray(x)))
    assert param_leaves_reaching_etp(peer, jnp.asarray(x)) == {
        ("weight", "lora_b"): {"etp_lora_mm"},
        ("weight", "lora_a"): {"etp_lora_mm"},
    }


def test_lora_kernel_init_with_our_keywords_is_an_error() -> None:
    with pytest.raises(TypeError, match=r"LoRA: got both kernel_init= .* and B_init=; give kernel_init alone"):
        etp_nn.LoRA(3, 2, 4, kernel_init=0.1, B_init=0.2)
    with pytest.raises(TypeError, match=r"LoRA: got both kernel_init= .* and B_init= and A_init="):
        etp_nn.LoRA(3, 2, 4, kernel_init=0.1, B_init=0.2, A_init=0.3)
    with pytest.raises(ValueError, match=r"LoRA: kernel_init must give an array of shape \(3, 2\)"):
        etp_nn.LoRA(3, 2, 4, kernel_init=np.ones((4, 4)))


def test_lora_defaults_are_unchanged_by_the_new_keywords(rng: np.random.Generator) -> None:
    layer = etp_nn.LoRA(3, 2, 4)
    assert not np.any(np.asarray(layer.weight.value["lora_a"]))  # A: zeros, so the adapter starts as a no-op
    assert np.all(np.asarray(layer.weight.value["lora_b"]) != 0.0)  # B: LeCun normal
    assert type(layer.weight) is brainstate.ParamState
    assert layer.in_size == (3,) and layer.out_size == (4,)


def test_lora_param_type(rng: np.random.Generator) -> None:
    class Frozen(brainstate.ParamState):
        pass

    B, A = rng.normal(size=(3, 2)), rng.normal(size=(2, 4))
    layer = etp_nn.LoRA(3, 2, 4, B_init=B, A_init=A, param_type=Frozen)
    assert type(layer.weight) is Frozen
    x = rng.normal(size=(2, 3))
    np.testing.assert_allclose(layer(jnp.asarray(x)), x @ B @ A, rtol=1e-12)
    with pytest.raises(TypeError, match=r"LoRA: param_type must be brainstate.ParamState or a subclass"):
        etp_nn.LoRA(3, 2, 4, param_type=brainstate.HiddenState)
    with pytest.raises(TypeError, match=r"LoRA: param_type must be brainstate.ParamState or a subclass"):
        etp_nn.LoRA(3, 2, 4, param_type=dict)  # type: ignore[arg-type]


def test_lora_in_size(rng: np.random.Generator) -> None:
    layer = etp_nn.LoRA(3, 2, 4, in_size=(7, 3))
    assert layer.in_size == (7, 3) and layer.out_size == (7, 4)
    assert etp_nn.LoRA(3, 2, 4, in_size=3).in_size == (3,)
    for bad in ((7, 4), (), (3.0,), (True,)):
        with pytest.raises(
            ValueError, match=r"LoRA: in_size must be an int or a tuple of ints ending with in_features=3"
        ):
            etp_nn.LoRA(3, 2, 4, in_size=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# LeakyRateReadout: r_init, and a plain tau with a plain dt


def test_rate_readout_r_init_is_r_initializer(rng: np.random.Generator) -> None:
    w, r0 = rng.normal(size=(3, 2)), rng.normal(size=2)
    peer = etp_nn.LeakyRateReadout(3, 2, tau=2.0 * u.ms, w_init=jnp.asarray(w), r_init=jnp.asarray(r0))
    ours = etp_nn.LeakyRateReadout(3, 2, tau=2.0 * u.ms, w_init=jnp.asarray(w), r_initializer=jnp.asarray(r0))
    positional = etp_nn.LeakyRateReadout(3, 2, 2.0 * u.ms, jnp.asarray(w), jnp.asarray(r0))  # 0.2.8's order too
    x = rng.normal(size=(4, 3))
    r = r0
    with brainstate.environ.context(dt=0.5 * u.ms):
        for layer in (peer, ours, positional):
            layer.init_state(4)
            np.testing.assert_array_equal(layer.r.value, np.broadcast_to(r0, (4, 2)))
        expected = np.exp(-0.5 / 2.0) * r + x @ w
        outs = [layer(jnp.asarray(x)) for layer in (peer, ours, positional)]
    for out in outs:
        np.testing.assert_allclose(out, expected, rtol=1e-12)
    with pytest.raises(
        TypeError, match=r"LeakyRateReadout: got both r_initializer= and r_init= \(r_init is braintrace"
    ):
        etp_nn.LeakyRateReadout(3, 2, r_initializer=jnp.zeros(2), r_init=jnp.zeros(2))


@pytest.mark.parametrize("tau", [4.0, 4, np.float64(4.0), jnp.asarray(4.0), np.array([4.0, 2.0])])
def test_rate_readout_plain_tau_with_plain_dt(rng: np.random.Generator, tau: Any) -> None:
    """A plain ``tau`` with a plain ``dt`` integrates like ``tau`` ms with ``dt`` ms: same formula, same numbers."""
    w = rng.normal(size=(5, 2))
    with brainstate.environ.context(dt=0.25):
        plain = etp_nn.LeakyRateReadout(5, 2, tau=tau, w_init=jnp.asarray(w))
    timed = etp_nn.LeakyRateReadout(5, 2, tau=np.asarray(tau, dtype=float) * u.ms, w_init=jnp.asarray(w))
    plain.init_state(3)
    timed.init_state(3)
    r = np.zeros((3, 2))
    for _ in range(4):
        x = jnp.asarray(rng.normal(size=(3, 5)))
        with brainstate.environ.context(dt=0.25):
            out = plain(x)
        with brainstate.environ.context(dt=0.25 * u.ms):
            out_timed = timed(x)
        r = np.exp(-0.25 / np.asarray(tau, dtype=float)) * r + np.asarray(x) @ w
        np.testing.assert_allclose(out, r, rtol=1e-12)
        np.testing.assert_allclose(out, out_timed, rtol=1e-12)
        assert not isinstance(out, u.Quantity) and out.dtype == jnp.float64


def test_rate_readout_tau_and_dt_must_agree() -> None:
    with brainstate.environ.context(dt=1.0 * u.ms):
        with pytest.raises(ValueError, match=r"LeakyRateReadout: tau must be a time .* when the environment time step"):
            etp_nn.LeakyRateReadout(3, 2, tau=5.0)
        timed = etp_nn.LeakyRateReadout(3, 2, tau=5.0 * u.ms)
    with brainstate.environ.context(dt=1.0):
        plain = etp_nn.LeakyRateReadout(3, 2, tau=5.0)  # built with a plain dt; the dt of each step is checked
    plain.init_state()
    timed.init_state()
    with brainstate.environ.context(dt=1.0 * u.ms):
        with pytest.raises(ValueError, match=r"LeakyRateReadout: tau is a plain number \(5.0\), so the environment"):
            plain(jnp.ones(3))
    with brainstate.environ.context(dt=1.0):
        with pytest.raises(ValueError, match=r"LeakyRateReadout: tau is a time \(.*ms\), so the environment"):
            timed(jnp.ones(3))
    with brainstate.environ.context(dt=1.0 * u.mV):
        with pytest.raises(ValueError, match=r"LeakyRateReadout: tau is a plain number .* got unit mV"):
            plain(jnp.ones(3))


@pytest.mark.parametrize(
    ("tau", "error", "match"),
    [
        (0.0, ValueError, r"LeakyRateReadout: tau must be > 0; got 0.0"),
        (np.array([1.0, -1.0]), ValueError, r"LeakyRateReadout: tau must be > 0"),
        (-2.0 * u.ms, ValueError, r"LeakyRateReadout: tau must be > 0"),
        (True, TypeError, r"LeakyRateReadout: tau must be a time .* or a plain positive number .*; got bool"),
        ("5 ms", TypeError, r"LeakyRateReadout: tau must be a time .*; got str"),
        (5.0 * u.mV, ValueError, r"LeakyRateReadout: tau must be a time .* with a unit like ms; got unit mV"),
    ],
)
def test_rate_readout_bad_tau(tau: Any, error: type[Exception], match: str) -> None:
    with brainstate.environ.context(dt=1.0), pytest.raises(error, match=match):
        etp_nn.LeakyRateReadout(3, 2, tau=tau)
