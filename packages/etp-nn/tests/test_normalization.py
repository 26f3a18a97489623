"""BatchNorm0d/1d/2d, LayerNorm, RMSNorm: documented formulas, training mode, transformations, dtype, marker, errors.

References are written out in NumPy from the layer's parameters (no XLA compilation, so the tests stay fast).
"""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_testing import param_leaves_reaching_etp

import etp_nn

C = 3
BATCHNORMS = {0: etp_nn.BatchNorm0d, 1: etp_nn.BatchNorm1d, 2: etp_nn.BatchNorm2d}
SPATIAL = {0: (), 1: (5,), 2: (4, 2)}
ELEMWISE = {("weight", "scale"): {"etp_elemwise"}, ("weight", "bias"): {"etp_elemwise"}}


def _affine(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0.5, 2.0, size=(C,)), rng.normal(size=(C,))


def _close(actual: Any, want: Any) -> None:
    np.testing.assert_allclose(np.asarray(actual), want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm


@pytest.mark.parametrize("n", [0, 1, 2])
def test_batchnorm_fit_formula_and_running_stats(rng: np.random.Generator, n: int) -> None:
    scale, bias = _affine(rng)
    layer = BATCHNORMS[n](C, momentum=0.8, epsilon=1e-3, scale_init=scale, bias_init=bias)
    x = rng.normal(loc=2.0, size=(2, 3, *SPATIAL[n], C))  # two leading batch axes
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axis=axes), x.var(axis=axes)  # statistics over every axis but the last; biased variance
    want = scale * (x - mean) / np.sqrt(var + 1e-3) + bias
    with brainstate.environ.context(fit=True):
        y = layer(jnp.asarray(x))
    _close(y, want)
    assert y.dtype == jnp.float64
    _close(layer.running_mean.value, 0.8 * 0.0 + 0.2 * mean)
    _close(layer.running_var.value, 0.8 * 1.0 + 0.2 * var)
    assert layer.running_mean.value.dtype == jnp.float64


@pytest.mark.parametrize("n", [0, 1, 2])
def test_batchnorm_eval_uses_running_stats(rng: np.random.Generator, n: int) -> None:
    scale, bias = _affine(rng)
    layer = BATCHNORMS[n](C, epsilon=1e-5, scale_init=scale, bias_init=bias)
    running_mean, running_var = rng.normal(size=(C,)), rng.uniform(0.5, 2.0, size=(C,))
    layer.running_mean.value, layer.running_var.value = jnp.asarray(running_mean), jnp.asarray(running_var)
    xs = rng.normal(size=(4, *SPATIAL[n], C))
    want = scale * (xs - running_mean) / np.sqrt(running_var + 1e-5) + bias
    x = jnp.asarray(xs)
    with brainstate.environ.context(fit=False):
        _close(layer(x), want)
        _close(layer(x[0]), want[0])  # unbatched is fine without batch statistics
        _close(jax.vmap(layer)(x), want)
        assert param_leaves_reaching_etp(layer, x) == ELEMWISE
    _close(layer.running_mean.value, running_mean)  # not updated outside fit


def test_batchnorm_fit_under_jit_and_marker(rng: np.random.Generator) -> None:
    layer = etp_nn.BatchNorm1d((5, C))
    xs = rng.normal(size=(4, 5, C))
    x = jnp.asarray(xs)
    with brainstate.environ.context(fit=True):
        want = np.asarray(layer(x))
        first_mean = np.asarray(layer.running_mean.value)
        _close(brainstate.transform.jit(layer)(x), want)
        _close(layer.running_mean.value, 0.9 * first_mean + 0.1 * xs.mean(axis=(0, 1)))
        assert param_leaves_reaching_etp(layer, x) == ELEMWISE
    with brainstate.environ.context(fit=False):
        _close(jax.jit(lambda v: layer(v))(x), np.asarray(layer(x)))
    assert isinstance(layer.running_mean, brainstate.BatchState)
    assert isinstance(layer.running_var, brainstate.BatchState)
    assert set(layer.weight.value) == {"scale", "bias"}


def test_batchnorm_no_affine(rng: np.random.Generator) -> None:
    layer = etp_nn.BatchNorm0d(C, affine=False)
    assert not layer.states(brainstate.ParamState)
    x = rng.normal(size=(4, C))
    with brainstate.environ.context(fit=True):
        _close(layer(jnp.asarray(x)), (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5))


