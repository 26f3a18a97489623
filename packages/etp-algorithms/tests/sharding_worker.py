"""Run by test_sharding.py in a fresh process with several host devices (XLA_FLAGS set before jax loads).

``python sharding_worker.py CHECK [ARGS...]``; prints one JSON line ``RESULT {...}`` at the end.

Checks: ``equal MODEL ALGO DTYPE`` (sharded etrace_grad and a jitted step against the unsharded learner,
shardings after the calls, collectives of the compiled programs), ``errors``, ``process ID NPROC PORT``
(one process of a jax.distributed run; ``single`` the same online steps in one process).
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from typing import Any

if len(sys.argv) > 1 and sys.argv[1] == "process":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
else:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import brainstate  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import saiunit as u  # noqa: E402

import etp_nn  # noqa: E402
from etp_algorithms import D_RTRL, ES_D_RTRL, ETraceAlgorithm, shard, shard_batch, trace_bytes_per_device  # noqa: E402  # noqa: E402

B, I, H, O, T = 8, 3, 6, 2, 5
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


class GRUNet(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = etp_nn.GRUCell(I, H)
        self.out = etp_nn.Linear(H, O)

    def update(self, x: Any) -> Any:
        return self.out(self.rnn(x))


class SNN(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = etp_nn.Linear(I, H)
        self.lif = etp_nn.LIF(H, tau=4.0 * u.ms, V_th=0.5 * u.mV)
        self.out = etp_nn.LeakyRateReadout(H, O, tau=3.0 * u.ms)

    def update(self, x: Any) -> Any:
        return self.out(self.lif(self.inp(x) * u.mV))


def build(model: str, algo: str, seed: int = 7) -> tuple[Any, ETraceAlgorithm]:
    brainstate.random.seed(seed)
    net = GRUNet() if model == "gru" else SNN()
    brainstate.nn.init_all_states(net, batch_size=B)
    learner: ETraceAlgorithm = D_RTRL(net) if algo == "d_rtrl" else ES_D_RTRL(net, 0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(jnp.zeros((B, I)))
    return net, learner


def data(seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = 3.0  # strong enough input for the LIF neurons to spike
    return scale * rng.normal(size=(T, B, I)), rng.normal(size=(T, B, O))


def loss_fn(learner: Any) -> Any:
    def step_loss(x: Any, y: Any) -> Any:
        return jnp.mean((learner(x) - y) ** 2)  # mean over the batch: the cross-device reduction

    return step_loss


def host(tree: Any) -> Any:
    return jax.tree.map(lambda a: np.asarray(a, dtype=np.float64), tree)


def rel(a: Any, b: Any) -> float:
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(1.0, float(np.max(np.abs(y))))))
    return worst


def collectives(hlo: str) -> list[tuple[str, str]]:
    """``(opcode, result shape)`` of every collective instruction of a compiled HLO module's text."""
    found = []
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z\-]+)\(", line)
        if match and match.group(2).removesuffix("-start") in COLLECTIVES:
            found.append((match.group(2), match.group(1)))
    return found


def sizes(shape_text: str) -> list[int]:
    """Element counts of the arrays of an HLO result shape (``f64[2,19,16]{...}`` or a tuple of them)."""
    return [
        int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for dims in re.findall(r"\[([\d,]*)\]", shape_text)
    ]


def specs(tree: Any) -> list[str]:
    return [str(tuple(leaf.sharding.spec)) for leaf in jax.tree.leaves(tree)]


def run(learner: Any, net: Any, xs: Any, ys: Any) -> dict[str, Any]:
    """etrace_grad over the sequence, then one jitted online step: gradients, losses, final states."""
    step_loss = loss_fn(learner)
    grads, losses = learner.etrace_grad(xs, ys, step_fn=step_loss, return_value=True)
    params = learner.param_states

    @brainstate.transform.jit
    def one_step(x: Any, y: Any) -> Any:
        return brainstate.transform.grad(step_loss, params, return_value=True)(x, y)

    g_step, l_step = one_step(xs[0], ys[0])
    return {
        "grads": grads,
        "losses": losses,
        "g_step": g_step,
        "l_step": l_step,
        "states": {".".join(map(str, p)): s.value for p, s in net.states().items()},
        "traces": learner.etrace.value,
        "one_step": one_step,
    }


def check_equal(model: str, algo: str, dtype: str) -> dict[str, Any]:
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
        brainstate.environ.set(precision=64)
    xs_np, ys_np = data()
    with brainstate.environ.context(dt=1.0 * u.ms):
        net0, ref_learner = build(model, algo)
        ref = run(ref_learner, net0, jnp.asarray(xs_np), jnp.asarray(ys_np))
        net, learner = build(model, algo)
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        placed = shard(learner, mesh, "data")
        xs, ys = shard_batch(xs_np, mesh, "data"), shard_batch(ys_np, mesh, "data")
        got = run(learner, net, xs, ys)
        # the compiled programs: collectives, and which arrays they move
        step_loss = loss_fn(learner)

        @brainstate.transform.jit
        def sequence(xs: Any, ys: Any) -> Any:
            return learner.etrace_grad(xs, ys, step_fn=step_loss)

        hlo = {
            "sequence": sequence.lower(xs, ys).compile().as_text(),
            "step": got["one_step"].lower(xs[0], ys[0]).compile().as_text(),
        }
    trace_shapes = [tuple(leaf.shape) for leaf in jax.tree.leaves(learner.etrace.value)]
    return {
        "devices": len(jax.devices()),
        "dtype": str(jax.tree.leaves(got["grads"])[0].dtype),
        "errors": {key: rel(got[key], ref[key]) for key in ("grads", "losses", "g_step", "l_step", "states", "traces")},
        "grad_norm": float(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(ref["grads"]))),
        "trace_specs": specs(learner.etrace.value),
        "trace_shapes": trace_shapes,
        "trace_nbytes": [int(leaf.nbytes) for leaf in jax.tree.leaves(learner.etrace.value)],
        "state_specs": {k: specs(v) for k, v in got["states"].items()},
        "state_shapes": {k: [list(np.shape(a)) for a in jax.tree.leaves(v)] for k, v in got["states"].items()},
        "grad_specs": specs(got["grads"]) + specs(got["g_step"]),
        "sharded": list(placed.sharded),
        "replicated": list(placed.replicated),
        "per_device": {str(k): v for k, v in trace_bytes_per_device(learner).items()},
        "trace_bytes": learner.trace_bytes(),
        "collectives": {name: collectives(text) for name, text in hlo.items()},
        "min_trace_elements": min(int(np.prod(s)) for s in trace_shapes),
    }


