"""``GradExpon``: the leaky running sum of gradients, against the recursion written out (float64)."""

from __future__ import annotations

import brainstate
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

from etp_algorithms._grad_expon import GradExpon


def test_decay_given_directly(rng: np.random.Generator) -> None:
    grads = [{"w": rng.normal(size=(2, 3)), "b": rng.normal(size=3)} for _ in range(5)]
    acc = GradExpon({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, 0.6)
    want = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    for g in grads:
        want = {k: 0.6 * want[k] + g[k] for k in want}
        got = acc.update({k: jnp.asarray(v) for k, v in g.items()})
        for k in want:
            assert np.allclose(np.asarray(got[k]), want[k], rtol=0, atol=1e-12)
    acc.reset_state()
    assert all(float(jnp.abs(v).max()) == 0.0 for v in acc.value.value.values())


def test_decay_from_a_time_constant() -> None:
    with brainstate.environ.context(dt=0.5 * u.ms):
        acc = GradExpon(jnp.zeros(2), 4.0 * u.ms)
    assert acc.decay == pytest.approx(float(np.exp(-0.5 / 4.0)), abs=1e-15)
    _ = acc.update(jnp.ones(2))
    assert np.allclose(np.asarray(acc.update(jnp.ones(2))), 1.0 + np.exp(-0.125), rtol=0, atol=1e-12)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"tau_or_decay \(a decay\) must be in \[0, 1\).*got 1.5"):
        GradExpon(jnp.zeros(2), 1.5)
    with pytest.raises(ValueError, match="must be a time"):
        GradExpon(jnp.zeros(2), 3.0 * u.mV)
    with pytest.raises(ValueError, match="time constant must be > 0"):
        GradExpon(jnp.zeros(2), -3.0 * u.ms)
    with pytest.raises(ValueError, match="expected that of grad_shape"):
        GradExpon({"w": jnp.zeros(2)}, 0.5).update(jnp.zeros(2))
