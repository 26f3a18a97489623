"""Performance of the online learners against BPTT and the released braintrace (the peer).

One command: ``uv run python benchmarks/performance.py`` (``--quick`` for a smoke run,
``--no-peer`` to skip the peer). It measures, every number in fresh worker processes
(``_worker.py``) so that one measurement cannot warm or pollute another:

1. the machine's copy bandwidth (bytes read + written per second);
2. ms per training step after warm-up (median of repeats of a jitted loop over ``steps``):
   forward only, BPTT (gradient of the whole loop, amortised per step), D_RTRL, ES_D_RTRL;
   GRU (B=32, I=64, H in {256, 512}) with a linear readout and a recurrent LIF SNN
   (B=32, I=128, H in {256, 512}) with a linear readout; ours and the peer interleaved
   config by config so both see the same machine state;
3. memory against the sequence length T: XLA's memory analysis of the compiled
   whole-sequence program (inputs drawn inside the loop, so only learning state counts)
   and the worker's peak RSS;
4. D_RTRL's memory-traffic floor: the trace read once and written once per step at the
   bandwidth measured for a copy of about the trace's size (caches make small copies faster),
   and the ratio of the measured step time to it;
5. compile time: ``compile_graph`` and the first jitted single-step gradient;
6. a step called from Python once per time step (the usual way to drive an online learner
   outside a compiled loop): both libraries under ``brainstate.transform.jit``, and ours under
   ``braintrace.jit_in_place``, which donates the buffers of the states the step writes;
7. which parameters each library's ES_D_RTRL gives a zero gradient, and ours again with the
   gradient of its trace-carrying weights alone (``es_d_rtrl[traced]``): the same work as a
   learner that returns zero for the rest, for comparing like with like (not a target).

The peer lives in its own virtual environment (``--peer-env``, created with ``uv`` on first
use); it is never installed into the project's environment. It follows the interpreter this
script runs on: ``braintrace==0.2.8`` on Python >= 3.12 (jax 0.12 / brainstate 0.6),
``braintrace==0.2.6`` on Python 3.11 (jax 0.10 / brainstate 0.5), installed with the same
Python version and the same jax, jaxlib and brainstate versions as the running environment,
so that both libraries run on one stack. ``results.json`` records the stack (``"stack"``).
Output: a table on stdout, ``results.json`` and ``step_time.png``/``memory.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the released braintrace measured as the peer, by the Python version this script runs on
PEER_VERSION_PY311 = "0.2.6"  # jax 0.10 / brainstate 0.5
PEER_VERSION_PY312 = "0.2.8"  # jax 0.12 / brainstate 0.6
# packages whose versions the peer environment takes from ours
SHARED_PACKAGES = ("jax", "jaxlib", "brainstate")
METHODS = ("forward", "bptt", "d_rtrl", "es_d_rtrl")
# ES_D_RTRL differentiating only the parameters that carry eligibility traces (an equal-work comparison)
TRACED_ONLY = "es_d_rtrl[traced]"


def _run_worker(python: str, specs: list[dict[str, Any]], timeout: float = 1800.0) -> list[dict[str, Any]]:
    """Run ``specs`` in one fresh worker process; one result (or ``{"error": ...}``) per spec."""
    env = dict(os.environ, PYTHONPATH=str(HERE), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [python, str(HERE / "_worker.py"), json.dumps(specs)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=HERE,  # not the repository root: the peer must not see the project's sources
    )
    results: list[dict[str, Any]] = [
        json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")
    ]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    error = {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return results + [error] * (len(specs) - len(results))


def _run_jobs(jobs: list[tuple[str, dict[str, Any]]], batch: bool) -> list[dict[str, Any]]:
    """``(python, spec)`` jobs, each in its own process, or (``batch``) one process per interpreter."""
    if not batch:
        results = []
        for python, spec in jobs:
            print(f"  {spec['kind']}: {json.dumps({k: v for k, v in spec.items() if k != 'kind'})}", file=sys.stderr)
            results.extend(_run_worker(python, [spec]))
        return results
    by_python: dict[str, list[int]] = {}
    for index, (python, _) in enumerate(jobs):
        by_python.setdefault(python, []).append(index)
    out: list[dict[str, Any]] = [{} for _ in jobs]
    for python, indices in by_python.items():
        for index, result in zip(indices, _run_worker(python, [jobs[i][1] for i in indices]), strict=True):
            out[index] = result
    return out


def peer_version(python_version: tuple[int, ...] = tuple(sys.version_info[:2])) -> str:
    """The released braintrace measured on this Python: 0.2.8 from 3.12 on, 0.2.6 on 3.11."""
    return PEER_VERSION_PY312 if tuple(python_version[:2]) >= (3, 12) else PEER_VERSION_PY311


def our_stack() -> dict[str, str]:
    """The running environment's Python and the versions of the packages the peer shares with it."""
    from importlib.metadata import version

    return {"python": platform.python_version(), **{name: version(name) for name in SHARED_PACKAGES}}


