"""KF-RTRL: the Kronecker-factored unbiased estimate u (x) A of a dense relation's influence.

Oracles: the rule of Mujika, Meier & Steger (2018) written out here on a hand-written vanilla RNN step
(``tanh([x, h] W + b)``, the factored input ``[x, h, 1]``, Jacobians by ``jax.jacfwd``, the same key
splits), BPTT (``jax.grad`` through the unrolled hand model) and the exact influence ``dh/dW`` by
``jax.jacfwd`` of the unrolled hand model, in float64.
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
import etp_primitives as etp
from etp_algorithms import MultiStepData
from etp_algorithms._executor import execute_step
from etp_algorithms._kf_rtrl import KF_RTRL
from etp_compiler import CompilationError

Array = jax.Array
EPS = 1e-7
PATH = ("W", "weight")


def _cell(batch: int | None, rng: np.random.Generator, n_in: int = 3, n_h: int = 4) -> Any:
    cell = etp_nn.VanillaRNNCell(n_in, n_h, activation="tanh")
    brainstate.nn.init_all_states(cell, batch_size=batch)
    cell.W.weight.value = {**cell.W.weight.value, "bias": jnp.asarray(rng.normal(size=n_h)) * 0.3}
    return cell


def _hand_step(h: Array, theta: dict[str, Array], x: Array) -> Array:
    return jnp.tanh(jnp.concatenate([x, h], axis=-1) @ theta["weight"] + theta["bias"])


def _loss_of(h_new: Array, y: Array) -> Array:
    return jnp.sum((h_new - y) ** 2)


def _sample_update(u: Array, A: Array, c: Array, h: Array, theta: dict[str, Array], x: Array) -> Any:
    """One sample: u' = c1 p1 u + c2 p2 x^, A' = c1/p1 J A + c2/p2 diag(D_f)."""
    x_hat = jnp.concatenate([x, h, jnp.ones(1)])
    J = jax.jacfwd(lambda hh: _hand_step(hh, theta, x))(h)  # (N, N)
    h_new = _hand_step(h, theta, x)
    Df = 1 - h_new**2  # d tanh(y)/dy
    JA = J @ A
    p1 = jnp.sqrt(jnp.linalg.norm(JA) / (jnp.linalg.norm(u) + EPS)) + EPS
    p2 = jnp.sqrt(jnp.linalg.norm(Df) / (jnp.linalg.norm(x_hat) + EPS)) + EPS
    return c[0] * p1 * u + c[1] * p2 * x_hat, c[0] / p1 * JA + c[1] / p2 * jnp.diag(Df)


def _hand_kf(theta: dict[str, Array], h0: Array, xs: Array, ys: Array, key: Any) -> list[dict[str, Any]]:
    """KF-RTRL written out: per step the factors after it and the gradient of that step's loss."""
    n_h = h0.shape[-1]
    k = xs.shape[-1] + n_h + 1
    lead = h0.shape[:-1]
    u, A, h = jnp.zeros((*lead, k)), jnp.zeros((*lead, n_h, n_h)), h0
    out = []
    for t in range(xs.shape[0]):
        g_theta, g_h = jax.grad(lambda w, hh, t=t: _loss_of(_hand_step(hh, w, xs[t]), ys[t]), argnums=(0, 1))(theta, h)
        G = jnp.einsum("...n,...no->...o", g_h, A)
        full = jnp.einsum("...k,...o->ko", u, G)
        grad = {"weight": g_theta["weight"] + full[:-1], "bias": g_theta["bias"] + full[-1]}
        key, draw = jax.random.split(key)
        (one,) = jax.random.split(draw, 1)
        c = jax.random.rademacher(one, (2, *lead), h0.dtype)
        update = _sample_update
        if lead:
            update = jax.vmap(_sample_update, in_axes=(0, 0, 1, 0, None, 0))
        u, A = update(u, A, c, h, theta, xs[t])
        h = _hand_step(h, theta, xs[t])
        out.append({"u": u, "A": A, "grad": grad, "h": h})
    return out


def _setup(batch: int | None, rng: np.random.Generator, steps: int = 3, **options: Any) -> Any:
    cell = _cell(batch, rng)
    lead = () if batch is None else (batch,)
    xs = jnp.asarray(rng.normal(size=(steps, *lead, 3)))
    ys = jnp.asarray(rng.normal(size=(steps, *lead, 4)))
    learner = KF_RTRL(cell, **options)
    learner.compile_graph(xs[0])
    return cell, learner, xs, ys, dict(cell.W.weight.value)


