"""UORO: the rank-one unbiased estimate of the RTRL influence.

Oracles: the rule of Tallec & Ollivier (2017) written out here on a hand-written vanilla RNN step
(``tanh([x, h] W + b)``, Jacobians by ``jax.jacfwd``, the same key splits), BPTT (``jax.grad`` through
the unrolled hand model) and the exact influence ``dh/dtheta`` by ``jax.jacfwd`` of the unrolled hand
model, in float64.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algorithms_testing import _rel

import etp_nn
from etp_algorithms import MultiStepData
from etp_algorithms._executor import execute_step
from etp_algorithms._uoro import UORO

Array = jax.Array
W_LEAF = (("W", "weight"), ("weight",))
B_LEAF = (("W", "weight"), ("bias",))
EPS = 1e-7


def _cell(batch: int | None, rng: np.random.Generator, n_in: int = 3, n_h: int = 4) -> Any:
    cell = etp_nn.VanillaRNNCell(n_in, n_h, activation="tanh")
    brainstate.nn.init_all_states(cell, batch_size=batch)
    # a non-zero bias, so every leaf has a non-trivial influence
    cell.W.weight.value = {**cell.W.weight.value, "bias": jnp.asarray(rng.normal(size=n_h)) * 0.3}
    return cell


def _hand_step(h: Array, theta: dict[str, Array], x: Array) -> Array:
    return jnp.tanh(jnp.concatenate([x, h], axis=-1) @ theta["weight"] + theta["bias"])


def _loss_of(h_new: Array, y: Array) -> Array:
    return jnp.sum((h_new - y) ** 2)


def _hand_uoro(theta: dict[str, Array], h0: Array, xs: Array, ys: Array, key: Any) -> list[dict[str, Any]]:
    """UORO written out: per step the traces after it and the gradient of that step's loss."""
    h_t, t_t = jnp.zeros_like(h0), {k: jnp.zeros_like(v) for k, v in theta.items()}
    h = h0
    out = []
    for t in range(xs.shape[0]):
        # the gradient of L^t: its own term + (dL^t/dh^{t-1} . h~^{t-1}) theta~^{t-1}
        g_theta, g_h = jax.grad(lambda w, hh, t=t: _loss_of(_hand_step(hh, w, xs[t]), ys[t]), argnums=(0, 1))(theta, h)
        grad = {k: g_theta[k] + jnp.sum(g_h * h_t) * t_t[k] for k in theta}
        key, draw = jax.random.split(key)
        (one,) = jax.random.split(draw, 1)
        nu = jax.random.rademacher(one, h.shape, h.dtype)
        J_h = jax.jacfwd(lambda hh, t=t: _hand_step(hh, theta, xs[t]))(h)  # (*h, *h)
        J_w = jax.jacfwd(lambda w, h=h, t=t: _hand_step(h, w, xs[t]))(theta)  # {k: (*h, *w_k)}
        h_prop = jnp.tensordot(J_h, h_t, axes=h.ndim)
        nu_w = {k: jnp.tensordot(nu, J_w[k], axes=h.ndim) for k in theta}
        norm_t = jnp.sqrt(sum(jnp.sum(v**2) for v in t_t.values()))
        norm_nu_w = jnp.sqrt(sum(jnp.sum(v**2) for v in nu_w.values()))
        rho0 = jnp.sqrt(norm_t / (jnp.linalg.norm(h_prop) + EPS)) + EPS
        rho1 = jnp.sqrt(norm_nu_w / (jnp.linalg.norm(nu) + EPS)) + EPS
        h_t = rho0 * h_prop + rho1 * nu
        t_t = {k: t_t[k] / rho0 + nu_w[k] / rho1 for k in theta}
        h = _hand_step(h, theta, xs[t])
        out.append({"h_tilde": h_t, "theta_tilde": t_t, "grad": grad, "h": h})
    return out