def _env_stack(python: Path) -> dict[str, str] | None:
    """The Python, shared packages' and braintrace versions installed in the environment of ``python``."""
    script = (
        "import json, platform; from importlib.metadata import version; "
        f"print(json.dumps({{'python': platform.python_version(), "
        f"**{{n: version(n) for n in {(*SHARED_PACKAGES, 'braintrace')!r}}}}}))"
    )
    if not python.exists():
        return None
    proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=HERE)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _peer_python(env_dir: Path) -> str | None:
    """The peer environment's interpreter, created on first use (and again when its Python, jax,
    jaxlib, brainstate or braintrace version differ from what this run needs); ``None`` when it
    cannot be made."""
    python = env_dir / "bin" / "python"
    wanted = {**our_stack(), "braintrace": peer_version()}
    found = _env_stack(python)
    if found == wanted:
        return str(python)
    uv = shutil.which("uv")
    if uv is None:
        print("peer: uv not found; skipping the peer", file=sys.stderr)
        return None
    requirements = [f"{name}=={wanted[name]}" for name in ("braintrace", *SHARED_PACKAGES)]
    print(f"peer: creating {env_dir} with Python {wanted['python']}, {' '.join(requirements)}", file=sys.stderr)
    # the same Python version as the running interpreter (a fresh environment when it differs)
    made = subprocess.run(
        [uv, "venv", "--quiet", "--clear", "--python", sys.executable, str(env_dir)], capture_output=True, text=True
    )
    if made.returncode:
        print(f"peer: could not create {env_dir}: {made.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    installed = subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(python), *requirements], capture_output=True, text=True
    )
    found = _env_stack(python)
    if installed.returncode or found != wanted:
        detail = installed.stderr.strip()[-300:] or f"installed {found}, wanted {wanted}"
        print(f"peer: could not install {' '.join(requirements)}: {detail}", file=sys.stderr)
        return None
    return str(python)


def _configs(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "models": [("gru", 4, 8, 16)],
            "steps": 5,
            "repeats": 2,
            "memory_model": ("gru", 4, 8, 16),
            "memory_T": [10, 30],
            "bandwidth_bytes": 1 << 22,
            "compile_models": [("gru", 4, 8, 16)],
            "compile_repeats": 1,
            "per_step_models": [("gru", 4, 8, 16)],
        }
    return {
        "models": [("gru", 32, 64, 256), ("gru", 32, 64, 512), ("lif", 32, 128, 256), ("lif", 32, 128, 512)],
        "steps": 50,
        "repeats": 7,
        "memory_model": ("gru", 32, 64, 256),
        "memory_T": [100, 300, 1000, 3000],
        "bandwidth_bytes": 1 << 28,
        "compile_models": [("gru", 32, 64, 256), ("lif", 32, 128, 256)],
        "compile_repeats": 3,
        "per_step_models": [("gru", 32, 64, 256), ("lif", 32, 128, 256)],
    }


def _spec(kind: str, model: tuple[str, int, int, int], **extra: Any) -> dict[str, Any]:
    name, batch, n_in, hidden = model
    return {"kind": kind, "model": name, "batch": batch, "n_in": n_in, "hidden": hidden, **extra}


