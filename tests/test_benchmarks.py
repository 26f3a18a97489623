"""The performance benchmark's pipeline runs end to end (``--quick``: tiny sizes, no peer).

Timings are not asserted (they live in the benchmark's output, not in tests); the structure of
the results, the memory analysis and the plots are.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` loaded as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``benchmarks/<name>.py args`` in a fresh interpreter; a non-zero exit fails with its output's tail."""
    command = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _performance_module() -> ModuleType:
    return _benchmark_module("performance")


def test_peer_follows_the_interpreter() -> None:
    performance = _performance_module()
    assert performance.peer_version((3, 11)) == "0.2.6"
    assert performance.peer_version((3, 12)) == "0.2.8"
    assert performance.peer_version((3, 13)) == "0.2.8"
    expected = "0.2.8" if sys.version_info >= (3, 12) else "0.2.6"
    assert performance.peer_version() == expected
    # the peer environment takes our Python, jax, jaxlib and brainstate versions
    stack = performance.our_stack()
    assert stack == {
        "python": platform.python_version(),
        "jax": version("jax"),
        "jaxlib": version("jaxlib"),
        "brainstate": version("brainstate"),
    }


def test_performance_benchmark_quick_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "performance.py"), "--quick", "--no-peer", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ms per step (median)" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    # the stack measured is recorded; no peer with --no-peer
    assert results["stack"]["python"] == platform.python_version()
    assert results["stack"]["jax"] == version("jax")
    assert results["stack"]["brainstate"] == version("brainstate")
    assert results["stack"]["peer"] is None
    rows = results["step_time"]
    assert {r["method"] for r in rows} == {"forward", "bptt", "d_rtrl", "es_d_rtrl", "es_d_rtrl[traced]"}
    assert all(r["ms_per_step"] > 0 for r in rows), rows
    d_rtrl = next(r for r in rows if r["method"] == "d_rtrl")
    # GRU(8 -> 16): Wz and Wh carry (B, I + H, H) weight traces plus (B, H) bias traces, float32
    assert d_rtrl["trace_bytes"] == 2 * 4 * (4 * (8 + 16) * 16 + 4 * 16)
    memory = {(r["method"], r["T"]): r for r in results["memory"]["rows"]}
    # BPTT keeps every step's activations; the online learners' programs do not grow with T
    assert memory[("bptt", 30)]["temp_size_in_bytes"] > memory[("bptt", 10)]["temp_size_in_bytes"]
    for method in ("d_rtrl", "es_d_rtrl"):
        assert memory[(method, 30)]["xla_total_bytes"] <= 1.1 * memory[(method, 10)]["xla_total_bytes"]
    assert results["bandwidth"]["bytes_per_s"] > 0
    assert results["dot_throughput"]["flops_per_s"] > 0
    forward = next(r for r in rows if r["method"] == "forward")
    # at least the step's matrix products: the three gates (B, I + H) @ (I + H, H) and the readout (H -> 10)
    assert forward["flops_per_step"] >= 3 * 2 * 4 * (8 + 16) * 16 + 2 * 4 * 16 * 10
    assert all(r["flops_per_step"] >= forward["flops_per_step"] for r in rows)
    # ours gives every parameter of the GRU a gradient; the equal-work row differentiates the
    # trace-carrying weights alone (Wz and Wh: Wr reaches h through Wh, the readout through none)
    support = results["grad_support"][0]
    assert support["library"] == "etp" and support["nonzero"] == support["all"]
    assert results["summary"]["zero_gradients_es_d_rtrl"] == {"gru H=16": {"etp": []}}
    traced = next(r for r in rows if r["method"] == "es_d_rtrl[traced]")
    assert traced["param_paths"] == [["cell", "Wh", "weight"], ["cell", "Wz", "weight"]]
    full = next(r for r in rows if r["method"] == "es_d_rtrl")
    assert traced["flops_per_step"] < full["flops_per_step"]
    per_step = {(r["method"], r["jit"]): r for r in results["per_step"]}
    assert set(per_step) == {(m, j) for m in ("d_rtrl", "es_d_rtrl") for j in ("brainstate", "in_place")}
    assert all(r["library"] == "etp" and r["ms_per_step"] > 0 for r in per_step.values()), per_step
    assert "step called from Python once per time step" in proc.stdout
    compile_rows = {r["method"]: r for r in results["compile_time"]}
    assert set(compile_rows) == {"d_rtrl", "es_d_rtrl"}
    assert all(r["total_s"] == r["compile_graph_s"] + r["first_step_s"] > 0 for r in compile_rows.values())
    for name in ("step_time.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_etrace_grad_benchmark_quick_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "etrace_grad.py"), "--quick", "--no-peer", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ms per sequence of T=10 steps" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stack"]["python"] == platform.python_version() and results["stack"]["peer"] is None
    rows = results["rows"]
    configs = {(m, method) for m in ("gru", "lif") for method in ("d_rtrl", "es_d_rtrl")}
    programs = {("etrace_grad", "brainstate"), ("hand_loop", "in_place"), ("etrace_grad_direct", "none")}
    programs |= {("etrace_grad_chunked", "brainstate")}
    assert {(r["model"], r["method"], r["program"], r["jit"]) for r in rows} == {
        (*config, *program) for config in configs for program in programs
    }
    assert all(r["library"] == "etp" and r["ms_per_sequence"] > 0 for r in rows), rows
    # the chunked driver's windows of 10 steps: one window over --quick's T=10
    assert "chunked" in proc.stdout
    for row in rows:
        if row["program"] != "etrace_grad_direct":
            assert row["memory"]["xla_total_bytes"] > 0
        # the sequence's inputs and targets (10 x 4 x (8 + 10) float32) are arguments of the program
        if "memory" in row:
            assert row["memory"]["argument_size_in_bytes"] >= 10 * 4 * (8 + 10) * 4
    # the driver and the hand loop compute the same gradients, of every parameter
    checks = results["grad_check"]
    assert {(c["model"], c["method"]) for c in checks} == configs
    for check in checks:
        assert check["max_rel_error"] < 1e-4, check
        # the GRU gives every parameter a gradient (the LIF network's spike-driven ones can be zero here)
        if check["model"] == "gru":
            assert len(check["grad_norm"]) == 8 and all(norm > 0 for norm in check["grad_norm"].values()), check


def test_learners_benchmark_quick_run(tmp_path: Path) -> None:
    # GRU only, RTRL beside BPTT and D_RTRL; RTRL given a tiny influence limit, so that it refuses
    options = json.dumps({"rtrl": {"max_influence_bytes": 1000}})
    command = [sys.executable, str(ROOT / "benchmarks" / "learners.py"), "--quick", "--models", "gru"]
    command += ["--learners", "rtrl", "--options", options, "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| learner | ms/step | / D_RTRL | trace MiB | XLA temp MiB | status |" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stack"]["jax"] == version("jax") and results["quick"] is True
    # --learners keeps the named learners and the D_RTRL baseline
    assert results["learners"] == {"d_rtrl": "D_RTRL", "rtrl": "RTRL"}
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"bptt", "d_rtrl", "rtrl"}
    for method in ("bptt", "d_rtrl"):
        assert rows[method]["status"] == "ok" and rows[method]["ms_per_step"] > 0, rows[method]
        assert rows[method]["temp_size_in_bytes"] >= 0
    assert rows["d_rtrl"]["ratio_to_d_rtrl"] == 1.0
    # GRU(8 -> 8), B=4: Wz and Wh carry (B, I + H, H) weight traces plus (B, H) bias traces, float32
    assert rows["d_rtrl"]["trace_bytes"] == 2 * 4 * (4 * (8 + 8) * 8 + 4 * 8)
    # the refusal is a row with the byte count, not a crash
    assert rows["rtrl"]["status"].startswith("compile failed: CompilationError: RTRL: the influence matrix")
    assert "above max_influence_bytes=1000" in rows["rtrl"]["status"]
    assert "ms_per_step" not in rows["rtrl"]


def test_learners_benchmark_one_row_per_class() -> None:
    learners = _benchmark_module("learners")
    registered = {"pp_prop": "ES_D_RTRL", "esd_rtrl": "ES_D_RTRL", "es_d_rtrl": "ES_D_RTRL", "snap": "SnAp"}
    registered |= {"ostl_recurrent": "OSTLRecurrent", "d_rtrl": "D_RTRL"}
    order, aliases = learners.learner_names(registered)
    assert order == ["d_rtrl", "es_d_rtrl", "ostl_recurrent", "snap"]
    assert aliases["es_d_rtrl"] == ["esd_rtrl", "pp_prop"] and aliases["snap"] == []


def test_peer_learners_benchmark_quick_run(tmp_path: Path) -> None:
    # ours alone (the peer needs its own environment, made by the benchmark outside the tests)
    proc = _run_benchmark(
        "peer_learners",
        *"--quick --no-peer --models lif --learners d_rtrl three_factor".split(),
        "--out",
        str(tmp_path),
    )
    assert "| learner | ours ms/step | peer ms/step | ours/peer | target |" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stack"]["peer"] is None and results["peer_classes"] == {
        "d_rtrl": "D_RTRL",
        "three_factor": "ThreeFactor",
    }
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"d_rtrl", "three_factor"}
    for row in rows.values():
        assert row["library"] == "etp" and row["status"] == "ok", row
        assert row["ms_per_step"] > 0 and row["lower_s"] > 0 and row["xla_compile_s"] > 0
        # compile + first step: the graph, tracing and XLA's compile, each timed ahead of time, and one step
        stages = row["compile_graph_s"] + row["lower_s"] + row["xla_compile_s"] + row["ms_per_step_min"] / 1e3
        assert abs(row["compile_s"] - stages) < 1e-9, row
    # recurrent LIF(8 -> 8), B=4: the input and recurrent weights' (B, I, H) traces and the bias's (B, H),
    # float32, for each of the two hidden states the weights reach (the potential and the fed-back spikes)
    assert rows["d_rtrl"]["trace_bytes"] == 2 * 4 * 4 * (8 * 8 + 8 * 8 + 8)
    # no peer, no ratio
    assert all("step_ratio" not in r for r in results["ratios"])
    # the rows so far, written after each one, end as the full list
    partial = json.loads((tmp_path / "results.partial.json").read_text())
    assert partial["partial"] is True and partial["rows"] == results["rows"]
    # --cost: XLA's count of one step's flops and bytes instead of timings
    command = [sys.executable, str(ROOT / "benchmarks" / "peer_learners.py"), "--quick", "--no-peer", "--cost"]
    command += ["--models", "lif", "--learners", "d_rtrl", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "cost.json").read_text())["rows"]
    assert row["status"] == "ok" and row["flops_per_step"] > 0 and row["bytes_per_step"] > 0
    assert "ms_per_step" not in row and "| lif H=8 | d_rtrl |" in proc.stdout


