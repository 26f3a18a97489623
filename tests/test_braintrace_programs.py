"""A program written for braintrace 0.2.8 (only its names: ``braintrace``, ``braintrace.nn``, ``brainstate``) runs on ETP.

It uses the driver API of issue 15 the way braintrace's documentation shows it: ``compile`` by a
case-insensitive name with learner options, ``learner.update`` on a single step (also on a
multi-step learner), ``etrace_grad`` / ``etrace_evolve`` over time-major sequences with a mask and
windows, ``show_graph``, the ``CompilationReport``, and ``compile(..., vmap=True)``. The numbers are
checked against BPTT (``jax.grad`` through the unrolled model, float64) and against the hand loop.
"""

from __future__ import annotations

import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace

B, I, H, T = 2, 3, 5, 6


class Net(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = braintrace.nn.GRUCell(I, H)
        self.out = braintrace.nn.Linear(H, 2)

    def update(self, x: jax.Array) -> jax.Array:
        return self.out(self.rnn(x))


def _bptt(model: brainstate.nn.Module, xs: jax.Array, ys: jax.Array, mask: jax.Array) -> dict:
    params = model.states(brainstate.ParamState)
    saved = {p: s.value for p, s in model.states().items()}

    def loss() -> jax.Array:
        total = 0.0
        for t in range(T):
            total = total + mask[t] * jnp.sum((model(xs[t]) - ys[t]) ** 2)
        return total

    grads = brainstate.transform.grad(loss, params)()
    for p, s in model.states().items():
        s.value = saved[p]
    return grads


@pytest.fixture
def x64() -> object:
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield None
    jax.config.update("jax_enable_x64", previous)


def test_a_braintrace_program_runs_and_gives_bptt_in_one_window(x64: object) -> None:
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    ys = jnp.asarray(rng.normal(size=(T, B, 2)))
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])

    brainstate.random.seed(1)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compiler's notes on the readout and the reset gate
        learner = braintrace.compile(model, "D_RTRL", xs[0], batch_size=B, vjp_method="multi-step")
    assert isinstance(learner, braintrace.D_RTRL) and isinstance(learner, braintrace.SequenceDriverMixin)
    assert isinstance(learner.report, braintrace.CompilationReport)
    text = learner.show_graph(verbose=False, return_msg=True)
    assert isinstance(text, str) and "Eligibility-trace memory" in text

    y = learner.update(xs[0])  # one step, also on a multi-step learner
    assert y.shape == (B, 2)
    brainstate.nn.reset_all_states(model, batch_size=B)
    learner.reset_state()
    want = _bptt(model, xs, ys, mask)

    def window_loss(x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.sum((learner(braintrace.MultiStepData(x)) - y) ** 2, axis=(1, 2))

    grads, losses = learner.etrace_grad(
        xs, ys, step_fn=window_loss, mask=mask, chunk_size=T, reduction="sum", return_value=True
    )
    assert losses.shape == (T,)  # per-step losses, the windows flattened
    for path, value in want.items():
        for got, expected in zip(jax.tree.leaves(grads[path]), jax.tree.leaves(value), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)

    outs = learner.etrace_evolve(xs, return_outputs=True)  # a plain learner call per step
    assert outs.shape == (T, B, 2)


def test_a_braintrace_program_with_es_d_rtrl_and_vmap(x64: object) -> None:
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    ys = jnp.asarray(rng.normal(size=(T, B, 2)))
    results = []
    for vmap in (False, True):
        brainstate.random.seed(2)
        model = Net()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner = braintrace.compile(model, "es_d_rtrl", xs[0], batch_size=B, vmap=vmap, decay_or_rank=0.8)
        assert isinstance(learner, braintrace.ETraceVmap) is vmap

        def step_loss(x: jax.Array, y: jax.Array, learner: object = learner) -> jax.Array:
            return jnp.sum((learner(x) - y) ** 2)

        results.append(learner.etrace_grad(xs, ys, step_fn=step_loss, reduction="mean"))
    batched, per_sample = results
    assert set(batched) == set(per_sample)
    for path in batched:
        for a, b in zip(jax.tree.leaves(batched[path]), jax.tree.leaves(per_sample[path]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert any(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(batched))
