"""One measurement of ``learners.py`` in a fresh process; prints one ``RESULT {json}`` line.

Usage: ``python _learner_worker.py '{"kind": "registry"}'`` (the learners registered in this
installation), or ``'{"kind": "step", "model": "gru", "batch": 32, "n_in": 64, "hidden": 64,
"method": "snap", "options": {"n": 2}, "steps": 50, "repeats": 5, "budget_s": 60}'``.
With ``"library": "peer"`` (run by the peer environment's interpreter, ``peer_learners.py``) the
learner is the released braintrace's class of :data:`PEER_CLASSES`; this module then imports
only ``braintrace``, ``brainstate``, ``jax`` and ``saiunit``.

``method`` is ``"bptt"`` (``jax.grad`` through the loop, ``_workloads.make_program``) or the name
of a registered learner, built as ``registered_learners()[method](net, **options)`` and compiled
for the workload; its program is ``_workloads.make_program``'s online one: a ``scan`` over the
steps, each step's gradient through the learner, summed. A learner whose constructor, compile or
first run raises gives ``{"status": "<stage> failed: <first line of the message>"}``, not a crash.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
import warnings
from typing import Any

import _workloads as work
import jax
import jax.numpy as jnp
from _worker import _trace_bytes, _xla_memory

import braintrace

#: The released braintrace's class for each learner both libraries have (our registered name ->
#: the peer's public name).
PEER_CLASSES = {
    "d_rtrl": "D_RTRL",
    "es_d_rtrl": "ES_D_RTRL",
    "snap": "SnAp",
    "uoro": "UORO",
    "eprop": "EProp",
    "ostl_recurrent": "OSTLRecurrent",
    "ostl_feedforward": "OSTLFeedforward",
    "three_factor": "ThreeFactor",
}

#: The constructor options both libraries get in ``peer_learners.py`` (the rest are each library's defaults;
#: ``unit_modulator``: a modulator of ones on every hidden state, which the peer's ThreeFactor requires).
PEER_OPTIONS: dict[str, dict[str, Any]] = {
    "es_d_rtrl": {"decay_or_rank": 0.9},
    "snap": {"n": 2},
    "uoro": {"projection_key": 0},
    "three_factor": {"unit_modulator": True},
}


def _block(tree: Any) -> None:
    jax.block_until_ready(jax.tree.leaves(tree))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def registry(spec: dict[str, Any]) -> dict[str, Any]:
    """``name -> class name`` of every registered learner, with the module that defines the class."""
    import etp_algorithms

    learners = etp_algorithms.registered_learners()
    return {
        "learners": {name: cls.__name__ for name, cls in learners.items()},
        "modules": {name: cls.__module__ for name, cls in learners.items()},
    }


def _influence(learner: Any) -> dict[str, int]:
    """The dense influence matrix dh/dtheta that RTRL keeps and SnAp computes every step before masking."""
    import etp_algorithms
    from etp_algorithms._rtrl import influence_bytes

    if isinstance(learner, etp_algorithms.RTRL):
        return {"influence_bytes": int(influence_bytes(learner.context, "weights"))}
    if isinstance(learner, etp_algorithms.SnAp):
        return {"dense_influence_bytes": int(influence_bytes(learner.context, "relations"))}
    return {}


def _build(spec: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """``(net, learner or None for BPTT, result so far)``: the learner built and its graph compiled,
    with its trace bytes; or ``(net, None, {"status": ...})`` naming the stage that failed."""
    model, method, batch, n_in, hidden = spec["model"], spec["method"], spec["batch"], spec["n_in"], spec["hidden"]
    net = work.build(model, batch, n_in, hidden)
    result: dict[str, Any] = {}
    if method == "bptt":
        return net, None, result
    peer = spec.get("library", "etp") == "peer"
    try:
        if peer:
            cls = getattr(braintrace, PEER_CLASSES[method])
        else:
            import etp_algorithms

            cls = etp_algorithms.registered_learners()[method]
        options = dict(spec.get("options", {}))
        unit_modulator = options.pop("unit_modulator", False)
        if unit_modulator and not peer:
            # ours takes a function of (output, new hidden values) giving each state's modulator
            options["modulator"] = lambda out, hidden: {p: jnp.ones_like(v) for p, v in hidden.items()}
        learner = cls(net, **options)
        if unit_modulator and peer:
            learner.modulator = 1.0  # the peer's standing modulator, broadcast to every hidden group
    except Exception as error:
        return net, None, {"status": f"constructor failed: {_first_line(error)}"}
    start = time.perf_counter()
    try:
        learner.compile_graph(jnp.zeros((batch, n_in)))
    except Exception as error:
        return net, None, {"status": f"compile failed: {_first_line(error)}"}
    result["compile_graph_s"] = time.perf_counter() - start
    if peer:
        result["trace_bytes"] = _trace_bytes(learner)
    else:
        result["trace_bytes"] = learner.trace_bytes()
        result.update(_influence(learner))
    return net, learner, result


def cost(spec: dict[str, Any]) -> dict[str, Any]:
    """XLA's cost analysis of one step of the learner's program (the loop body is counted once):
    floating-point operations and bytes accessed."""
    net, learner, result = _build(spec)
    if "status" in result:
        return result
    program, args, _ = work.make_program(
        spec["method"],
        net,
        spec["batch"],
        spec["n_in"],
        spec["steps"],
        online_inputs=False,
        learner=learner,
        param_paths=_kept_params(net, spec),
    )
    analysis = program.compile(*args).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return {
        **result,
        "flops_per_step": float(analysis.get("flops", 0.0)),
        "bytes_per_step": float(analysis.get("bytes accessed", 0.0)),
        "status": "ok",
    }


def _kept_params(net: Any, spec: dict[str, Any]) -> list[tuple[Any, ...]] | None:
    """The parameters to differentiate: all, or all but ``spec["exclude"]`` (state paths as lists)."""
    if not spec.get("exclude"):
        return None
    import brainstate

    excluded = {tuple(path) for path in spec["exclude"]}
    paths = list(net.states(brainstate.ParamState))
    missing = excluded - set(paths)
    if missing:
        raise ValueError(f"exclude names parameters the model does not have: {sorted(missing)}; it has {paths}")
    return [path for path in paths if path not in excluded]


def step(spec: dict[str, Any]) -> dict[str, Any]:
    """ms per step of the 50-step program (median of the repeats after two warm-up calls), the
    learner's trace bytes and XLA's memory analysis of the compiled program. ``spec["exclude"]``: state
    paths of parameters whose gradient the program leaves out (the peer's zero gradients: equal work)."""
    method, batch, n_in = spec["method"], spec["batch"], spec["n_in"]
    steps, repeats = spec["steps"], spec["repeats"]
    net, learner, result = _build(spec)
    if "status" in result:
        return result
    program, args, _ = work.make_program(
        method, net, batch, n_in, steps, online_inputs=False, learner=learner, param_paths=_kept_params(net, spec)
    )
    try:
        # compile ahead of time, timed by stage: "first call less a timed call" is the difference of two
        # long times for a learner that takes seconds per step, and drowns its compile time in their spread
        start = time.perf_counter()
        lowered = program.lower(*args)
        result["lower_s"] = time.perf_counter() - start
        start = time.perf_counter()
        lowered.compile()
        result["xla_compile_s"] = time.perf_counter() - start
    except Exception as error:
        return {**result, "status": f"run failed: {_first_line(error)}"}
    try:
        for name in ("first_call_s", "second_call_s"):  # trace + XLA compile, then a warm call
            start = time.perf_counter()
            _block(program(*args))
            result[name] = time.perf_counter() - start
    except Exception as error:
        return {**result, "status": f"run failed: {_first_line(error)}"}
    # a learner too slow for the repeats within the budget gets fewer (recorded)
    budget = spec.get("budget_s")
    if budget is not None:
        repeats = max(1, min(repeats, int(budget / max(result["second_call_s"], 1e-9))))
    # a fast program repeats until the timed calls add up to min_time_s (at most 50): the median of 5 calls
    # of ~10 ms moved by 2x between runs on a 2-core machine
    min_time = spec.get("min_time_s", 0.0)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < 50):
        start = time.perf_counter()
        _block(program(*args))
        times.append(time.perf_counter() - start)
    repeats = len(times)
    result["repeats"] = repeats
    result["ms_per_step"] = 1e3 * statistics.median(times) / steps
    result["ms_per_step_min"] = 1e3 * min(times) / steps
    # compile + first step: the graph, tracing the program, XLA's compile, and one step at the measured speed
    result["compile_s"] = (
        result.get("compile_graph_s", 0.0) + result["lower_s"] + result["xla_compile_s"] + min(times) / steps
    )
    result.update(_xla_memory(program, args))
    result["status"] = "ok"
    return result


def memory(spec: dict[str, Any]) -> dict[str, Any]:
    """XLA's memory of the learner's program (arguments + outputs + temporaries - aliased) for each
    sequence length of ``spec["lengths"]``, the inputs drawn inside the loop (compile only): an online
    learner's is flat in T."""
    net, learner, result = _build(spec)
    if "status" in result:
        return result
    totals = {}
    for steps in spec["lengths"]:
        program, args, _ = work.make_program(
            spec["method"], net, spec["batch"], spec["n_in"], steps, online_inputs=True, learner=learner
        )
        totals[str(steps)] = _xla_memory(program, args)["xla_total_bytes"]
    return {**result, "xla_bytes_by_length": totals, "status": "ok"}


KINDS = {"registry": registry, "step": step, "cost": cost, "memory": memory}


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    spec = json.loads(sys.argv[1])
    try:
        output = KINDS[spec["kind"]](spec)
    except Exception as error:  # a failure this worker did not foresee: a row, with the traceback on stderr
        traceback.print_exc()
        output = {"status": f"worker failed: {_first_line(error)}"}
    print("RESULT " + json.dumps(output), flush=True)