def test_peer_learners_ratios_and_targets() -> None:
    module = _benchmark_module("peer_learners")
    common = {"hidden": 256, "batch": 32, "n_in": 64, "steps": 20, "status": "ok"}
    rows = [
        {**common, "library": "etp", "model": "gru", "method": "es_d_rtrl", "ms_per_step": 0.7, "compile_s": 1.0},
        {**common, "library": "peer", "model": "gru", "method": "es_d_rtrl", "ms_per_step": 1.0, "compile_s": 2.0},
        {**common, "library": "etp", "model": "gru", "method": "snap", "ms_per_step": 3.0, "compile_s": 3.0},
        {**common, "library": "peer", "model": "gru", "method": "snap", "ms_per_step": 4.0, "compile_s": 2.0},
        {**common, "library": "etp", "model": "gru", "method": "uoro", "ms_per_step": 1.0, "compile_s": 1.0},
        {**common, "library": "peer", "model": "gru", "method": "uoro", "status": "run failed: RuntimeError: x"},
    ]
    ratios = {r["method"]: r for r in module.ratios(rows)}
    # ES_D_RTRL on the GRU has its own target (0.8); the others 0.5; compile time at most the peer's
    assert ratios["es_d_rtrl"]["target"] == 0.8 and ratios["es_d_rtrl"]["step_target_met"] is True
    assert ratios["es_d_rtrl"]["compile_ratio"] == 0.5 and ratios["es_d_rtrl"]["compile_target_met"] is True
    assert ratios["snap"]["step_ratio"] == 0.75 and ratios["snap"]["step_target_met"] is False
    assert ratios["snap"]["compile_target_met"] is False
    # a peer row without a time gives no ratio, and the table says why
    assert "step_ratio" not in ratios["uoro"]
    results = {"rows": rows, "ratios": list(ratios.values()), "quick": False}
    lines = module.table(results, "gru", 256)
    uoro = next(line for line in lines if line.startswith("| uoro |"))
    assert uoro.endswith("| ok / run failed (RuntimeError) |") and "| - |" in uoro
    assert any(line.startswith("| es_d_rtrl | 0.700 | 1.000 | 0.70 | 0.8 |") for line in lines)
    # the equal-work variant is its own row, against the same peer row
    rows.append({**rows[0], "variant": "equal work", "ms_per_step": 0.5})
    results = {"rows": rows, "ratios": module.ratios(rows), "quick": False}
    lines = module.table(results, "gru", 256)
    assert any(line.startswith("| es_d_rtrl | 0.700 | 1.000 | 0.70 | 0.8 |") for line in lines)
    assert any(line.startswith("| es_d_rtrl (equal work) | 0.500 | 1.000 | 0.50 | 0.8 |") for line in lines)


