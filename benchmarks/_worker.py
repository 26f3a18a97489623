"""One benchmark measurement in a fresh process; prints one JSON line.

Usage: ``python _worker.py '{"kind": "step_time", "model": "gru", ...}'``. Run by
``performance.py`` with the project's interpreter or with the peer environment's one; it
imports only ``braintrace``, ``brainstate``, ``jax`` and ``saiunit`` (see ``_workloads.py``).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import warnings
from typing import Any

import _workloads as work
import brainstate
import jax
import jax.numpy as jnp

import braintrace


def _block(tree: Any) -> None:
    jax.block_until_ready(jax.tree.leaves(tree))


def _compile_learner(learner: Any, batch: int, n_in: int) -> float:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(jnp.zeros((batch, n_in)))
    return time.perf_counter() - start


def _trace_bytes(learner: Any) -> int:
    leaves = [s.value for s in learner.states(braintrace.EligibilityTrace).values()]
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(leaves)))


def _traced_param_paths(learner: Any) -> list[list[Any]]:
    """The parameters whose gradient the learner carries in eligibility traces (this project's graph API)."""
    paths = {
        state_path
        for relation in learner.graph.hidden_param_op_relations
        for leaves in relation.trainable_paths.values()
        for state_path, _ in leaves
    }
    return [list(path) for path in sorted(paths, key=str)]


def step_time(spec: dict[str, Any]) -> dict[str, Any]:
    """ms per step of one program. ``spec["gradients"] == "traced"`` (online learners, this project only)
    takes the gradient of the trace-carrying parameters alone."""
    model, method, batch, n_in, hidden = spec["model"], spec["method"], spec["batch"], spec["n_in"], spec["hidden"]
    steps, repeats = spec["steps"], spec["repeats"]
    net = work.build(model, batch, n_in, hidden)
    result: dict[str, Any] = {}
    learner, param_paths = None, None
    if method in ("d_rtrl", "es_d_rtrl"):
        learner = work.make_learner(method, net)
        result["compile_graph_s"] = _compile_learner(learner, batch, n_in)
        result["trace_bytes"] = _trace_bytes(learner)
        if spec.get("gradients") == "traced":
            param_paths = result["param_paths"] = _traced_param_paths(learner)
    program, args, _ = work.make_program(
        method, net, batch, n_in, steps, online_inputs=False, learner=learner, param_paths=param_paths
    )
    start = time.perf_counter()
    _block(program(*args))
    result["first_call_s"] = time.perf_counter() - start
    # a second warm-up call: the peer's program (0.2.6 and 0.2.8) compiles again on its second call,
    # which is not a step's cost (with one warm-up it is a repeat: --quick's median of 2 showed it)
    start = time.perf_counter()
    _block(program(*args))
    result["second_call_s"] = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(program(*args))
        times.append(time.perf_counter() - start)
    result["ms_per_step"] = 1e3 * statistics.median(times) / steps
    result["ms_per_step_min"] = 1e3 * min(times) / steps
    # XLA's cost analysis counts a loop body once: the program's flops are those of one step
    cost = program.compile(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    result["flops_per_step"] = float(cost.get("flops", 0.0))
    return result


def per_step(spec: dict[str, Any]) -> dict[str, Any]:
    """ms per step of a training step called from Python once per time step (the inputs sliced
    beforehand): jitted with ``brainstate.transform.jit``, or (``spec["jit"] == "in_place"``, this
    project only) with ``braintrace.jit_in_place``, which donates the written states' buffers."""
    model, method, batch, n_in, hidden = spec["model"], spec["method"], spec["batch"], spec["n_in"], spec["hidden"]
    steps, repeats = spec["steps"], spec["repeats"]
    net = work.build(model, batch, n_in, hidden)
    learner = work.make_learner(method, net)
    _compile_learner(learner, batch, n_in)
    params = net.states(brainstate.ParamState)
    jit = braintrace.jit_in_place if spec.get("jit") == "in_place" else brainstate.transform.jit

    @jit
    def step(x: Any, y: Any) -> Any:
        return brainstate.transform.grad(lambda x, y: jnp.mean((learner(x) - y) ** 2), params)(x, y)

    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    xs = list(jax.random.normal(kx, (steps, batch, n_in)))
    ys = list(jax.random.normal(ky, (steps, batch, work.N_OUT)))
    for _ in range(2):  # two warm-up calls, as in step_time (the peer compiles again on its second)
        _block(step(xs[0], ys[0]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x, y in zip(xs, ys, strict=True):
            grads = step(x, y)
        _block(grads)
        times.append(time.perf_counter() - start)
    return {"ms_per_step": 1e3 * statistics.median(times) / steps}


def grad_support(spec: dict[str, Any]) -> dict[str, Any]:
    """The parameters to which the learner returns a nonzero gradient, summed over a few steps of
    random inputs (state paths; the same in both libraries for the benchmark's models)."""
    model, method, batch, n_in, hidden = spec["model"], spec["method"], spec["batch"], spec["n_in"], spec["hidden"]
    net = work.build(model, batch, n_in, hidden)
    learner = work.make_learner(method, net)
    _compile_learner(learner, batch, n_in)
    params = net.states(brainstate.ParamState)
    grad = brainstate.transform.jit(brainstate.transform.grad(lambda x, y: jnp.mean((learner(x) - y) ** 2), params))
    magnitude = {path: 0.0 for path in params}
    key = jax.random.PRNGKey(1)
    for _ in range(spec.get("steps", 5)):
        key, kx, ky = jax.random.split(key, 3)
        # inputs large enough that the spiking model spikes
        grads = grad(4.0 * jax.random.normal(kx, (batch, n_in)), jax.random.normal(ky, (batch, work.N_OUT)))
        for path, value in grads.items():
            magnitude[path] += float(sum(jnp.sum(jnp.abs(leaf)) for leaf in jax.tree.leaves(value)))
    nonzero = sorted((path for path, total in magnitude.items() if total > 0), key=str)
    return {"nonzero": [list(path) for path in nonzero], "all": [list(path) for path in sorted(params, key=str)]}


def compile_time(spec: dict[str, Any]) -> dict[str, Any]:
    """``compile_graph`` and the first jitted single-step gradient (trace, XLA compile, run)."""
    model, method, batch, n_in, hidden = spec["model"], spec["method"], spec["batch"], spec["n_in"], spec["hidden"]
    net = work.build(model, batch, n_in, hidden)
    learner = work.make_learner(method, net)
    compile_graph_s = _compile_learner(learner, batch, n_in)
    params = net.states(brainstate.ParamState)
    x, y = jnp.ones((batch, n_in)), jnp.zeros((batch, work.N_OUT))

    @brainstate.transform.jit
    def one_step(x: Any, y: Any) -> Any:
        return brainstate.transform.grad(lambda x, y: jnp.mean((learner(x) - y) ** 2), params)(x, y)

    start = time.perf_counter()
    _block(one_step(x, y))
    first_step_s = time.perf_counter() - start
    return {"compile_graph_s": compile_graph_s, "first_step_s": first_step_s}


def memory(spec: dict[str, Any]) -> dict[str, Any]:
    """XLA's memory analysis of the whole-sequence program (inputs drawn inside), then one run for peak RSS."""
    model, method, batch, n_in, hidden = spec["model"], spec["method"], spec["batch"], spec["n_in"], spec["hidden"]
    net = work.build(model, batch, n_in, hidden)
    program, args, learner = work.make_program(method, net, batch, n_in, spec["steps"], online_inputs=True)
    if learner is not None:
        _compile_learner(learner, batch, n_in)
    analysis = program.compile(*args).memory_analysis()
    _block(program(*args))
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    result = {name: int(getattr(analysis, name)) for name in fields}
    result["xla_total_bytes"] = (
        result["argument_size_in_bytes"]
        + result["output_size_in_bytes"]
        + result["temp_size_in_bytes"]
        - result["alias_size_in_bytes"]
    )
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def copy_bandwidth(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory bandwidth: bytes read + written per second by a jitted scaled copy, the best over sizes
    from ``spec["bytes"] / 16`` to ``spec["bytes"]`` (larger than the caches)."""
    scale = jax.jit(lambda x: x * 1.0001)
    per_size = {}
    for size in (spec["bytes"] // 16, spec["bytes"] // 4, spec["bytes"]):
        x = jnp.ones((size // 4,), jnp.float32)
        _block(scale(x))
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            _block(scale(x))
            times.append(time.perf_counter() - start)
        per_size[int(x.nbytes)] = 2 * x.nbytes / min(times)
    return {"bytes_per_s": max(per_size.values()), "bytes_per_s_by_array_bytes": per_size}


def dot_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """Flops per second of jitted matrix products ``(M, K) @ (K, N)`` for each shape in ``spec["shapes"]``
    (the best of the repeats), and the best over the shapes."""
    per_shape = {}
    for m, k, n in spec["shapes"]:
        a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        product = jax.jit(lambda a, b: a @ b)
        _block(product(a, b))
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            _block(product(a, b))
            times.append(time.perf_counter() - start)
        per_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / min(times)
    return {"flops_per_s": max(per_shape.values()), "flops_per_s_by_shape": per_shape}


def _xla_memory(program: Any, args: tuple[Any, ...]) -> dict[str, int]:
    """XLA's memory analysis of a jitted program for ``args`` (arguments + outputs + temporaries - aliased)."""
    analysis = program.compile(*args).memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    result = {name: int(getattr(analysis, name)) for name in fields}
    result["xla_total_bytes"] = (
        result["argument_size_in_bytes"]
        + result["output_size_in_bytes"]
        + result["temp_size_in_bytes"]
        - result["alias_size_in_bytes"]
    )
    return result


def _sequence_setup(spec: dict[str, Any]) -> tuple[Any, Any, tuple[Any, Any]]:
    model, method, batch, n_in, hidden = spec["model"], spec["method"], spec["batch"], spec["n_in"], spec["hidden"]
    net = work.build(model, batch, n_in, hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = work.compile_learner(method, net, batch, n_in, vjp_method=spec.get("vjp_method"))
    return net, learner, work.sequence_data(spec["steps"], batch, n_in)


def sequence_grad(spec: dict[str, Any]) -> dict[str, Any]:
    """ms per whole sequence of ``spec["program"]`` (see ``_workloads.make_sequence_program``): two
    warm-up calls, then the median of the repeats; XLA's memory analysis of its compiled program.
    ``spec["jit"] == "in_place"`` (this project only) jits it with ``braintrace.jit_in_place``."""
    net, learner, args = _sequence_setup(spec)
    if not hasattr(learner, "etrace_grad") and spec["program"] != "hand_loop":
        return {"unavailable": f"braintrace {getattr(braintrace, '__version__', '?')} has no etrace_grad"}
    in_place = spec.get("jit") == "in_place"
    chunk_size = spec.get("chunk_size")
    program = work.make_sequence_program(
        spec["program"], learner, net, jit=braintrace.jit_in_place if in_place else None, chunk_size=chunk_size
    )
    result: dict[str, Any] = {"trace_bytes": _trace_bytes(learner)}
    for name in ("first_call_s", "second_call_s"):  # the peer's jitted programs compile again on the second call
        start = time.perf_counter()
        _block(program(*args))
        result[name] = time.perf_counter() - start
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        _block(program(*args))
        times.append(time.perf_counter() - start)
    result["ms_per_sequence"] = 1e3 * statistics.median(times)
    result["ms_per_sequence_min"] = 1e3 * min(times)
    result["ms_per_sequence_all"] = [1e3 * t for t in times]
    if spec["program"] != "etrace_grad_direct":
        # jit_in_place has no .compile: the memory of the same function under brainstate's jit
        # (donation changes only what is aliased)
        same = (
            program
            if not in_place
            else work.make_sequence_program(spec["program"], learner, net, chunk_size=chunk_size)
        )
        result["memory"] = _xla_memory(same, args)
    return result


def sequence_grad_check(spec: dict[str, Any]) -> dict[str, Any]:
    """The summed gradients of ``etrace_grad`` and of the hand loop, each from a freshly built
    model and learner (the same seed, the same data): their largest relative difference per leaf
    (``||a - b|| / ||b||``) and the largest gradient norm."""
    grads = {}
    for program in ("etrace_grad", "hand_loop"):
        net, learner, args = _sequence_setup(spec)
        if not hasattr(learner, "etrace_grad"):
            return {"unavailable": f"braintrace {getattr(braintrace, '__version__', '?')} has no etrace_grad"}
        grads[program] = work.make_sequence_program(program, learner, net)(*args)
    errors, norms = {}, {}
    for path, value in grads["hand_loop"].items():
        ours = jax.tree.leaves(grads["etrace_grad"][path])
        for (leaf_path, b), a in zip(jax.tree_util.tree_leaves_with_path(value), ours, strict=True):
            norm_b = float(jnp.linalg.norm(b.ravel()))
            diff = float(jnp.linalg.norm((a - b).ravel()))
            key = ".".join(map(str, path)) + jax.tree_util.keystr(leaf_path)
            errors[key] = diff / norm_b if norm_b > 0 else diff
            norms[key] = norm_b
    return {"rel_error": errors, "max_rel_error": max(errors.values()), "grad_norm": norms}


KINDS = {
    "step_time": step_time,
    "compile_time": compile_time,
    "grad_support": grad_support,
    "per_step": per_step,
    "memory": memory,
    "copy_bandwidth": copy_bandwidth,
    "dot_throughput": dot_throughput,
    "sequence_grad": sequence_grad,
    "sequence_grad_check": sequence_grad_check,
}


if __name__ == "__main__":
    # one spec, or a list of specs run one after the other in this process (the --quick mode)
    given = json.loads(sys.argv[1])
    warnings.simplefilter("ignore")
    for spec in given if isinstance(given, list) else [given]:
        output = KINDS[spec["kind"]](spec)
        output["library_version"] = getattr(braintrace, "__version__", "unknown")
        print("RESULT " + json.dumps(output), flush=True)