def test_batchnorm_errors() -> None:
    layer = etp_nn.BatchNorm1d(C)
    with pytest.raises(RuntimeError, match=r"BatchNorm1d: the training mode is not set.*environ.context\(fit=True\)"):
        layer(jnp.ones((2, 5, C)))
    with brainstate.environ.context(fit=True):
        with pytest.raises(ValueError, match=r"BatchNorm1d: x must have 3 features .* got shape \(2, 5, 4\)"):
            layer(jnp.ones((2, 5, 4)))
        with pytest.raises(
            ValueError, match=r"BatchNorm1d: x must have shape \(batch\.\.\., L, C\) with C = 3 .*\(5, 3\)"
        ):
            layer(jnp.ones((5, C)))
    with brainstate.environ.context(fit=False):
        with pytest.raises(ValueError, match=r"BatchNorm2d: x must have shape \(\[batch\.\.\.,\] H, W, C\) .*\(5, 3\)"):
            etp_nn.BatchNorm2d(C)(jnp.ones((5, C)))
        with pytest.raises(
            ValueError, match=r"BatchNorm1d: x must have shape \(\.\.\., 5, 3\) \(in_size\); got shape \(2, 4, 3\)"
        ):
            etp_nn.BatchNorm1d((5, C))(jnp.ones((2, 4, C)))
    with pytest.raises(ValueError, match=r"BatchNorm2d: in_size must be C or \(H, W, C\); got \(5, 3\)"):
        etp_nn.BatchNorm2d((5, C))
    with pytest.raises(ValueError, match=r"BatchNorm0d: momentum must lie in \[0, 1\]"):
        etp_nn.BatchNorm0d(C, momentum=1.5)
    with pytest.raises(ValueError, match=r"BatchNorm0d: scale_init must give an array of shape \(3,\)"):
        etp_nn.BatchNorm0d(C, scale_init=np.ones(4))


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm


def _layernorm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return scale * (x - mean) / np.sqrt(var + eps) + bias


def _rmsnorm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return scale * x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_layernorm_rmsnorm_formula(rng: np.random.Generator, batch: tuple[int, ...]) -> None:
    scale, bias = _affine(rng)
    x = rng.normal(loc=1.0, size=(*batch, C))
    layer_norm = etp_nn.LayerNorm(C, epsilon=1e-3, scale_init=scale, bias_init=bias)
    rms_norm = etp_nn.RMSNorm(C, epsilon=1e-3, scale_init=scale)
    for layer, want in ((layer_norm, _layernorm(x, scale, bias, 1e-3)), (rms_norm, _rmsnorm(x, scale, 1e-3))):
        y = layer(jnp.asarray(x))
        _close(y, want)
        assert y.dtype == jnp.float64


def test_layernorm_rmsnorm_transforms_and_marker(rng: np.random.Generator) -> None:
    scale, bias = _affine(rng)
    xs = rng.normal(size=(4, C))
    x = jnp.asarray(xs)
    layer_norm = etp_nn.LayerNorm(C, scale_init=scale, bias_init=bias)
    rms_norm = etp_nn.RMSNorm(C, scale_init=scale)
    for layer, want in ((layer_norm, _layernorm(xs, scale, bias, 1e-5)), (rms_norm, _rmsnorm(xs, scale, 1e-6))):
        _close(jax.jit(lambda v, layer=layer: layer(v))(x), want)
        _close(jax.vmap(layer)(x), want)
    assert param_leaves_reaching_etp(layer_norm, x) == ELEMWISE
    assert param_leaves_reaching_etp(layer_norm, x[0]) == ELEMWISE
    assert param_leaves_reaching_etp(rms_norm, x) == {("weight", "scale"): {"etp_elemwise"}}


def test_layernorm_rmsnorm_options(rng: np.random.Generator) -> None:
    x = rng.normal(size=(4, C))
    no_bias = etp_nn.LayerNorm(C, use_bias=False)
    assert set(no_bias.weight.value) == {"scale"}
    no_affine = etp_nn.LayerNorm(C, affine=False, epsilon=0.0)
    assert not no_affine.states(brainstate.ParamState)
    _close(no_affine(jnp.asarray(x)), (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True))
    _close(etp_nn.RMSNorm(C, affine=False, epsilon=0.0)(jnp.asarray(x)), x / np.sqrt((x**2).mean(-1, keepdims=True)))


def test_layernorm_rmsnorm_errors() -> None:
    with pytest.raises(ValueError, match=r"LayerNorm: x must have 3 features .* got shape \(2, 4\)"):
        etp_nn.LayerNorm(C)(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"RMSNorm: x must have 3 features .* got shape \(4,\)"):
        etp_nn.RMSNorm(C)(jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"LayerNorm: in_size must be a positive int"):
        etp_nn.LayerNorm(0)
    with pytest.raises(ValueError, match=r"RMSNorm: epsilon must be a non-negative float"):
        etp_nn.RMSNorm(C, epsilon=-1.0)
