"""End to end: small networks learn synthetic tasks online, one parameter update per time step.

1. A GRU + linear readout trained with D_RTRL to recall the input of the previous step
   (``y_t = x_{t-1}``, random signs; the current input is a distractor), batch 16, Adam.
2. A recurrent LIF network + leaky rate readout trained with ES_D_RTRL to classify
   which half of its input channels fires at the high rate, batch 16, plain SGD.

Hidden states and eligibility traces are reset between sequences; every step's online
gradient (``brainstate.transform.grad`` through the learner) is applied at once.
Seeds are fixed; each test asserts that the loss falls by a stated factor.
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

import etp_nn
from etp_algorithms import D_RTRL, ES_D_RTRL

Array = jax.Array


def _compile(learner: Any, x0: Array) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(x0)


def _values(params: Any) -> dict[Any, Any]:
    return {path: jax.tree.map(jnp.array, state.value) for path, state in params.items()}


def _rel_change(before: Any, after: Any) -> float:
    num = sum(
        float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
    )
    den = sum(float(jnp.sum(b**2)) for b in jax.tree.leaves(before))
    return float(np.sqrt(num / den))


class GRUNet(brainstate.nn.Module):
    def __init__(self, n_in: int, n_hidden: int, n_out: int) -> None:
        super().__init__()
        self.cell = etp_nn.GRUCell(n_in, n_hidden)
        self.out = etp_nn.Linear(n_hidden, n_out)

    def update(self, x: Any) -> Any:
        return self.out(self.cell(x))


def test_gru_learns_previous_step_recall_online_with_d_rtrl() -> None:
    brainstate.random.seed(0)
    rng = np.random.default_rng(0)
    B, I, H, T, N, lr = 16, 2, 16, 20, 40, 0.01
    model = GRUNet(I, H, I)
    brainstate.nn.init_all_states(model, batch_size=B)
    learner = D_RTRL(model)
    _compile(learner, jnp.zeros((B, I)))
    assert {r.weight_path for r in learner.graph.hidden_param_op_relations} >= {
        ("cell", "Wz", "weight"),
        ("cell", "Wh", "weight"),
    }
    params = model.states(brainstate.ParamState)
    before = _values(params)
    zeros = {path: jax.tree.map(jnp.zeros_like, value) for path, value in before.items()}
    m, v = brainstate.ShortTermState(zeros), brainstate.ShortTermState(zeros)
    count = brainstate.ShortTermState(jnp.zeros(()))

    @brainstate.transform.jit
    def train_step(x: Array, y: Array) -> Array:
        grads, loss = brainstate.transform.grad(
            lambda x, y: jnp.mean((learner(x) - y) ** 2), params, return_value=True
        )(x, y)
        b1, b2 = 0.9, 0.999
        count.value = count.value + 1
        m.value = jax.tree.map(lambda a, g: b1 * a + (1 - b1) * g, m.value, grads)
        v.value = jax.tree.map(lambda a, g: b2 * a + (1 - b2) * g * g, v.value, grads)
        c1, c2 = 1 - b1**count.value, 1 - b2**count.value
        for path, state in params.items():
            state.value = jax.tree.map(
                lambda p, a, b: p - lr * (a / c1) / (jnp.sqrt(b / c2) + 1e-8), state.value, m.value[path], v.value[path]
            )
        return loss

    losses = []
    for _ in range(N):
        brainstate.nn.reset_all_states(model, batch_size=B)
        learner.reset_state()
        signs = rng.choice([-1.0, 1.0], size=(T + 1, B, I))
        xs, ys = jnp.asarray(signs[1:]), jnp.asarray(signs[:-1])  # target: the previous step's input
        step_losses = [float(train_step(xs[t], ys[t])) for t in range(1, T)]  # skip t=0 (target unseen)
        losses.append(np.mean(step_losses))

    first, last = losses[0], np.mean(losses[-10:])  # it learns within a few sequences
    assert first > 0.7  # chance level is 1 (targets are +-1); measured 0.86
    assert last < 0.15 * first, (first, last)  # measured 0.06
    assert _rel_change(before[("cell", "Wz", "weight")], _values(params)[("cell", "Wz", "weight")]) > 0.05


class RecurrentLIF(brainstate.nn.Module):
    """LIF units driven by input and their own previous spikes (both through etp Linear), leaky rate readout."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int) -> None:
        super().__init__()
        self.n_hidden = n_hidden
        self.inp = etp_nn.Linear(n_in, n_hidden)
        self.rec = etp_nn.Linear(n_hidden, n_hidden, b_init=None)
        self.lif = etp_nn.LIF(n_hidden, tau=10.0 * u.ms)
        self.out = etp_nn.LeakyRateReadout(n_hidden, n_out, tau=10.0 * u.ms)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.spikes = brainstate.HiddenState(jnp.zeros((batch_size, self.n_hidden)))

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.spikes.value = jnp.zeros((batch_size, self.n_hidden))

    def update(self, x: Any) -> Any:
        spikes = self.lif((self.inp(x) + self.rec(self.spikes.value)) * u.mV)
        self.spikes.value = spikes
        return self.out(spikes)


def test_recurrent_lif_learns_rate_pattern_classification_online_with_es_d_rtrl() -> None:
    brainstate.random.seed(0)
    rng = np.random.default_rng(0)
    B, I, H, O, T, N, lr = 16, 10, 20, 2, 30, 60, 0.05
    model = RecurrentLIF(I, H, O)
    with brainstate.environ.context(dt=1.0 * u.ms):
        brainstate.nn.init_all_states(model, batch_size=B)
        learner = ES_D_RTRL(model, 0.9)
        _compile(learner, jnp.zeros((B, I)))
        assert {r.weight_path for r in learner.graph.hidden_param_op_relations} == {
            ("inp", "weight"),
            ("rec", "weight"),
            ("out", "weight"),
        }
        params = model.states(brainstate.ParamState)
        before = _values(params)

        @brainstate.transform.jit
        def train_step(x: Array, y: Array) -> Array:
            def loss_fn(x: Array, y: Array) -> Array:
                return -jnp.mean(jnp.sum(jax.nn.log_softmax(learner(x)) * y, axis=-1))

            grads, loss = brainstate.transform.grad(loss_fn, params, return_value=True)(x, y)
            for path, state in params.items():
                state.value = jax.tree.map(lambda p, g: p - lr * g, state.value, grads[path])
            return loss

        losses = []
        for _ in range(N):
            brainstate.nn.reset_all_states(model, batch_size=B)
            learner.reset_state()
            labels = rng.integers(0, O, size=B)
            # class 0: channels 0..4 fire at 0.4 per step, 5..9 at 0.05; class 1: the reverse
            high = (np.arange(I)[None, :] < I // 2) == (labels[:, None] == 0)
            xs = jnp.asarray((rng.uniform(size=(T, B, I)) < np.where(high, 0.4, 0.05)).astype(float))
            y = jax.nn.one_hot(labels, O)
            losses.append(np.mean([float(train_step(xs[t], y)) for t in range(T)]))

    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert first > 0.6  # near chance, ln 2 = 0.69; measured 0.70
    assert last < 0.35 * first, (first, last)  # measured 0.10
    after = _values(params)
    for path in [("inp", "weight"), ("rec", "weight")]:  # the trace-driven hidden weights moved, not only the readout
        assert _rel_change(before[path], after[path]) > 0.01, path
