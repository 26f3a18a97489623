"""The compiled ``etrace_grad`` program's temporary memory does not grow with the sequence length.

Lowered and compiled only (``memory_analysis()`` of XLA's program), never run over 10,000 steps:
the same temporary bytes at T = 100 and T = 10,000 (D_RTRL, ES_D_RTRL), and with ``chunk_size=k``
a size that grows with ``k``, not with ``T``. The arguments (the sequences) grow with T, as they must.
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax.numpy as jnp
import pytest

import etp_nn
from etp_algorithms import D_RTRL, ES_D_RTRL, MultiStepData


def _memory(kind: str, steps: int, chunk_size: int | None = None) -> Any:
    cell = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(cell, batch_size=2)
    vjp = "single-step" if chunk_size is None else "multi-step"
    learner = D_RTRL(cell, vjp_method=vjp) if kind == "D_RTRL" else ES_D_RTRL(cell, 0.8, vjp_method=vjp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(jnp.zeros((2, 3)))
    xs, ys = jnp.zeros((steps, 2, 3)), jnp.zeros((steps, 2, 4))

    def step_loss(x: Any, y: Any) -> Any:
        if chunk_size is None:
            return jnp.sum((learner(x) - y) ** 2)
        return jnp.sum((learner(MultiStepData(x)) - y) ** 2, axis=(1, 2))

    program, args = learner._etrace_grad_program(
        xs, ys, step_fn=step_loss, mask=None, chunk_size=chunk_size, weights=None, reduction="mean",
        loss_output="per_step", has_aux=False, return_value=True,
    )  # fmt: skip
    return program.lower(*args).compile().memory_analysis()


@pytest.mark.parametrize("kind", ["D_RTRL", "ES_D_RTRL"])
def test_temporary_memory_is_independent_of_the_sequence_length(kind: str) -> None:
    short, long = _memory(kind, 100), _memory(kind, 10_000)
    assert long.argument_size_in_bytes > 50 * short.argument_size_in_bytes  # the inputs did grow
    assert long.temp_size_in_bytes == short.temp_size_in_bytes


def test_with_windows_it_grows_with_the_window_not_the_sequence() -> None:
    by_k = {}
    for k in (2, 4):
        short, long = _memory("D_RTRL", 100, k), _memory("D_RTRL", 10_000, k)
        assert long.temp_size_in_bytes == short.temp_size_in_bytes, k
        by_k[k] = short.temp_size_in_bytes
    assert by_k[4] > by_k[2]