def _setup(batch: int | None, rng: np.random.Generator, steps: int = 3, **options: Any) -> Any:
    cell = _cell(batch, rng)
    lead = () if batch is None else (batch,)
    xs = jnp.asarray(rng.normal(size=(steps, *lead, 3)))
    ys = jnp.asarray(rng.normal(size=(steps, *lead, 4)))
    learner = UORO(cell, **options)
    learner.compile_graph(xs[0])
    theta = dict(cell.W.weight.value)
    return cell, learner, xs, ys, theta


@pytest.mark.parametrize("batch", [None, 2])
def test_each_step_equals_the_rule_by_hand(batch: int | None, rng: np.random.Generator) -> None:
    key = jax.random.key(11)
    cell, learner, xs, ys, theta = _setup(batch, rng, projection_key=key)
    want = _hand_uoro(theta, cell.h.value, xs, ys, key)
    params = cell.states(brainstate.ParamState)
    for t in range(xs.shape[0]):
        grad = brainstate.transform.grad(lambda t=t: _loss_of(learner(xs[t]), ys[t]), params)()
        trace = learner.etrace.value
        assert trace.keys == (B_LEAF, W_LEAF) or trace.keys == (W_LEAF, B_LEAF)
        got_theta = dict(zip(trace.keys, trace.theta_tilde, strict=True))
        assert jnp.allclose(trace.h_tilde[0], want[t]["h_tilde"], rtol=1e-12, atol=1e-12), t
        for leaf, k in ((W_LEAF, "weight"), (B_LEAF, "bias")):
            assert jnp.allclose(got_theta[leaf], want[t]["theta_tilde"][k], rtol=1e-12, atol=1e-12), (t, k)
            assert jnp.allclose(grad[("W", "weight")][k], want[t]["grad"][k], rtol=1e-12, atol=1e-12), (t, k)
        assert jnp.allclose(cell.h.value, want[t]["h"], rtol=0, atol=1e-12)
    # guards: the history term is non-zero from step 2 on, and the signs are fresh every step
    assert float(jnp.abs(want[1]["h_tilde"]).max()) > 0.1
    history = want[2]["grad"]["weight"] - jax.grad(
        lambda w: _loss_of(_hand_step(want[1]["h"], {**theta, "weight": w}, xs[2]), ys[2])
    )(theta["weight"])
    assert float(jnp.abs(history).max()) > 1e-3


def test_the_key_forms_agree_and_a_reset_replays_the_draws(rng: np.random.Generator) -> None:
    traces = []
    for key in (5, np.int64(5), jax.random.key(5), jax.random.PRNGKey(5)):
        brainstate.random.seed(0)  # the same weights
        cell, learner, xs, ys, theta = _setup(2, np.random.default_rng(1), projection_key=key)
        learner(xs[0])
        learner(xs[1])
        traces.append(learner.etrace.value)
    for other in traces[1:]:
        for a, b in zip(jax.tree.leaves(traces[0]), jax.tree.leaves(other), strict=True):
            assert jnp.array_equal(a, b)
    # another seed: other signs
    brainstate.random.seed(0)
    cell, learner, xs, ys, theta = _setup(2, np.random.default_rng(1), projection_key=6)
    learner(xs[0])
    learner(xs[1])
    assert not jnp.allclose(learner.etrace.value.h_tilde[0], traces[0].h_tilde[0])
    # a reset starts the key sequence again
    learner.init_etrace_state()
    assert not jnp.any(learner.etrace.value.h_tilde[0])
    assert jnp.array_equal(learner.etrace.value.key, jax.random.key_data(jax.random.key(6)))


@pytest.mark.parametrize("bad", ["key", 1.5, True, None, jnp.zeros(3), jnp.zeros((2,), jnp.float32)])
def test_a_non_key_projection_key_is_refused(bad: Any) -> None:
    cell = etp_nn.VanillaRNNCell(3, 4)
    brainstate.nn.init_all_states(cell)
    with pytest.raises(
        TypeError, match=rf"uoro: projection_key must be a JAX PRNG key .* of type {type(bad).__name__}"
    ):
        UORO(cell, projection_key=bad)