def measure(quick: bool, peer: str | None) -> dict[str, Any]:
    cfg = _configs(quick)
    ours = sys.executable
    libs = {"etp": ours, **({"peer": peer} if peer else {})}
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        # the stack measured: ours, and the peer's (the same Python, jax, jaxlib and brainstate)
        "stack": {**our_stack(), "peer": f"braintrace=={peer_version()}" if peer else None},
        "quick": quick,
    }
    jobs: list[tuple[str, dict[str, Any]]] = []
    labels: list[tuple[str, dict[str, Any]]] = []
    jobs.append((ours, {"kind": "copy_bandwidth", "bytes": cfg["bandwidth_bytes"], "repeats": 20}))
    labels.append(("bandwidth", {}))
    # the matrix products of the models' steps: (batch, inputs of the widest op, hidden)
    shapes = sorted({(b, n_in + h if name == "gru" else max(n_in, h), h) for name, b, n_in, h in cfg["models"]})
    jobs.append((ours, {"kind": "dot_throughput", "shapes": shapes, "repeats": 50}))
    labels.append(("dot_throughput", {}))
    for model in cfg["models"]:
        for lib, python in libs.items():
            jobs.append((python, _spec("grad_support", model, method="es_d_rtrl")))
            labels.append(("grad_support", {"library": lib, "model": model[0], "hidden": model[3]}))
        for method in METHODS:
            for lib, python in libs.items():  # interleaved: both libraries see the same machine state
                spec = _spec("step_time", model, method=method, steps=cfg["steps"], repeats=cfg["repeats"])
                row = {"library": lib, "model": model[0], "batch": model[1], "n_in": model[2], "hidden": model[3]}
                jobs.append((python, spec))
                labels.append(("step_time", {**row, "method": method}))
        # ours again with the gradient of the trace-carrying weights alone: the work of a learner
        # that returns zero for every other parameter
        spec = _spec("step_time", model, method="es_d_rtrl", steps=cfg["steps"], repeats=cfg["repeats"])
        jobs.append((ours, {**spec, "gradients": "traced"}))
        row = {"library": "etp", "model": model[0], "batch": model[1], "n_in": model[2], "hidden": model[3]}
        labels.append(("step_time", {**row, "method": TRACED_ONLY}))
    # a step called from Python once per time step: the peer and ours under brainstate's jit, ours
    # under jit_in_place (written states donated)
    for model in cfg["per_step_models"]:
        for method in ("d_rtrl", "es_d_rtrl"):
            for lib, python, jit in [(lib, python, "brainstate") for lib, python in libs.items()] + [
                ("etp", ours, "in_place")
            ]:
                spec = _spec("per_step", model, method=method, steps=cfg["steps"], repeats=cfg["repeats"], jit=jit)
                jobs.append((python, spec))
                row = {"library": lib, "model": model[0], "hidden": model[3], "method": method, "jit": jit}
                labels.append(("per_step", row))
    for method in ("bptt", "d_rtrl", "es_d_rtrl"):
        for steps in cfg["memory_T"]:
            jobs.append((ours, _spec("memory", cfg["memory_model"], method=method, steps=steps)))
            labels.append(("memory", {"method": method, "T": steps}))
    # compile time varies by tens of percent between processes: fresh processes, interleaved, the median
    for model in cfg["compile_models"]:
        for method in ("d_rtrl", "es_d_rtrl"):
            for repeat in range(cfg["compile_repeats"]):
                for lib, python in libs.items():
                    jobs.append((python, _spec("compile_time", model, method=method)))
                    row = {"library": lib, "model": model[0], "hidden": model[3], "method": method}
                    labels.append(("compile_time", {**row, "repeat": repeat}))

    measured = _run_jobs(jobs, batch=quick)
    results["bandwidth"] = measured[0]
    results["dot_throughput"] = measured[1]
    results["step_time"] = [
        {**row, **m} for (kind, row), m in zip(labels, measured, strict=True) if kind == "step_time"
    ]
    results["per_step"] = [{**row, **m} for (kind, row), m in zip(labels, measured, strict=True) if kind == "per_step"]
    results["grad_support"] = [
        {**row, **m} for (kind, row), m in zip(labels, measured, strict=True) if kind == "grad_support"
    ]
    results["memory"] = {
        "model": cfg["memory_model"],
        "rows": [{**row, **m} for (kind, row), m in zip(labels, measured, strict=True) if kind == "memory"],
    }
    results["compile_time"] = _median_compile_times(
        [{**row, **m} for (kind, row), m in zip(labels, measured, strict=True) if kind == "compile_time"]
    )
    results["summary"] = summarise(results)
    return results