@pytest.mark.parametrize("batch", [None, 2])
def test_each_step_equals_the_rule_by_hand(batch: int | None, rng: np.random.Generator) -> None:
    key = jax.random.key(11)
    cell, learner, xs, ys, theta = _setup(batch, rng, projection_key=key)
    want = _hand_kf(theta, cell.h.value, xs, ys, key)
    params = cell.states(brainstate.ParamState)
    for t in range(xs.shape[0]):
        grad = brainstate.transform.grad(lambda t=t: _loss_of(learner(xs[t]), ys[t]), params)()
        factors = learner.get_etrace_of(cell.W.weight)
        assert jnp.allclose(factors["u"], want[t]["u"], rtol=1e-12, atol=1e-12), t
        assert jnp.allclose(factors["A"][("h",)], want[t]["A"], rtol=1e-12, atol=1e-12), t
        for k in ("weight", "bias"):
            assert jnp.allclose(grad[PATH][k], want[t]["grad"][k], rtol=1e-12, atol=1e-12), (t, k)
    # guard: the history term of the last step is not negligible
    history = want[2]["grad"]["weight"] - jax.grad(
        lambda w: _loss_of(_hand_step(want[1]["h"], {**theta, "weight": w}, xs[2]), ys[2])
    )(theta["weight"])
    assert float(jnp.abs(history).max()) > 1e-3


def test_etrace_grad_and_windows_equal_the_rule_by_hand(rng: np.random.Generator) -> None:
    key = jax.random.key(3)
    cell, learner, xs, ys, theta = _setup(2, rng, steps=4, projection_key=key)
    h0 = cell.h.value
    hand = _hand_kf(theta, h0, xs, ys, key)
    got = learner.etrace_grad(xs, ys, step_fn=lambda x, y: _loss_of(learner(x), y), reduction="sum")
    for k in theta:
        assert _rel(got[PATH][k], sum(w["grad"][k] for w in hand)) < 1e-11, k

    # windows of 2: exact BPTT inside, the factors after step 2 at the start of the second window
    cell, learner, xs, ys, theta = _setup(2, np.random.default_rng(5), steps=4, projection_key=key)
    brainstate.random.seed(0)
    learner = KF_RTRL(cell, projection_key=key, vjp_method="multi-step")
    learner.compile_graph(xs[0])
    h0 = cell.h.value
    hand = _hand_kf(theta, h0, xs, ys, key)

    def window(w: dict[str, Array], h: Array, start: int) -> Array:
        total = 0.0
        for t in range(start, start + 2):
            h = _hand_step(h, w, xs[t])
            total = total + _loss_of(h, ys[t])
        return total

    first = jax.grad(window)(theta, h0, 0)
    second, g_h2 = jax.grad(window, argnums=(0, 1))(theta, hand[1]["h"], 2)
    G = jnp.einsum("bn,bno->bo", g_h2, hand[1]["A"])
    full = jnp.einsum("bk,bo->ko", hand[1]["u"], G)
    want = {"weight": first["weight"] + second["weight"] + full[:-1], "bias": first["bias"] + second["bias"] + full[-1]}

    def window_loss(x: Array, y: Array) -> Array:
        return jnp.sum((learner(MultiStepData(x)) - y) ** 2, axis=tuple(range(1, y.ndim)))

    got = learner.etrace_grad(xs, ys, step_fn=window_loss, chunk_size=2, reduction="sum")
    for k in theta:
        assert _rel(got[PATH][k], want[k]) < 1e-11, k
    assert float(jnp.abs(full).max()) > 1e-3