def test_bad_epsilon_is_refused() -> None:
    cell = etp_nn.VanillaRNNCell(3, 4)
    brainstate.nn.init_all_states(cell)
    with pytest.raises(ValueError, match=r"uoro: epsilon must be >= 0, got -1.0"):
        UORO(cell, epsilon=-1.0)
    with pytest.raises(TypeError, match=r"uoro: epsilon must be a Python, NumPy or concrete 0-d JAX number"):
        UORO(cell, epsilon="small")


def test_etrace_grad_equals_the_rule_by_hand(rng: np.random.Generator) -> None:
    key = jax.random.key(3)
    cell, learner, xs, ys, theta = _setup(2, rng, steps=4, projection_key=key)
    want = _hand_uoro(theta, cell.h.value, xs, ys, key)
    got = learner.etrace_grad(xs, ys, step_fn=lambda x, y: _loss_of(learner(x), y), reduction="sum")
    for k in theta:
        total = sum(w["grad"][k] for w in want)
        assert _rel(got[("W", "weight")][k], total) < 1e-11, k


def test_windows_equal_bptt_inside_and_the_estimate_at_their_start(rng: np.random.Generator) -> None:
    """Windows of 2 steps on 4: window 1 is exact BPTT from the zero estimate; window 2 is exact BPTT from h^2
    plus (dL_{3,4}/dh^2 . h~^2) theta~^2, the estimate after step 2 (the same draws step by step)."""
    key = jax.random.key(8)
    cell, learner, xs, ys, theta = _setup(2, rng, steps=4, projection_key=key, vjp_method="multi-step")
    h0 = cell.h.value
    hand = _hand_uoro(theta, h0, xs, ys, key)

    def window(w: dict[str, Array], h: Array, start: int) -> Array:
        total = 0.0
        for t in range(start, start + 2):
            h = _hand_step(h, w, xs[t])
            total = total + _loss_of(h, ys[t])
        return total

    first = jax.grad(window)(theta, h0, 0)
    second, g_h2 = jax.grad(window, argnums=(0, 1))(theta, hand[1]["h"], 2)
    dot = jnp.sum(g_h2 * hand[1]["h_tilde"])
    want = {k: first[k] + second[k] + dot * hand[1]["theta_tilde"][k] for k in theta}

    def window_loss(x: Array, y: Array) -> Array:
        return jnp.sum((learner(MultiStepData(x)) - y) ** 2, axis=tuple(range(1, y.ndim)))

    got = learner.etrace_grad(xs, ys, step_fn=window_loss, chunk_size=2, reduction="sum")
    for k in theta:
        assert _rel(got[("W", "weight")][k], want[k]) < 1e-11, k
    assert float(jnp.abs(dot * hand[1]["theta_tilde"]["weight"]).max()) > 1e-3  # the start term matters


