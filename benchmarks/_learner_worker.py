"""One measurement of ``learners.py`` in a fresh process; prints one ``RESULT {json}`` line.

Usage: ``python _learner_worker.py '{"kind": "registry"}'`` (the learners registered in this
installation), or ``'{"kind": "step", "model": "gru", "batch": 32, "n_in": 64, "hidden": 64,
"method": "snap", "options": {"n": 2}, "steps": 50, "repeats": 5, "budget_s": 60}'``.

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

import etp_algorithms


def _block(tree: Any) -> None:
    jax.block_until_ready(jax.tree.leaves(tree))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def registry(spec: dict[str, Any]) -> dict[str, Any]:
    """``name -> class name`` of every registered learner, with the module that defines the class."""
    learners = etp_algorithms.registered_learners()
    return {
        "learners": {name: cls.__name__ for name, cls in learners.items()},
        "modules": {name: cls.__module__ for name, cls in learners.items()},
    }


def _influence(learner: Any) -> dict[str, int]:
    """The dense influence matrix dh/dtheta that RTRL keeps and SnAp computes every step before masking."""
    from etp_algorithms._rtrl import influence_bytes

    if isinstance(learner, etp_algorithms.RTRL):
        return {"influence_bytes": int(influence_bytes(learner.context, "weights"))}
    if isinstance(learner, etp_algorithms.SnAp):
        return {"dense_influence_bytes": int(influence_bytes(learner.context, "relations"))}
    return {}


def _xla_memory(program: Any, args: tuple[Any, ...]) -> dict[str, int]:
    analysis = program.compile(*args).memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    return {name: int(getattr(analysis, name)) for name in fields}


def step(spec: dict[str, Any]) -> dict[str, Any]:
    """ms per step of the 50-step program (median of the repeats after two warm-up calls), the
    learner's trace bytes and XLA's memory analysis of the compiled program."""
    model, method, batch, n_in, hidden = spec["model"], spec["method"], spec["batch"], spec["n_in"], spec["hidden"]
    steps, repeats = spec["steps"], spec["repeats"]
    net = work.build(model, batch, n_in, hidden)
    result: dict[str, Any] = {}
    learner = None
    if method != "bptt":
        try:
            learner = etp_algorithms.registered_learners()[method](net, **spec.get("options", {}))
        except Exception as error:
            return {"status": f"constructor failed: {_first_line(error)}"}
        start = time.perf_counter()
        try:
            learner.compile_graph(jnp.zeros((batch, n_in)))
        except Exception as error:
            return {"status": f"compile failed: {_first_line(error)}"}
        result["compile_graph_s"] = time.perf_counter() - start
        result["trace_bytes"] = learner.trace_bytes()
        result.update(_influence(learner))
    program, args, _ = work.make_program(method, net, batch, n_in, steps, online_inputs=False, learner=learner)
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
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(program(*args))
        times.append(time.perf_counter() - start)
    result["repeats"] = repeats
    result["ms_per_step"] = 1e3 * statistics.median(times) / steps
    result["ms_per_step_min"] = 1e3 * min(times) / steps
    result.update(_xla_memory(program, args))
    result["status"] = "ok"
    return result


KINDS = {"registry": registry, "step": step}


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    spec = json.loads(sys.argv[1])
    try:
        output = KINDS[spec["kind"]](spec)
    except Exception as error:  # a failure this worker did not foresee: a row, with the traceback on stderr
        traceback.print_exc()
        output = {"status": f"worker failed: {_first_line(error)}"}
    print("RESULT " + json.dumps(output), flush=True)
