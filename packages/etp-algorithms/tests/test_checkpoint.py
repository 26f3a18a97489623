"""Checkpoints (issue 19): train k steps, save, restore in a fresh process, continue: bit-identical.

The oracle of the continuation is the uninterrupted run itself, in float64 and float32:
``checkpoint_worker.py`` trains D_RTRL and ES_D_RTRL (its bias-correction counter) on a GRU and a
LIF network online with Adam for k steps, saves a checkpoint (which reads the states and writes
none: checked here) and runs on to step N; a second process (the same interpreter) builds each
learner from another initialisation, restores and trains the remaining steps. Every state leaf and the Adam state must equal the uninterrupted
run's bit for bit. In this process: restoring into a learner of another batch size, model,
class or dtype, or with another ``extra``, raises an error naming the difference and changes
nothing; series of steps; typed PRNG keys; bad calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_nn
from etp_algorithms import D_RTRL, ES_D_RTRL, ETraceAlgorithm
from etp_algorithms._checkpoint import CheckpointMismatchError, checkpoint_steps, restore_checkpoint, save_checkpoint

WORKER = Path(__file__).with_name("checkpoint_worker.py")
CONFIGS = [f"{learner}-{model}" for learner in ("D_RTRL", "ES_D_RTRL") for model in ("gru", "lif")]
K = 3  # the worker's checkpoint step


# ---------------------------------------------------------------------------- across processes
def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _bit_identical(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _check_config(root: Path, config: str, dtype: str) -> None:
    full, at_k, fresh, restored, resumed = (
        _load(root / config / f"{name}.npz") for name in ("full", "at_k", "fresh", "restored", "resumed")
    )
    assert set(full) == set(resumed) == set(at_k) == set(restored) == set(fresh)
    assert any(key.startswith("etrace") for key in full) and any(key.startswith("adam") for key in full)
    floats = [v for v in full.values() if v.dtype.kind == "f"]
    assert floats and all(v.dtype == np.dtype(dtype) for v in floats)
    # the continuation: every state leaf and the Adam state as the uninterrupted run's, bit for bit
    assert [key for key in full if not _bit_identical(full[key], resumed[key])] == []
    # the restore wrote every state of the saved learner ...
    assert [key for key in at_k if not _bit_identical(at_k[key], restored[key])] == []
    # ... into a target that started elsewhere: parameters, traces and the optimizer state all had to be written
    must_change = [key for key in at_k if key.startswith(("etrace", "adam")) or ".weight" in key]
    assert len(must_change) >= 8
    assert [key for key in must_change if _bit_identical(at_k[key], fresh[key])] == []
    if config.startswith("ES_D_RTRL"):
        assert int(restored["etrace.steps"]) == K and int(fresh["etrace.steps"]) == 0


# one test per dtype (not per configuration): its two worker processes run once, on one xdist worker
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_resumed_in_a_fresh_process_is_bit_identical_to_the_uninterrupted_run(dtype: str, tmp_path: Path) -> None:
    for phase in ("first", "resume"):
        done = subprocess.run(
            [sys.executable, str(WORKER), phase, dtype, str(tmp_path)], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"worker {phase} {dtype} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    failures = {}
    for config in CONFIGS:
        try:
            _check_config(tmp_path, config, dtype)
        except AssertionError as error:
            failures[config] = str(error)
    assert failures == {}, failures


def test_restore_keeps_each_targets_placement_on_two_devices(tmp_path: Path) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run(
        [sys.executable, str(WORKER), "sharded", "float64", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"{done.stdout}\n{done.stderr[-4000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["split"] >= 3  # hidden state and traces split over the batch
    assert result["sharded"] == {"kept": True, "equal": True}
    assert result["plain"] == {"kept": True, "equal": True} and result["plain_one_device"]


# ---------------------------------------------------------------------------- in this process
def _learner(cls: type = D_RTRL, hidden: int = 4, batch: int = 2, seed: int = 0, dtype: Any = jnp.float64) -> Any:
    brainstate.random.seed(seed)
    # the session runs in float64 (the root conftest); leaving this context restores that precision
    with brainstate.environ.context(precision=64 if dtype == jnp.float64 else 32):
        cell = etp_nn.GRUCell(3, hidden)
        brainstate.nn.init_all_states(cell, batch_size=batch)
    assert jax.config.read("jax_enable_x64"), "a float32 model must not switch the session's float64 off"
    learner = cls(cell) if cls is D_RTRL else cls(cell, 0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(jnp.zeros((batch, 3), dtype))
    for t in range(2):
        learner(jnp.full((batch, 3), 0.5 + t, dtype))
    return learner


def _values(learner: ETraceAlgorithm) -> dict[str, list[bytes]]:
    return {
        ".".join(map(str, p)): [np.asarray(x).tobytes() for x in jax.tree.leaves(s.value)]
        for p, s in learner.states().items()
    }


def _mismatch(tmp_path: Path, saved: ETraceAlgorithm, target: ETraceAlgorithm, *expected: str, **kw: Any) -> str:
    path = save_checkpoint(tmp_path / "ckpt", saved, extra=kw.pop("saved_extra", None))
    before = _values(target)
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(path, target, **kw)
    message = str(info.value)
    for text in expected:
        assert text in message, (text, message)
    assert "nothing was restored" in message
    assert _values(target) == before  # a failed restore leaves the target untouched
    return message


def test_another_batch_size_is_named(tmp_path: Path) -> None:
    _mismatch(
        tmp_path,
        _learner(batch=2),
        _learner(batch=3, seed=1),
        "compiled inputs: [(2, 3) float64] in the checkpoint, [(3, 3) float64] in the target",
        "another batch size",
        "state model.h: shape (2, 4) in the checkpoint, (3, 4) in the target",
    )


def test_another_model_is_named(tmp_path: Path) -> None:
    _mismatch(
        tmp_path,
        _learner(hidden=4),
        _learner(hidden=5, seed=1),
        "state model.Wz.weight['weight']: shape (7, 4) in the checkpoint, (8, 5) in the target",
    )


def test_another_model_structure_is_named(tmp_path: Path) -> None:
    saved = _learner()
    brainstate.random.seed(1)
    model = etp_nn.VanillaRNNCell(3, 4)
    brainstate.nn.init_all_states(model, batch_size=2)
    target = D_RTRL(model)
    target.compile_graph(jnp.zeros((2, 3)))
    _mismatch(
        tmp_path,
        saved,
        target,
        "another model: checkpoint etp_nn._gated_rnn.GRUCell, target etp_nn._rnn.VanillaRNNCell",
        "only in the checkpoint: ['model.Wh.weight', 'model.Wr.weight', 'model.Wz.weight']; "
        "only in the target: ['model.W.weight']",
    )


def test_another_learner_and_rule_are_named(tmp_path: Path) -> None:
    _mismatch(
        tmp_path,
        _learner(D_RTRL),
        _learner(ES_D_RTRL, seed=1),
        "learner: etp_algorithms._d_rtrl.D_RTRL in the checkpoint, etp_algorithms._es_d_rtrl.ES_D_RTRL in the target",
        "rule: 'D_RTRL' in the checkpoint, 'ES_D_RTRL' in the target",
        "state etrace: structure differs",
    )


def test_another_dtype_is_named(tmp_path: Path) -> None:
    _mismatch(
        tmp_path,
        _learner(dtype=jnp.float32),
        _learner(seed=1),
        "state model.Wz.weight['weight']: dtype float32 in the checkpoint, float64 in the target",
        "[(2, 3) float32] in the checkpoint, [(2, 3) float64] in the target (another dtype",
    )


def test_extra_mismatches_are_named(tmp_path: Path) -> None:
    saved, target = _learner(), _learner(seed=1)
    _mismatch(
        tmp_path / "a",
        saved,
        target,
        "extra['m']: shape (3,) in the checkpoint, (4,) in the target",
        saved_extra={"m": jnp.zeros(3)},
        extra={"m": jnp.zeros(4)},
    )
    _mismatch(tmp_path / "b", saved, target, "extra: structure differs", saved_extra={"m": 1.0}, extra={"v": 1.0})
    _mismatch(tmp_path / "c", saved, target, "the checkpoint holds no extra", extra={"m": jnp.zeros(3)})


def test_restore_without_extra_restores_the_learner_and_returns_none(tmp_path: Path) -> None:
    saved, target = _learner(), _learner(seed=1)
    path = save_checkpoint(tmp_path / "ckpt", saved, extra={"m": jnp.arange(3.0)})
    assert _values(target) != _values(saved)
    assert restore_checkpoint(path, target) is None
    assert _values(target) == _values(saved)
    # the restored learner goes on as the saved one does
    x = jnp.full((2, 3), -0.3)
    np.testing.assert_array_equal(np.asarray(target(x)), np.asarray(saved(x)))
    assert _values(target) == _values(saved)


def test_es_d_rtrl_counter_and_extra_round_trip(tmp_path: Path) -> None:
    saved, target = _learner(ES_D_RTRL), _learner(ES_D_RTRL, seed=1)
    target(jnp.ones((2, 3)))  # three steps on the target, two on the saved learner
    extra = {"count": jnp.asarray(7, jnp.int32), "m": (jnp.arange(4.0), np.float32(2.5)), "key": jax.random.key(3)}
    path = save_checkpoint(tmp_path / "ckpt", saved, extra=extra)
    like = {"count": jnp.asarray(0, jnp.int32), "m": (jnp.zeros(4), np.float32(0)), "key": jax.random.key(0)}
    got = restore_checkpoint(path, target, extra=like)
    assert int(target.etrace.value.steps) == 2
    assert int(got["count"]) == 7 and got["count"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got["m"][0]), np.arange(4.0))
    assert got["m"][1].dtype == np.float32 and float(got["m"][1]) == 2.5
    assert jnp.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(got["key"])), jax.random.key_data(extra["key"]))
    assert int(like["count"]) == 0  # the target pytree itself is not modified


def test_a_series_of_steps(tmp_path: Path) -> None:
    learner = _learner()
    saved = {}
    for step in (1, 2, 3):
        learner(jnp.full((2, 3), float(step)))
        path = save_checkpoint(tmp_path, learner, step=step, max_to_keep=2)
        assert path == tmp_path.absolute() / str(step)
        saved[step] = _values(learner)
    assert checkpoint_steps(tmp_path) == [2, 3]
    target = _learner(seed=1)
    restore_checkpoint(tmp_path, target)
    assert _values(target) == saved[3]
    restore_checkpoint(tmp_path, target, step=2)
    assert _values(target) == saved[2]
    with pytest.raises(FileNotFoundError, match=r"no step 1 in .*; saved steps: \[2, 3\]"):
        restore_checkpoint(tmp_path, target, step=1)
    with pytest.raises(FileExistsError, match="step 3 already exists"):
        save_checkpoint(tmp_path, target, step=3)
    save_checkpoint(tmp_path, target, step=3, overwrite=True)
    restore_checkpoint(tmp_path, learner, step=3)
    assert _values(learner) == saved[2]


def test_bad_calls(tmp_path: Path) -> None:
    learner = _learner()
    before = _values(learner)
    path = save_checkpoint(tmp_path / "one", learner, extra={"m": jnp.ones(2)})
    assert _values(learner) == before  # saving writes no state
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_checkpoint(path, learner)
    save_checkpoint(path, learner, overwrite=True)
    with pytest.raises(ValueError, match="is one checkpoint"):
        restore_checkpoint(path, learner, step=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        restore_checkpoint(tmp_path / "missing", learner)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        restore_checkpoint(tmp_path / "empty", learner)
    with pytest.raises(TypeError, match="step must be a non-negative int"):
        save_checkpoint(tmp_path / "s", learner, step=-1)
    with pytest.raises(ValueError, match="max_to_keep applies to checkpoints saved with step"):
        save_checkpoint(tmp_path / "s", learner, max_to_keep=2)
    with pytest.raises(TypeError, match="expects an etp_algorithms learner"):
        save_checkpoint(tmp_path / "s", learner.model)  # type: ignore[arg-type]
    cell = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(cell, batch_size=2)
    with pytest.raises(RuntimeError, match="is not compiled; call learner.compile_graph"):
        save_checkpoint(tmp_path / "s", D_RTRL(cell))
    with pytest.raises(RuntimeError, match="is not compiled"):
        restore_checkpoint(path, D_RTRL(cell))