def test_the_mean_over_seeds_is_the_rtrl_gradient(rng: np.random.Generator) -> None:
    r"""E[(g . h~^T) theta~^T] = g . dh^T/dtheta after T = 4 steps, for a fixed cotangent g.

    4000 seeds, vmapped; per entry the mean must lie within 4 standard errors (measured here from the
    samples) of the exact value (``jax.jacfwd`` of the unrolled hand model). A false failure at 4 SE has
    probability about 6e-5 per entry (the seeds are fixed, so the test is deterministic); the same bound
    rejects the instantaneous influence dF/dtheta of the last step alone (the guard below).
    """
    steps, seeds = 4, 4000
    cell = _cell(2, rng, n_in=2, n_h=3)
    xs = jnp.asarray(rng.normal(size=(steps, 2, 2)))
    learner = UORO(cell, projection_key=0)
    learner.compile_graph(xs[0])
    ctx, rule, graph = learner.context, learner.rule, learner.graph
    minfo = graph.module_info
    theta = dict(cell.W.weight.value)
    h0 = jnp.asarray(rng.normal(size=(2, 3))) * 0.5
    # the step values along the trajectory (they do not depend on the draws)
    values, h = [], h0
    for t in range(steps):
        invals = list(minfo.current_inputs(xs[t]))
        invals[minfo.jaxpr.invars.index(minfo.hidden_path_to_invar[("h",)])] = h
        values.append(execute_step(graph, invals))
        h = _hand_step(h, theta, xs[t])
    g = {("h",): jnp.asarray(rng.normal(size=(2, 3)))}

    def estimate(key_data: Array) -> Any:
        traces = dataclasses.replace(rule.init_traces(ctx), key=key_data)
        for v in values:
            traces, _ = rule.update_traces(ctx, traces, v)
        grads = rule.trace_gradients(ctx, traces, values[-1], g)
        return grads[W_LEAF], grads[B_LEAF]

    keys = jax.vmap(lambda s: jax.random.key_data(jax.random.key(s)))(jnp.arange(seeds))
    samples = jax.jit(jax.vmap(estimate))(keys)

    def unrolled(w: dict[str, Array]) -> Array:
        hh = h0
        for t in range(steps):
            hh = _hand_step(hh, w, xs[t])
        return hh

    M = jax.jacfwd(unrolled)(theta)
    exact = tuple(jnp.tensordot(g[("h",)], M[k], axes=2) for k in ("weight", "bias"))
    J_last = jax.jacfwd(lambda w: _hand_step(values[-1].env[minfo.hidden_path_to_invar[("h",)]], w, xs[-1]))(theta)
    instantaneous = tuple(jnp.tensordot(g[("h",)], J_last[k], axes=2) for k in ("weight", "bias"))
    far = False
    for sample, want, inst in zip(samples, exact, instantaneous, strict=True):
        mean = jnp.mean(sample, axis=0)
        se = jnp.std(sample, axis=0, ddof=1) / np.sqrt(seeds)
        assert jnp.all(jnp.abs(mean - want) < 4 * se), (mean, want, se)
        far = far or bool(jnp.any(jnp.abs(mean - inst) > 4 * se))
        assert float(jnp.max(se)) > 0  # each draw differs: a real estimate, not the exact value
    assert far, "the bound also accepts the instantaneous influence: the test could not fail"


def test_float32_runs_and_uses_the_dtypes(rng: np.random.Generator) -> None:
    cell = etp_nn.VanillaRNNCell(3, 4)
    brainstate.nn.init_all_states(cell, batch_size=2)
    for state in cell.states().values():
        state.value = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), state.value)
    xs = jnp.asarray(rng.normal(size=(5, 2, 3)), jnp.float32)
    learner = UORO(cell, projection_key=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.compile_graph(xs[0])
    got = learner.etrace_grad(xs, xs[..., :1] * 0 + 1, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2))
    trace = learner.etrace.value
    assert all(a.dtype == jnp.float32 for a in (*trace.h_tilde, *trace.theta_tilde))
    assert all(a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(got))


def test_a_vmapped_per_sample_learner_is_the_rule_by_hand_per_sample(rng: np.random.Generator) -> None:
    """ETraceVmap: each sample carries its own rank-one estimate (the same key sequence in every sample)."""
    from etp_algorithms import ETraceVmap

    key = jax.random.key(4)
    cell, learner, xs, ys, theta = _setup(None, rng, steps=3, projection_key=key)
    xs = jnp.asarray(rng.normal(size=(3, 2, 3)))
    ys = jnp.asarray(rng.normal(size=(3, 2, 4)))
    wrapped = ETraceVmap(learner, axis_size=2)
    params = cell.states(brainstate.ParamState)
    total: Any = None
    for t in range(3):
        g = brainstate.transform.grad(lambda t=t: _loss_of(wrapped(xs[t]), ys[t]), params)()
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    h0 = jnp.zeros(4)
    per_sample = [_hand_uoro(theta, h0, xs[:, b], ys[:, b], key) for b in range(2)]
    for k in theta:
        want = sum(step["grad"][k] for hand in per_sample for step in hand)
        assert _rel(total[("W", "weight")][k], want) < 1e-11, k