def test_peer_learners_runs_snap_alone_on_the_small_workloads(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _benchmark_module("peer_learners")
    asked: list[dict[str, Any]] = []

    def fake_worker(spec: dict[str, Any], timeout: float, python: str) -> dict[str, Any]:
        asked.append(spec)
        return {"status": "ok", "ms_per_step": 1.0, "compile_s": 1.0}

    monkeypatch.setattr(module, "run_worker", fake_worker)
    module.measure(quick=False, peer="peer-python", models=["gru"])
    by_size: dict[tuple[int, int], set[str]] = {}
    for spec in asked:
        by_size.setdefault((spec["batch"], spec["hidden"]), set()).add(spec["method"])
    every = set(module.PEER_CLASSES)
    # the workloads with every learner; B=4, H=32 (where the peer's SnAp runs) with SnAp alone
    assert by_size == {(32, 256): every, (32, 512): every, (4, 32): {"snap"}}
    assert {spec["library"] for spec in asked} == {"etp", "peer"}
    assert all(spec["options"] == module.PEER_OPTIONS.get(spec["method"], {}) for spec in asked)
    # ours again without the reset-gate weight's gradient, which the peer returns as zero: the equal-work row
    equal = [spec for spec in asked if spec.get("variant")]
    assert {(s["library"], s["method"], s["hidden"]) for s in equal} == {
        ("etp", method, size) for method in ("es_d_rtrl", "ostl_feedforward") for size in (256, 512)
    }
    assert all(s["exclude"] == [["cell", "Wr", "weight"]] and s["variant"] == "equal work" for s in equal)


def test_profile_learner_counts_each_kernel_per_step() -> None:
    module = _benchmark_module("profile_learner")
    trace = {
        "traceEvents": [
            {"ph": "X", "name": "dot.1", "dur": 30.0},
            {"ph": "X", "name": "dot.1", "dur": 50.0},
            {"ph": "X", "name": "fusion.2", "dur": 8.0},
            {"ph": "X", "name": "$api.py:1 block_until_ready", "dur": 900.0},  # a Python frame
            {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 500.0},  # the runtime's span
            {"ph": "i", "name": "dot.1"},  # not a complete event
        ]
    }
    assert module.kernel_times(trace, per=2) == [("dot.1", 40.0, 1.0), ("fusion.2", 4.0, 0.5)]


def test_profile_learner_quick_run(tmp_path: Path) -> None:
    sizes = ["--batch", "2", "--n-in", "4", "--hidden", "8", "--steps", "3", "--calls", "1"]
    proc = _run_benchmark(
        "profile_learner", "--model", "lif", *sizes, "--method", "es_d_rtrl", "--hlo", str(tmp_path / "step.hlo")
    )
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("etp lif B=2 H=8 es_d_rtrl: ") and lines[0].endswith(" us per step (wall)")
    kernels = [line for line in lines[1:] if " us/step  x" in line]
    assert kernels and all("$" not in line for line in kernels)
    assert "while" in (tmp_path / "step.hlo").read_text()


def test_the_equal_work_row_leaves_out_the_named_parameters() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        worker = _benchmark_module("_learner_worker")
        net = _benchmark_module("_workloads").build("gru", 2, 3, 4)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert worker._kept_params(net, {}) is None  # every parameter
    kept = worker._kept_params(net, {"exclude": [["cell", "Wr", "weight"]]})
    assert kept == [("cell", "Wh", "weight"), ("cell", "Wz", "weight"), ("readout", "weight")]
    with pytest.raises(ValueError, match=r"exclude names parameters the model does not have: \[\('cell', 'Wq'"):
        worker._kept_params(net, {"exclude": [["cell", "Wq", "weight"]]})


def test_peer_learners_memory_is_flat_in_the_sequence_length(tmp_path: Path) -> None:
    proc = _run_benchmark(
        "peer_learners", *"--quick --memory --models lif --learners d_rtrl uoro".split(), "--out", str(tmp_path)
    )
    assert "| workload | learner | MB at T=10 | MB at T=40 | growth |" in proc.stdout
    results = json.loads((tmp_path / "memory.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"d_rtrl", "uoro"} and {r["library"] for r in results["rows"]} == {"etp"}
    for row in rows.values():
        by = row["xla_bytes_by_length"]
        assert row["status"] == "ok" and by["10"] > 0
        # an online learner holds nothing per step: only the loop's int32 step indices grow with T
        assert 0 <= by["40"] - by["10"] <= 4 * (40 - 10) + 64, row
