"""``etrace_grad`` / ``etrace_evolve``: the whole sequence in one compiled program, against oracles.

* the hand loop: the sum (mean) of per-step online gradients taken one call at a time with an
  identical learner (D_RTRL, ES_D_RTRL; a GRU), and the states it ends in;
* BPTT (``jax.grad`` of the unrolled model) where the learner is exact: D_RTRL on leaky
  integrators, any window covering the whole sequence (a GRU, ``chunk_size=T``);
* the hand-windowed gradient for a ragged ``chunk_size``;
* masks against running only the unmasked steps; per-step weights against a weighted hand loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algorithms_testing import Driven, _bptt, _cases, _rel

import etp_nn
from etp_algorithms import D_RTRL, ES_D_RTRL, ETraceAlgorithm, MultiStepData, SequenceDriverMixin

Array = jax.Array
T, B, I, H = 7, 2, 3, 4


def _gru(vjp_method: str = "single-step", kind: str = "D_RTRL", seed: int = 3) -> tuple[Any, ETraceAlgorithm]:
    brainstate.random.seed(seed)
    cell = etp_nn.GRUCell(I, H)
    brainstate.nn.init_all_states(cell, batch_size=B)
    learner: ETraceAlgorithm = (
        D_RTRL(cell, vjp_method=vjp_method) if kind == "D_RTRL" else ES_D_RTRL(cell, 0.8, vjp_method=vjp_method)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(jnp.zeros((B, I)))
    return cell, learner


def _data(rng: np.random.Generator, steps: int = T) -> tuple[Array, Array]:
    return jnp.asarray(rng.normal(size=(steps, B, I))), jnp.asarray(rng.normal(size=(steps, B, H)))


def _loss_fn(learner: Any) -> Callable[[Array, Array], Array]:
    def step_loss(x: Array, y: Array) -> Array:
        return jnp.sum((learner(x) - y) ** 2)

    return step_loss


def _hand(learner: Any, model: Any, xs: Array, ys: Array, scale: Any = None) -> tuple[Any, Array]:
    """Per-step online gradients by hand, one learner call at a time; their (weighted) sum and the losses."""
    params = learner.param_states
    total, losses = None, []
    for t in range(xs.shape[0]):
        c = 1.0 if scale is None else scale[t]

        def loss(x: Array, y: Array, c: Any = c) -> tuple[Array, Array]:
            value = jnp.sum((learner(x) - y) ** 2)
            return c * value, value

        g, value = brainstate.transform.grad(loss, params, has_aux=True)(xs[t], ys[t])
        losses.append(value)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total, jnp.stack(losses)


def _close(a: Any, b: Any, tol: float = 1e-10) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert _rel(jnp.asarray(x), jnp.asarray(y)) < tol


def _snapshot(model: Any, learner: Any) -> Any:
    return jax.tree.map(
        np.array, ({p: s.value for p, s in model.states().items()}, learner.etrace.value), is_leaf=lambda x: x is None
    )


def _equal(a: Any, b: Any) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("kind", ["D_RTRL", "ES_D_RTRL"])
def test_equals_the_hand_loop_and_ends_in_its_states(kind: str, rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    cell, learner = _gru(kind=kind)
    ref_cell, ref = _gru(kind=kind)
    grads, losses = learner.etrace_grad(xs, ys, step_fn=_loss_fn(learner), reduction="sum", return_value=True)
    want, want_losses = _hand(ref, ref_cell, xs, ys)
    _close(grads, want)
    _close(losses, want_losses)
    assert float(jnp.abs(jax.tree.leaves(want)[0]).sum()) > 0
    # the states and traces end advanced over the whole sequence, as by the hand loop
    _close(_snapshot(cell, learner), _snapshot(ref_cell, ref), 1e-12)
    # 'mean' is the sum over T (no mask)
    _, a = _gru(kind=kind)
    mean = a.etrace_grad(xs, ys, step_fn=_loss_fn(a))
    _close(mean, jax.tree.map(lambda g: g / T, want))


def test_leaky_integrators_with_d_rtrl_equal_bptt(rng: np.random.Generator) -> None:
    op, weights, xs, leak, h_shape = _cases(rng)["mm+bias"]
    leak = jnp.broadcast_to(leak, h_shape)
    r = jnp.asarray(rng.normal(size=h_shape))
    model = Driven(op, weights, leak, h_shape)
    learner = D_RTRL(model)
    learner.compile_graph(xs[0])
    grads = learner.etrace_grad(xs, step_fn=lambda x: jnp.sum(r * jnp.sin(learner(x))), reduction="sum")
    want = _bptt(op, weights, xs, leak, h_shape, r, xs.shape[0])
    for key in want:
        assert _rel(grads[("w",)][key], want[key]) < 1e-10, key


def _gru_bptt(cell: Any, xs: Array, ys: Array) -> Any:
    init = {p: s.value for p, s in cell.states(brainstate.ParamState).items()}

    def loss(p: dict[Any, Any]) -> Array:
        def lin(key: str, inp: Array) -> Array:
            return inp @ p[(key, "weight")]["weight"] + p[(key, "weight")]["bias"]

        h, total = jnp.zeros((B, H)), 0.0
        for t in range(xs.shape[0]):
            xh = jnp.concatenate([xs[t], h], -1)
            z, r = jax.nn.sigmoid(lin("Wz", xh)), jax.nn.sigmoid(lin("Wr", xh))
            cand = jnp.tanh(lin("Wh", jnp.concatenate([xs[t], r * h], -1)))
            h = (1 - z) * h + z * cand
            total = total + jnp.sum((h - ys[t]) ** 2)
        return total

    return jax.grad(loss)(init)


def _window_loss(learner: Any) -> Callable[[Array, Array], Array]:
    def step_loss(x: Array, y: Array) -> Array:
        return jnp.sum((learner(MultiStepData(x)) - y) ** 2, axis=(1, 2))

    return step_loss


@pytest.mark.parametrize("kind", ["D_RTRL", "ES_D_RTRL"])
def test_a_window_over_the_whole_sequence_of_a_gru_is_bptt(kind: str, rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    cell, learner = _gru("multi-step", kind)
    want = _gru_bptt(cell, xs, ys)
    grads, losses = learner.etrace_grad(
        xs, ys, step_fn=_window_loss(learner), chunk_size=T, reduction="sum", return_value=True
    )
    assert losses.shape == (T,)
    for path in want:
        for key in want[path]:
            assert _rel(grads[path][key], want[path][key]) < 1e-10, (path, key)


@pytest.mark.parametrize("k", [3, 2, 5])
def test_a_ragged_chunk_size_equals_the_hand_windowed_gradient(k: int, rng: np.random.Generator) -> None:
    assert T % k
    xs, ys = _data(rng)
    cell, learner = _gru("multi-step", "ES_D_RTRL")
    ref_cell, ref = _gru("multi-step", "ES_D_RTRL")
    grads, losses = learner.etrace_grad(
        xs, ys, step_fn=_window_loss(learner), chunk_size=k, reduction="sum", return_value=True
    )
    params, total, want_losses = ref.param_states, None, []
    for start in range(0, T, k):

        def loss(x: Array, y: Array) -> tuple[Array, Array]:
            per_step = _window_loss(ref)(x, y)
            return jnp.sum(per_step), per_step

        g, per_step = brainstate.transform.grad(loss, params, has_aux=True)(
            xs[start : start + k], ys[start : start + k]
        )
        want_losses.append(per_step)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    _close(grads, total)
    _close(losses, jnp.concatenate(want_losses))
    _close(_snapshot(cell, learner), _snapshot(ref_cell, ref), 1e-12)
    # windows shorter than T are not BPTT for this approximate rule (the window length matters)
    bptt = _gru_bptt(ref_cell, xs, ys)
    assert _rel(grads[("Wz", "weight")]["weight"], bptt[("Wz", "weight")]["weight"]) > 1e-3


# ---------------------------------------------------------------------------------------------------- masks, weights


def test_trailing_masked_steps_equal_the_unmasked_prefix(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    keep = 4
    mask = jnp.asarray([1.0] * keep + [0.0] * (T - keep))
    for reduction in ("sum", "mean"):
        _, a = _gru()
        _, b = _gru()
        got = a.etrace_grad(xs, ys, step_fn=_loss_fn(a), mask=mask, reduction=reduction)
        want = b.etrace_grad(xs[:keep], ys[:keep], step_fn=_loss_fn(b), reduction=reduction)
        _close(got, want)


def test_leading_masked_steps_equal_evolve_then_grad(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    skip = 3
    mask = jnp.asarray([0.0] * skip + [1.0] * (T - skip))
    cell_a, a = _gru(kind="ES_D_RTRL")
    cell_b, b = _gru(kind="ES_D_RTRL")
    got, losses = a.etrace_grad(xs, ys, step_fn=_loss_fn(a), mask=mask, return_value=True, loss_output="masked")
    b.etrace_evolve(xs[:skip])
    want = b.etrace_grad(xs[skip:], ys[skip:], step_fn=_loss_fn(b))  # mean over the T - skip unmasked steps
    _close(got, want)
    np.testing.assert_array_equal(losses[:skip], 0.0)
    _close(_snapshot(cell_a, a), _snapshot(cell_b, b), 1e-12)
    # the masked steps still drove the traces: not the gradient of a learner started at step `skip`
    _, c = _gru(kind="ES_D_RTRL")
    fresh = c.etrace_grad(xs[skip:], ys[skip:], step_fn=_loss_fn(c))
    assert _rel(fresh[("Wz", "weight")]["weight"], want[("Wz", "weight")]["weight"]) > 1e-3


def test_per_sample_mask_of_padded_sequences(rng: np.random.Generator) -> None:
    """A (T, B) mask with per-sample losses: sample b counts its first L_b steps only."""
    xs, ys = _data(rng)
    lengths = [T, 4]
    mask = jnp.asarray([[1.0 if t < n else 0.0 for n in lengths] for t in range(T)])
    _, a = _gru()
    _, ref = _gru()

    def per_sample(x: Array, y: Array) -> Array:
        return jnp.sum((a(x) - y) ** 2, axis=-1)

    got, losses = a.etrace_grad(xs, ys, step_fn=per_sample, mask=mask, return_value=True)
    assert losses.shape == (T, B)
    params, total = ref.param_states, None
    for t in range(T):
        g = brainstate.transform.grad(lambda x, y, t=t: jnp.sum(mask[t] * jnp.sum((ref(x) - y) ** 2, -1)), params)(
            xs[t], ys[t]
        )
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    _close(got, jax.tree.map(lambda g: g / sum(lengths), total))


def test_per_step_weights_and_reductions(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    w = jnp.asarray(rng.uniform(0.1, 2.0, size=T))
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    _, ref = _gru()
    want, raw = _hand(ref, None, xs, ys, scale=mask * w)
    for reduction, denom in (("sum", 1.0), ("mean", float(mask.sum()))):
        _, a = _gru()
        got, value = a.etrace_grad(
            xs, ys, step_fn=_loss_fn(a), mask=mask, weights=w, reduction=reduction, return_value=True,
            loss_output="scalar",
        )  # fmt: skip
        _close(got, jax.tree.map(lambda g, d=denom: g / d, want))
        assert value.shape == ()
        assert abs(float(value) - float(jnp.sum(mask * w * raw)) / denom) < 1e-10 * abs(float(value))
    # a non-binary mask is a weight too: 'mean' divides by its total
    _, a = _gru()
    got = a.etrace_grad(xs, ys, step_fn=_loss_fn(a), mask=w)
    _close(got, jax.tree.map(lambda g: g / float(w.sum()), _hand(_gru()[1], None, xs, ys, scale=w)[0]))


def test_outputs_aux_and_weight_subsets(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    _, a = _gru()

    def with_aux(x: Array, y: Array) -> tuple[Array, Any]:
        out = a(x)
        return jnp.sum((out - y) ** 2), {"out": out}

    grads = a.etrace_grad(xs, ys, step_fn=_loss_fn(a))
    assert set(grads) == set(a.param_states)
    g2, aux = a.etrace_grad(xs, ys, step_fn=with_aux, has_aux=True)
    assert aux["out"].shape == (T, B, H)
    g3, losses, aux = a.etrace_grad(xs, ys, step_fn=with_aux, has_aux=True, return_value=True, mask=jnp.ones(T))
    assert losses.shape == (T,) and aux["out"].shape == (T, B, H)
    _close(jnp.sum((aux["out"] - ys) ** 2, axis=(1, 2)), losses)
    # braintrace 0.2.8's weights=: the ParamStates to differentiate
    subset = {p: s for p, s in a.param_states.items() if p[0] == "Wz"}
    only = a.etrace_grad(xs, ys, step_fn=_loss_fn(a), weights=subset)
    assert set(only) == set(subset)
    # windows: aux stacked over windows (ragged last window of a window-independent aux shape)
    _, m = _gru("multi-step")

    def window_aux(x: Array, y: Array) -> tuple[Array, Array]:
        out = m(MultiStepData(x))
        return jnp.sum((out - y) ** 2, axis=(1, 2)), out[-1]

    _, losses, aux = m.etrace_grad(xs, ys, step_fn=window_aux, chunk_size=3, has_aux=True, return_value=True)
    assert losses.shape == (T,) and aux.shape == (3, B, H)


# ---------------------------------------------------------------------------------------------------- one program


def test_one_program_per_call_signature(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    _, a = _gru()
    traces = [0]

    def step_loss(x: Array, y: Array) -> Array:
        traces[0] += 1
        return jnp.sum((a(x) - y) ** 2)

    first = a.etrace_grad(xs, ys, step_fn=step_loss)
    after_first = traces[0]
    assert 1 <= after_first <= 3  # traced, not run T times from Python
    second = a.etrace_grad(xs, ys, step_fn=step_loss)
    assert traces[0] == after_first, "the second call with the same shapes traced again"
    assert _rel(second[("Wz", "weight")]["weight"], first[("Wz", "weight")]["weight"]) > 1e-6  # it continued
    a.etrace_grad(xs[:5], ys[:5], step_fn=step_loss)  # a new length: a new program
    assert traces[0] > after_first
    # etrace_evolve likewise
    traces[0] = 0
    a.etrace_evolve(xs, step_fn=lambda x: step_loss(x, x @ jnp.zeros((I, H))))
    a.etrace_evolve(xs, step_fn=None)
    n = traces[0]
    a.etrace_evolve(xs, step_fn=None)
    assert traces[0] == n


def test_inside_an_outer_jit(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    cell, a = _gru()
    ref_cell, ref = _gru()

    @brainstate.transform.jit
    def train(xs: Array, ys: Array) -> Any:
        return a.etrace_grad(xs, ys, step_fn=_loss_fn(a), reduction="sum")

    _close(train(xs, ys), _hand(ref, ref_cell, xs, ys)[0])
    _close(_snapshot(cell, a), _snapshot(ref_cell, ref), 1e-12)


# ---------------------------------------------------------------------------------------------------- evolve


@pytest.mark.parametrize("kind", ["D_RTRL", "ES_D_RTRL"])
def test_evolve_advances_as_the_learner_calls(kind: str, rng: np.random.Generator) -> None:
    xs, _ = _data(rng)
    cell, a = _gru(kind=kind)
    ref_cell, ref = _gru(kind=kind)
    outs = a.etrace_evolve(xs, return_outputs=True)
    want = jnp.stack([ref(xs[t]) for t in range(T)])
    _close(outs, want, 1e-12)
    _close(_snapshot(cell, a), _snapshot(ref_cell, ref), 1e-12)
    # windows on a single-step learner (no loss is differentiated), ragged: the same states
    wcell, w = _gru(kind=kind)
    assert w.etrace_evolve(xs, chunk_size=3) is None
    _close(_snapshot(wcell, w), _snapshot(ref_cell, ref), 1e-12)
    # a custom step_fn, and windows with window-length-independent outputs
    ccell, c = _gru(kind=kind)
    last = c.etrace_evolve(xs, step_fn=lambda x: c(MultiStepData(x))[-1], chunk_size=3, return_outputs=True)
    assert last.shape == (3, B, H)
    _close(last[-1], want[-1], 1e-12)
    _close(_snapshot(ccell, c), _snapshot(ref_cell, ref), 1e-12)


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_clearly_and_changes_nothing(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    cell, a = _gru()
    a.etrace_grad(xs, ys, step_fn=_loss_fn(a))  # non-trivial states and traces
    before = _snapshot(cell, a)
    step_loss = _loss_fn(a)
    cases: list[tuple[type[Exception], str, Callable[[], Any]]] = [
        (ValueError, "leading .time. length", lambda: a.etrace_grad(xs, ys[:5], step_fn=step_loss)),
        (ValueError, r"mask must have shape \(T,\) = \(7,\)", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, mask=jnp.ones(6))),
        (ValueError, "mask must have shape", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, mask=jnp.ones((T, B, 1)))),
        (ValueError, "chunk_size must be a positive int", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, chunk_size=0)),
        (ValueError, "chunk_size must be a positive int", lambda: a.etrace_evolve(xs, chunk_size=-2)),
        (TypeError, "chunk_size must be None or a Python int", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, chunk_size=2.0)),
        (ValueError, "vjp_method='multi-step'", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, chunk_size=2)),
        (ValueError, r"a scalar loss .* expected shape \(\), got \(2,\)", lambda: a.etrace_grad(xs, ys, step_fn=lambda x, y: jnp.sum((a(x) - y) ** 2, -1))),
        (ValueError, r"one loss per sample .* expected shape \(2,\), got \(\)", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, mask=jnp.ones((T, B)))),
        (ValueError, "reduction must be one of", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, reduction="max")),
        (ValueError, "loss_output must be one of", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, loss_output="all")),
        (ValueError, "at least one time-major sequence", lambda: a.etrace_grad(step_fn=step_loss)),
        (TypeError, "wrap the slices inside step_fn", lambda: a.etrace_evolve(MultiStepData(xs))),
        (ValueError, "has_aux=True: step_fn must return", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, has_aux=True)),
        (TypeError, "weights must be the ParamStates", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, weights={"w": jnp.ones(T)})),
        (ValueError, "must have the same shape", lambda: a.etrace_grad(xs, ys, step_fn=step_loss, mask=jnp.ones(T), weights=jnp.ones((T, B)))),
    ]  # fmt: skip
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
        _equal(_snapshot(cell, a), before)
    # and the learner still works
    a.etrace_grad(xs, ys, step_fn=step_loss)


def test_window_losses_of_the_wrong_shape_are_refused(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    cell, m = _gru("multi-step")
    before = _snapshot(cell, m)
    with pytest.raises(ValueError, match=r"leading window axis of 3 steps: expected shape \(3,\), got \(\)"):
        m.etrace_grad(xs, ys, step_fn=lambda x, y: jnp.sum((m(MultiStepData(x)) - y) ** 2), chunk_size=3)
    _equal(_snapshot(cell, m), before)


def test_the_mixin_is_public() -> None:
    assert issubclass(ETraceAlgorithm, SequenceDriverMixin)