def _median_compile_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (library, model, method): the median total over the repeats, and every repeat."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["library"], row["model"], row["hidden"], row["method"]), []).append(row)
    out = []
    for (lib, model, hidden, method), repeats in groups.items():
        entry: dict[str, Any] = {"library": lib, "model": model, "hidden": hidden, "method": method}
        done = [r for r in repeats if "first_step_s" in r]
        if done:
            totals = [r["compile_graph_s"] + r["first_step_s"] for r in done]
            middle = done[sorted(range(len(done)), key=totals.__getitem__)[len(done) // 2]]
            entry.update(
                compile_graph_s=middle["compile_graph_s"],
                first_step_s=middle["first_step_s"],
                total_s=middle["compile_graph_s"] + middle["first_step_s"],
                totals_s=totals,
            )
        else:
            entry["error"] = repeats[0].get("error", "no result")
        out.append(entry)
    return out


def _lookup(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _bandwidth_for(measured: dict[str, Any], nbytes: int) -> float:
    """The bandwidth measured on the smallest copied array at least ``nbytes`` large (else the largest):
    caches make small copies faster, so the floor of a trace uses a copy of about its size."""
    by_size = {int(k): v for k, v in measured.get("bytes_per_s_by_array_bytes", {}).items()}
    if not by_size:
        return float(measured["bytes_per_s"])
    fitting = [size for size in by_size if size >= nbytes]
    return float(by_size[min(fitting) if fitting else max(by_size)])


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the peer and the traffic floor, and memory growth, with the targets."""
    bandwidth = results["bandwidth"].get("bytes_per_s")
    flops_per_s = results.get("dot_throughput", {}).get("flops_per_s")
    rows = results["step_time"]
    ratios = []
    for row in rows:
        if row["library"] != "etp" or "ms_per_step" not in row:
            continue
        entry: dict[str, Any] = {k: row[k] for k in ("model", "hidden", "method")}
        entry["etp_ms"] = row["ms_per_step"]
        peer_method = "es_d_rtrl" if row["method"] == TRACED_ONLY else row["method"]
        peer = _lookup(rows, library="peer", model=row["model"], hidden=row["hidden"], method=peer_method)
        if peer and "ms_per_step" in peer:
            entry["peer_ms"] = peer["ms_per_step"]
            entry["ratio_to_peer"] = row["ms_per_step"] / peer["ms_per_step"]
        if row["method"] == "d_rtrl" and bandwidth and "trace_bytes" in row:
            floor_ms = 1e3 * 2 * row["trace_bytes"] / _bandwidth_for(results["bandwidth"], row["trace_bytes"])
            entry["traffic_floor_ms"] = floor_ms
            entry["ratio_to_floor"] = row["ms_per_step"] / floor_ms
        if flops_per_s and row.get("flops_per_step"):
            entry["etp_mflop"] = row["flops_per_step"] / 1e6
            entry["etp_ratio_to_compute_floor"] = row["ms_per_step"] / (1e3 * row["flops_per_step"] / flops_per_s)
            if peer and peer.get("flops_per_step") and "ms_per_step" in peer:
                entry["peer_mflop"] = peer["flops_per_step"] / 1e6
                entry["peer_ratio_to_compute_floor"] = peer["ms_per_step"] / (
                    1e3 * peer["flops_per_step"] / flops_per_s
                )
        ratios.append(entry)
    memory = results["memory"]["rows"]
    growth = {}
    for method in ("bptt", "d_rtrl", "es_d_rtrl"):
        by_t = {r["T"]: r for r in memory if r["method"] == method and "xla_total_bytes" in r}
        if len(by_t) >= 2:
            first, last = by_t[min(by_t)], by_t[max(by_t)]
            growth[method] = {
                "T_first": min(by_t),
                "T_last": max(by_t),
                "xla_ratio": last["xla_total_bytes"] / first["xla_total_bytes"],
                "rss_ratio": last["peak_rss_bytes"] / first["peak_rss_bytes"],
            }
    compile_rows = results["compile_time"]
    compile_cmp = {}
    for ours in compile_rows:
        if ours["library"] != "etp" or "total_s" not in ours:
            continue
        match = {k: ours[k] for k in ("model", "hidden", "method")}
        peer = _lookup(compile_rows, library="peer", **match)
        if peer and "total_s" in peer:
            compile_cmp[f"{ours['model']} H={ours['hidden']} {ours['method']}"] = ours["total_s"] / peer["total_s"]
    targets = {
        "d_rtrl_vs_peer<=0.5": [e.get("ratio_to_peer") for e in ratios if e["method"] == "d_rtrl"],
        "es_d_rtrl_vs_peer<=0.7": [e.get("ratio_to_peer") for e in ratios if e["method"] == "es_d_rtrl"],
        # not a target: the same with gradients of the trace-carrying weights alone
        "es_d_rtrl[traced]_vs_peer": [e.get("ratio_to_peer") for e in ratios if e["method"] == TRACED_ONLY],
        "d_rtrl_vs_floor<=2": [e.get("ratio_to_floor") for e in ratios if e["method"] == "d_rtrl"],
        "online_memory_growth<=1.1": {m: g["xla_ratio"] for m, g in growth.items() if m != "bptt"},
        "compile_vs_peer<=1": compile_cmp,
    }
    support: dict[str, dict[str, list[str]]] = {}
    for row in results.get("grad_support", []):
        if "nonzero" in row:
            label = f"{row['model']} H={row['hidden']}"
            zero = [path for path in row["all"] if path not in row["nonzero"]]
            support.setdefault(label, {})[row["library"]] = [".".join(map(str, path)) for path in zero]
    return {
        "ratios": ratios,
        "memory_growth": growth,
        "compile_ratio_to_peer": compile_cmp,
        "zero_gradients_es_d_rtrl": support,
        "targets": targets,
    }


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_tables(results: dict[str, Any]) -> None:
    bandwidth = results["bandwidth"].get("bytes_per_s")
    sizes = results["bandwidth"].get("bytes_per_s_by_array_bytes", {})
    listed = ", ".join(f"{int(k) >> 20} MiB: {v / 1e9:.2f}" for k, v in sizes.items())
    print(f"\ncopy bandwidth (read + write), GB/s: {listed or _fmt(bandwidth and bandwidth / 1e9)}")
    flops = results.get("dot_throughput", {}).get("flops_per_s")
    print(f"matrix-product throughput (best of the models' shapes), GFLOP/s: {_fmt(flops and flops / 1e9)}")
    print(
        "\nms per step (median)          etp      peer   etp/peer   floor  etp/floor"
        "   MFLOP etp/peer   etp, peer / compute floor"
    )
    for e in results["summary"]["ratios"]:
        label = f"{e['model']} H={e['hidden']} {e['method']}"
        print(
            f"{label:<26}{_fmt(e['etp_ms']):>8}{_fmt(e.get('peer_ms')):>10}{_fmt(e.get('ratio_to_peer')):>10}"
            f"{_fmt(e.get('traffic_floor_ms')):>8}{_fmt(e.get('ratio_to_floor')):>10}"
            f"{_fmt(e.get('etp_mflop'), '.1f'):>8}/{_fmt(e.get('peer_mflop'), '.1f'):<8}"
            f"{_fmt(e.get('etp_ratio_to_compute_floor')):>6}, {_fmt(e.get('peer_ratio_to_compute_floor'))}"
        )
    for row in results["step_time"]:
        if "error" in row:
            print(f"  error: {row['library']} {row['model']} H={row['hidden']} {row['method']}: {row['error']}")
    print("\nstep called from Python once per time step, ms (etp/peer)")
    for row in results.get("per_step", []):
        peer = _lookup(
            results["per_step"], library="peer", model=row["model"], hidden=row["hidden"], method=row["method"]
        )
        ratio = (
            row["ms_per_step"] / peer["ms_per_step"]
            if peer and "ms_per_step" in peer and "ms_per_step" in row
            else None
        )
        label = f"{row['library']:<5} {row['model']} H={row['hidden']} {row['method']:<10} {row['jit']:<11}"
        print(
            f"  {label}{_fmt(row.get('ms_per_step')):>8}  ({_fmt(ratio)})"
            if "error" not in row
            else f"  {label} error: {row['error']}"
        )
    print("\nES_D_RTRL: parameters given a zero gradient (random inputs, a few steps)")
    for label, by_library in results["summary"]["zero_gradients_es_d_rtrl"].items():
        listed = "; ".join(f"{lib}: {', '.join(paths) or 'none'}" for lib, paths in by_library.items())
        print(f"  {label:<12} {listed}")
    print("\nmemory vs T (XLA compiled program, MB / peak RSS, MB)")
    for row in results["memory"]["rows"]:
        if "xla_total_bytes" in row:
            print(
                f"  {row['method']:<10} T={row['T']:<6}{row['xla_total_bytes'] / 1e6:>10.1f}"
                f"{row['peak_rss_bytes'] / 1e6:>10.1f}"
            )
        else:
            print(f"  {row['method']:<10} T={row['T']:<6} error: {row.get('error')}")
    print("\ncompile time (compile_graph + first jitted step, median of fresh processes), s")
    for row in results["compile_time"]:
        label = f"{row['library']:<5} {row['model']} H={row['hidden']} {row['method']:<10}"
        if "total_s" in row:
            every = ", ".join(f"{t:.2f}" for t in row["totals_s"])
            print(
                f"  {label}{row['compile_graph_s']:>7.2f} +{row['first_step_s']:>5.2f} = {row['total_s']:.2f}  ({every})"
            )
        else:
            print(f"  {label} error: {row.get('error')}")
    print("\ntargets:", json.dumps(results["summary"]["targets"], indent=1, default=lambda v: round(v, 3)))


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = [r for r in results["step_time"] if "ms_per_step" in r]
    configs = sorted({(r["model"], r["hidden"]) for r in rows})
    libraries = sorted({r["library"] for r in rows})
    fig, axes = plt.subplots(1, max(len(configs), 1), figsize=(4 * max(len(configs), 1), 3.6), squeeze=False)
    for ax, (model, hidden) in zip(axes[0], configs, strict=False):
        width = 0.8 / len(libraries)
        for i, lib in enumerate(libraries):
            values = [
                (_lookup(rows, library=lib, model=model, hidden=hidden, method=m) or {}).get("ms_per_step", 0.0)
                for m in METHODS
            ]
            ax.bar([j + i * width for j in range(len(METHODS))], values, width, label=lib)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METHODS))], METHODS, rotation=30)
        ax.set_yscale("log")
        ax.set_title(f"{model} H={hidden}")
        ax.set_ylabel("ms per step")
    axes[0][0].legend()
    fig.tight_layout()
    paths.append(out / "step_time.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method in ("bptt", "d_rtrl", "es_d_rtrl"):
        points = sorted(
            (r["T"], r["xla_total_bytes"] / 1e6)
            for r in results["memory"]["rows"]
            if r["method"] == method and "xla_total_bytes" in r
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("XLA program memory, MB")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "memory.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole pipeline")
    parser.add_argument("--no-peer", action="store_true", help="do not measure the released braintrace")
    parser.add_argument(
        "--peer-env",
        type=Path,
        default=ROOT / "results" / f"peer-venv-{peer_version()}",
        help="the peer's virtual environment (default: one per peer version)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "performance")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    peer = None if args.no_peer else _peer_python(args.peer_env)
    results = measure(args.quick, peer)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    for path in plot(results, args.out):
        print(f"wrote {path}")
    print(f"wrote {args.out / 'results.json'}")
    errors = [
        r
        for r in results["step_time"] + results["per_step"] + results["memory"]["rows"]
        if "error" in r and r.get("library") != "peer"
    ]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
