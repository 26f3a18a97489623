"""``etrace_grad`` / ``etrace_evolve`` with ``progress=True``: eager chunks, a tqdm bar, the same results.

Oracles: the hand loop (per-step online gradients, one learner call at a time, with an identical
learner) and the one-program call without ``progress`` (itself tested against the hand loop and
BPTT in ``test_driver.py``); float64. The bar is checked on ``sys.stderr`` (capsys).
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_driver import B, H, I, T, _close, _data, _equal, _gru, _hand, _loss_fn, _snapshot

import etp_algorithms
import etp_nn
from etp_algorithms import MultiStepData

Array = jax.Array


@pytest.mark.parametrize("kind", ["D_RTRL", "ES_D_RTRL"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_progress_equals_the_hand_loop_and_one_program(
    kind: str, reduction: str, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    xs, ys = _data(rng)
    cell, learner = _gru(kind=kind)
    one_cell, one = _gru(kind=kind)
    ref_cell, ref = _gru(kind=kind)
    capsys.readouterr()
    grads, losses = learner.etrace_grad(
        xs, ys, step_fn=_loss_fn(learner), reduction=reduction, return_value=True, progress=True, progress_chunk=3
    )
    err = capsys.readouterr().err
    assert "etrace_grad" in err and f"{T}/{T}" in err, err  # the bar, run to the end (chunks 3 + 3 + 1)
    want, want_losses = _hand(ref, ref_cell, xs, ys)
    if reduction == "mean":
        want = jax.tree.map(lambda g: g / T, want)
    _close(grads, want)
    _close(losses, want_losses)
    assert float(jnp.abs(jax.tree.leaves(want)[0]).sum()) > 0
    _close(_snapshot(cell, learner), _snapshot(ref_cell, ref), 1e-12)  # states carried from chunk to chunk
    g1, l1 = one.etrace_grad(xs, ys, step_fn=_loss_fn(one), reduction=reduction, return_value=True)
    _close(grads, g1, 1e-12)
    _close(losses, l1, 1e-12)
    _close(_snapshot(cell, learner), _snapshot(one_cell, one), 1e-12)
    assert capsys.readouterr().err == ""  # no bar without progress


def test_progress_with_masks_weights_aux_and_loss_outputs(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    mask = jnp.asarray(rng.integers(0, 2, size=(T, B)), jnp.float64).at[0].set(1.0)
    per_step = jnp.asarray(rng.uniform(0.5, 2.0, size=(T, B)))
    for loss_output in ("per_step", "masked", "scalar"):
        results = []
        for progress in (True, False):
            _, a = _gru()

            def step(x: Array, y: Array, a: Any = a) -> tuple[Array, Any]:
                out = a(x)
                return jnp.sum((out - y) ** 2, axis=-1), {"out": out}

            results.append(
                a.etrace_grad(
                    xs,
                    ys,
                    step_fn=step,
                    mask=mask,
                    weights=per_step,
                    loss_output=loss_output,
                    has_aux=True,
                    return_value=True,
                    progress=progress,
                    progress_chunk=2,
                )
            )
        (g, value, aux), (g1, value1, aux1) = results
        _close(g, g1, 1e-12)
        _close(value, value1, 1e-12)
        _close(aux, aux1, 1e-12)
        assert aux["out"].shape == (T, B, H)
        assert jnp.shape(value) == (() if loss_output == "scalar" else (T, B))


def test_progress_with_windows(rng: np.random.Generator) -> None:
    """``chunk_size=2`` windows; progress chunks of 3 are rounded up to 4 steps, so the windows stay aligned."""
    xs, ys = _data(rng)
    results, snaps = [], []
    for progress in (True, False):
        cell, m = _gru("multi-step", "ES_D_RTRL")

        def window(x: Array, y: Array, m: Any = m) -> tuple[Array, Array]:
            out = m(MultiStepData(x))
            return jnp.sum((out - y) ** 2, axis=(1, 2)), out[-1]

        results.append(
            m.etrace_grad(
                xs,
                ys,
                step_fn=window,
                chunk_size=2,
                has_aux=True,
                return_value=True,
                progress=progress,
                progress_chunk=3,
            )
        )
        snaps.append(_snapshot(cell, m))
    (g, losses, aux), (g1, losses1, aux1) = results
    _close(g, g1, 1e-12)
    _close(losses, losses1, 1e-12)
    assert aux.shape == aux1.shape == (4, B, H)  # ceil(7 / 2) windows, as without progress
    _close(aux, aux1, 1e-12)
    _close(snaps[0], snaps[1], 1e-12)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_evolve_with_progress(
    chunk_size: int | None, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    xs, _ = _data(rng, 6)  # windows of 3 divide T = 6: the outputs stack as (2, 3, B, H)
    outs, snaps = [], []
    for progress in (True, False):
        cell, a = _gru("multi-step")
        capsys.readouterr()
        outs.append(
            a.etrace_evolve(xs, chunk_size=chunk_size, return_outputs=True, progress=progress, progress_chunk=3)
        )
        err = capsys.readouterr().err
        assert ("etrace_evolve" in err and "6/6" in err) is progress, err
        snaps.append(_snapshot(cell, a))
    _close(outs[0], outs[1], 1e-12)
    _close(snaps[0], snaps[1], 1e-12)
    cell, a = _gru()
    assert a.etrace_evolve(xs, progress=True) is None  # default chunks: ceil(T / 100) = 1 step
    if chunk_size is not None:  # a ragged last window's outputs: the same clear error with and without progress
        for progress in (True, False):
            _, a = _gru("multi-step")
            with pytest.raises(ValueError, match="ragged last window"):
                a.etrace_evolve(_data(rng)[0], chunk_size=3, return_outputs=True, progress=progress, progress_chunk=3)


def test_progress_on_a_vmapped_learner(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    grads = []
    for progress in (True, False):
        brainstate.random.seed(5)
        cell = etp_nn.GRUCell(I, H)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vm = etp_algorithms.compile(cell, "d_rtrl", jnp.zeros((B, I)), batch_size=B, vmap=True)

        def step(x: Array, y: Array, vm: Any = vm) -> Array:
            return jnp.sum((vm(x) - y) ** 2)

        grads.append(vm.etrace_grad(xs, ys, step_fn=step, progress=progress, progress_chunk=4))
    _close(grads[0], grads[1], 1e-12)


def test_progress_inside_jit_is_refused_and_changes_nothing(rng: np.random.Generator) -> None:
    xs, ys = _data(rng)
    cell, a = _gru()
    before = _snapshot(cell, a)

    @brainstate.transform.jit
    def train(xs: Array, ys: Array) -> Any:
        return a.etrace_grad(xs, ys, step_fn=_loss_fn(a), progress=True)

    with pytest.raises(ValueError, match=r"etrace_grad\(progress=True\).*inside jit"):
        train(xs, ys)
    with pytest.raises(ValueError, match=r"etrace_evolve\(progress=True\).*inside jit"):
        brainstate.transform.jit(lambda xs: a.etrace_evolve(xs, progress=True))(xs)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="progress_chunk must be None or a positive int"):
            a.etrace_grad(xs, ys, step_fn=_loss_fn(a), progress=True, progress_chunk=bad)  # type: ignore[arg-type]
    _equal(_snapshot(cell, a), before)