def test_the_mean_over_seeds_is_the_rtrl_gradient(rng: np.random.Generator) -> None:
    r"""E[sum_b u_b (x) (g_b^T A_b)] = g . dh^T/dW after T = 4 steps, for a fixed cotangent g.

    4000 seeds, vmapped; per entry the mean must lie within 4 standard errors (measured from the samples)
    of the exact value (``jax.jacfwd`` of the unrolled hand model): a false failure has probability about
    6e-5 per entry, and the seeds are fixed. The same bound rejects the last step's instantaneous
    influence alone (the guard).
    """
    steps, seeds = 4, 4000
    cell = _cell(2, rng, n_in=2, n_h=3)
    xs = jnp.asarray(rng.normal(size=(steps, 2, 2)))
    learner = KF_RTRL(cell, projection_key=0)
    learner.compile_graph(xs[0])
    ctx, rule, graph = learner.context, learner.rule, learner.graph
    minfo = graph.module_info
    hid = minfo.jaxpr.invars.index(minfo.hidden_path_to_invar[("h",)])
    theta = dict(cell.W.weight.value)
    h0 = jnp.asarray(rng.normal(size=(2, 3))) * 0.5
    values, h = [], h0
    for t in range(steps):
        invals = list(minfo.current_inputs(xs[t]))
        invals[hid] = h
        values.append(execute_step(graph, invals))
        h = _hand_step(h, theta, xs[t])
    g = {("h",): jnp.asarray(rng.normal(size=(2, 3)))}

    def estimate(key_data: Array) -> Any:
        traces = dataclasses.replace(rule.init_traces(ctx), key=key_data)
        for v in values:
            traces, _ = rule.update_traces(ctx, traces, v)
        grads = rule.trace_gradients(ctx, traces, values[-1], g)
        return grads[0]["weight"], grads[0]["bias"]

    keys = jax.vmap(lambda s: jax.random.key_data(jax.random.key(s)))(jnp.arange(seeds))
    samples = jax.jit(jax.vmap(estimate))(keys)

    def unrolled(w: dict[str, Array]) -> Array:
        hh = h0
        for t in range(steps):
            hh = _hand_step(hh, w, xs[t])
        return hh

    M = jax.jacfwd(unrolled)(theta)
    exact = tuple(jnp.tensordot(g[("h",)], M[k], axes=2) for k in ("weight", "bias"))
    h_last = values[-1].env[minfo.hidden_path_to_invar[("h",)]]
    J_last = jax.jacfwd(lambda w: _hand_step(h_last, w, xs[-1]))(theta)
    instantaneous = tuple(jnp.tensordot(g[("h",)], J_last[k], axes=2) for k in ("weight", "bias"))
    far = False
    for sample, want, inst in zip(samples, exact, instantaneous, strict=True):
        mean = jnp.mean(sample, axis=0)
        se = jnp.std(sample, axis=0, ddof=1) / np.sqrt(seeds)
        assert jnp.all(jnp.abs(mean - want) < 4 * se), (mean, want, se)
        far = far or bool(jnp.any(jnp.abs(mean - inst) > 4 * se))
        assert float(jnp.max(se)) > 0
    assert far, "the bound also accepts the instantaneous influence: the test could not fail"


class ElementWise(brainstate.nn.Module):
    """A recurrence with a dense input and an element-wise (per-unit) recurrent gain."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = brainstate.ParamState(jnp.ones((3, 4)) * 0.1)
        self.gain = brainstate.ParamState(jnp.ones(4) * 0.5)
        self.h = brainstate.HiddenState(jnp.zeros(4))

    def update(self, x: Array) -> Array:
        self.h.value = jnp.tanh(etp.matmul(x, self.w_in.value) + self.h.value * etp.element_wise(self.gain.value))
        return self.h.value


def test_a_non_dense_relation_is_refused_naming_it() -> None:
    model = ElementWise()
    learner = KF_RTRL(model)
    with pytest.raises(
        CompilationError,
        match=r"KF_RTRL: KF-RTRL factors the influence of a dense matmul y = xW as u \(x\) A; relation \d \(etp_elemwise, weight \('gain',\)\) is a etp_elemwise, not a dense matmul",
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner.compile_graph(jnp.zeros(3))


def test_a_relation_into_two_states_is_refused() -> None:
    cell = etp_nn.LSTMCell(3, 4)
    brainstate.nn.init_all_states(cell)
    learner = KF_RTRL(cell)
    with pytest.raises(
        CompilationError,
        match=r"KF_RTRL: .*relation 0 \(etp_mv, weight .*feeds the hidden states .* not one group of one state",
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner.compile_graph(jnp.zeros(3))


@pytest.mark.parametrize("bad", ["key", 1.5, None, jnp.zeros(3)])
def test_a_non_key_projection_key_is_refused(bad: Any) -> None:
    cell = etp_nn.VanillaRNNCell(3, 4)
    brainstate.nn.init_all_states(cell)
    with pytest.raises(
        TypeError, match=rf"kf_rtrl: projection_key must be a JAX PRNG key .* of type {type(bad).__name__}"
    ):
        KF_RTRL(cell, projection_key=bad)


def test_a_gru_runs_in_float32(rng: np.random.Generator) -> None:
    """Three dense relations into one state; the reset gate (no relation) keeps its instantaneous gradient."""
    cell = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(cell, batch_size=2)
    for state in cell.states().values():
        state.value = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), state.value)
    xs = jnp.asarray(rng.normal(size=(5, 2, 3)), jnp.float32)
    learner = KF_RTRL(cell, projection_key=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    assert len(learner.etrace.value.u) == len(learner.graph.hidden_param_op_relations) >= 2
    got = learner.etrace_grad(xs, jnp.ones((5, 2, 4), jnp.float32), step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2))
    assert all(a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(got))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(learner.etrace.value.A))


def test_a_vmapped_per_sample_learner_is_the_rule_by_hand_per_sample(rng: np.random.Generator) -> None:
    """ETraceVmap: each sample carries its own factors (the same key sequence in every sample)."""
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
    per_sample = [_hand_kf(theta, jnp.zeros(4), xs[:, b], ys[:, b], key) for b in range(2)]
    for k in theta:
        want = sum(step["grad"][k] for hand in per_sample for step in hand)
        assert _rel(total[PATH][k], want) < 1e-11, k