def check_errors() -> dict[str, Any]:
    out: dict[str, Any] = {}
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    brainstate.random.seed(0)
    net = GRUNet()
    brainstate.nn.init_all_states(net, batch_size=6)
    learner = D_RTRL(net)
    for name, call in (
        ("uncompiled", lambda: shard(learner, mesh, "data")),
        ("not_a_learner", lambda: shard(net, mesh, "data")),
    ):
        try:
            call()
        except Exception as error:
            out[name] = [type(error).__name__, str(error)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(jnp.zeros((6, I)))
    before = [np.asarray(leaf).copy() for leaf in jax.tree.leaves(learner.etrace.value)]
    for name, call in (
        ("indivisible", lambda: shard(learner, mesh, "data")),
        ("unknown_axis", lambda: shard(learner, mesh, "batch")),
        ("batch_size_mismatch", lambda: shard(learner, mesh, "data", batch_size=4)),
        ("input_indivisible", lambda: shard_batch(np.zeros((5, 6, 3)), mesh, "data")),
        ("input_unknown_axis", lambda: shard_batch(np.zeros((5, 8, 3)), mesh, "model")),
        ("input_no_axis", lambda: shard_batch(np.zeros((5,)), mesh, "data")),
    ):
        try:
            call()
        except Exception as error:
            out[name] = [type(error).__name__, str(error)]
    out["unchanged"] = all(
        np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(learner.etrace.value), strict=True)
    )
    # an unbatched learner: no leading batch axis to split
    brainstate.random.seed(0)
    cell = etp_nn.GRUCell(I, 4)
    brainstate.nn.init_all_states(cell)
    single = D_RTRL(cell)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single.compile_graph(jnp.zeros(I))
    try:
        shard(single, mesh, "data")
    except Exception as error:
        out["unbatched"] = [type(error).__name__, str(error)]
    return out


def online(learner: Any, net: Any, xs: Any, ys: Any, steps: int = 3, lr: float = 0.1) -> list[Any]:
    """A few online steps with a plain SGD update (the user's optimizer): gradients and losses per step."""
    step_loss = loss_fn(learner)
    params = learner.param_states

    @brainstate.transform.jit
    def train(x: Any, y: Any) -> Any:
        grads, loss = brainstate.transform.grad(step_loss, params, return_value=True)(x, y)
        for path, state in params.items():
            state.value = jax.tree.map(lambda p, g: p - lr * g, state.value, grads[path])
        return grads, loss

    out = []
    for t in range(steps):
        grads, loss = train(xs[t], ys[t])
        out.append(host((grads, loss)))
    out.append(host({".".join(map(str, p)): s.value for p, s in params.items()}))
    return out


def check_process(pid: int, nproc: int, port: int) -> dict[str, Any]:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid, initialization_timeout=60
    )
    jax.config.update("jax_enable_x64", True)
    brainstate.environ.set(precision=64)
    net, learner = build("gru", "d_rtrl")
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    shard(learner, mesh, "data")
    xs_np, ys_np = data()
    xs, ys = shard_batch(xs_np, mesh, "data"), shard_batch(ys_np, mesh, "data")
    result = online(learner, net, xs, ys)
    local = {str(d.id) for d in jax.local_devices()}
    return {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": len(jax.devices()),
        "local_devices": sorted(local),
        "trace_local_devices": sorted(
            {str(p.device.id) for leaf in jax.tree.leaves(learner.etrace.value) for p in leaf.addressable_shards}
        ),
        "trace_specs": specs(learner.etrace.value),
        "result": [np.asarray(a).tolist() for a in jax.tree.leaves(result)],
    }


def check_single() -> dict[str, Any]:
    jax.config.update("jax_enable_x64", True)
    brainstate.environ.set(precision=64)
    net, learner = build("gru", "d_rtrl")
    xs_np, ys_np = data()
    result = online(learner, net, jnp.asarray(xs_np), jnp.asarray(ys_np))
    return {"devices": len(jax.devices()), "result": [np.asarray(a).tolist() for a in jax.tree.leaves(result)]}


def main() -> None:
    check, args = sys.argv[1], sys.argv[2:]
    if check == "equal":
        result = check_equal(*args)
    elif check == "errors":
        result = check_errors()
    elif check == "process":
        result = check_process(int(args[0]), int(args[1]), int(args[2]))
    elif check == "single":
        result = check_single()
    else:
        raise SystemExit(f"unknown check {check!r}")
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
