"""Data-parallel learners on a device mesh (:func:`etp_algorithms._sharding.shard`), against the unsharded learner.

Each check runs ``sharding_worker.py`` in a fresh process, where ``XLA_FLAGS`` gives JAX 4 host
devices before it is imported (2 per process for the two-process ``jax.distributed`` run). The
oracle is the same learner, built from the same seed, run unsharded on one device in the same
process: etrace_grad's gradients and losses, a jitted online step, the final states and traces.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"
PAGE = Path(__file__).resolve().parents[3] / "docs" / "many_devices.md"
TRACE_B = 8  # the worker's batch


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.pop("JAX_ENABLE_X64", None)
    return env


def _result(proc: subprocess.CompletedProcess[str] | Any, what: str) -> dict[str, Any]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"{what} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def _worker(*args: str, devices: int = 4, timeout: float = 120) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout, env=_env(devices)
    )
    return _result(proc, "sharding_worker " + " ".join(args))


@pytest.mark.parametrize(
    ("model", "algo", "dtype"),
    [
        ("gru", "d_rtrl", "float64"),
        ("gru", "es_d_rtrl", "float64"),
        ("snn", "d_rtrl", "float64"),
        ("snn", "es_d_rtrl", "float64"),
        ("gru", "d_rtrl", "float32"),
        ("snn", "es_d_rtrl", "float32"),
    ],
)
def test_sharded_learner_equals_unsharded(model: str, algo: str, dtype: str) -> None:
    out = _worker("equal", model, algo, dtype)
    assert out["devices"] == 4 and out["dtype"] == dtype
    tol = 1e-12 if dtype == "float64" else 1e-6
    assert out["grad_norm"] > 1e-6  # a gradient that is not trivially zero
    for key, error in out["errors"].items():
        assert error < tol, (key, error)
    # every trace leaf leading with the batch is split over 'data' (a quarter per device), the rest replicated
    batched = [bool(shape) and shape[0] == TRACE_B for shape in out["trace_shapes"]]
    assert sum(batched) >= 2
    assert out["trace_specs"] == ["('data',)" if b else "()" for b in batched], out["trace_specs"]
    per_device = sum(n // 4 if b else n for n, b in zip(out["trace_nbytes"], batched, strict=True))
    assert out["per_device"] == {str(d): per_device for d in range(4)}
    # after the calls: per-sample states still split, parameters and gradients replicated
    for name, spec_list in out["state_specs"].items():
        shapes = out["state_shapes"][name]
        for spec, shape in zip(spec_list, shapes, strict=True):
            split = bool(shape) and shape[0] == TRACE_B and not any(name.startswith(p) for p in _params(out))
            assert spec == ("('data',)" if split else "()"), (name, spec, shape)
    assert set(out["grad_specs"]) == {"()"}
    assert not [s for s in out["sharded"] if any(s.startswith(p + "[") for p in _params(out))]
    # the compiled programs never gather a trace: no all-gather or all-to-all at all, and no
    # collective moves an array of a whole (global) trace leaf's shape
    full = {tuple(shape) for shape, b in zip(out["trace_shapes"], batched, strict=True) if b}
    for program, found in out["collectives"].items():
        kinds = {op for op, _ in found}
        assert not kinds & {"all-gather", "all-gather-start", "all-to-all"}, (program, kinds)
        for op, shape in found:
            assert not set(_shapes(shape)) & full, (program, op, shape)
        assert "all-reduce" in kinds or "all-reduce-start" in kinds  # the gradients' reduction


def _params(out: dict[str, Any]) -> set[str]:
    """The parameter paths of the worker's report (their leaves are replicated)."""
    return {r.split("[")[0] for r in out["replicated"] if not r.startswith("etrace")}


def _shapes(shape_text: str) -> list[tuple[int, ...]]:
    """The array shapes of an HLO result shape (``f64[2,9,6]{2,1,0}`` or a tuple of them)."""
    return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", shape_text)]


def test_bad_input_is_refused_with_the_sizes_and_axes() -> None:
    out = _worker("errors")
    kind, text = out["uncompiled"]
    assert kind == "RuntimeError" and "D_RTRL" in text and "not compiled" in text
    kind, text = out["not_a_learner"]
    assert kind == "TypeError" and "GRUNet" in text
    kind, text = out["indivisible"]
    assert kind == "ValueError" and "6 samples" in text and "4 devices" in text and "'data'" in text
    kind, text = out["unknown_axis"]
    assert kind == "ValueError" and "'batch'" in text and "'data': 4" in text
    kind, text = out["batch_size_mismatch"]
    assert kind == "ValueError" and "batch_size=4" in text and "rnn.h" in text
    kind, text = out["input_indivisible"]
    assert kind == "ValueError" and "6 samples on axis 1" in text and "(5, 6, 3)" in text and "4 devices" in text
    kind, text = out["input_unknown_axis"]
    assert kind == "ValueError" and "'model'" in text and "'data': 4" in text
    kind, text = out["input_no_axis"]
    assert kind == "ValueError" and "(5,)" in text and "no batch axis 1" in text
    kind, text = out["unbatched"]
    assert kind == "ValueError" and "unbatched" in text
    assert out["unchanged"]  # a refused call placed nothing


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_two_processes_under_jax_distributed_equal_one_process() -> None:
    """Two processes on localhost (gloo CPU collectives), 2 devices each: a 4-device mesh across them.

    The processes are killed after the timeout; a stack without CPU collectives fails here with the
    workers' output (it is not skipped).
    """
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "process", str(pid), "2", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(2),
        )
        for pid in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=150)
            outs.append(_result(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "process"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    want = _worker("single", devices=1)
    assert want["devices"] == 1
    for pid, out in enumerate(outs):
        assert (out["process"], out["processes"], out["devices"]) == (pid, 2, 4)
        # each process holds its own two devices' quarter of every trace
        assert out["trace_local_devices"] == out["local_devices"] and len(out["local_devices"]) == 2
        assert set(out["trace_specs"]) == {"('data',)"}
        assert len(out["result"]) == len(want["result"])
        for got, ref in zip(out["result"], want["result"], strict=True):
            got, ref = np.asarray(got), np.asarray(ref)
            assert np.max(np.abs(got - ref)) <= 1e-12 * max(1.0, float(np.max(np.abs(ref))))


def test_many_devices_page_runs(tmp_path: Path) -> None:
    """docs/many_devices.md's ``python`` blocks, in order, are one program: it runs on 4 devices."""
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)
    assert len(blocks) >= 5
    script = tmp_path / "many_devices.py"
    script.write_text("\n".join(blocks))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=_env(4))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "largest gradient difference after 3 sequences" in proc.stdout
    assert "8 samples, 4 shards of 2" in proc.stdout
