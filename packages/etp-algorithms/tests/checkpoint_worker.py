"""The fresh processes of test_checkpoint: an online run, checkpointed and resumed in another process.

``python checkpoint_worker.py first DTYPE DIR``: for every configuration (D_RTRL / ES_D_RTRL on a
GRU / a LIF network), train k steps, record them (``at_k.npz``), save a checkpoint (``ckpt/``,
step k) and go on, uninterrupted, to step N (``full.npz``).

``python checkpoint_worker.py resume DTYPE DIR``: build each learner again from ANOTHER
initialisation (``fresh.npz``), restore the checkpoint (``restored.npz``), train the remaining N - k steps
(``resumed.npz``). Every ``.npz`` holds every state of the learner's module tree and the Adam
state (the ``extra``), leaf by leaf.

``python checkpoint_worker.py sharded float64 DIR`` (with 2 host devices): a checkpoint of a
learner split over the devices (:func:`etp_algorithms.shard`) restored into a split learner and
into an unsplit one keeps each target's placement.

Training: one online step = the learner's step, the gradient of that step's squared error with
respect to every parameter through the learner, and an Adam update written out here.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import brainstate
import jax
import numpy as np
import saiunit as u

PHASE, DTYPE, ROOT = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if DTYPE == "float64":
    jax.config.update("jax_enable_x64", True)
brainstate.environ.set(precision=64 if DTYPE == "float64" else 32, dt=1.0 * u.ms)

import jax.numpy as jnp  # noqa: E402

import etp_nn  # noqa: E402
from etp_algorithms import D_RTRL, ES_D_RTRL, ETraceAlgorithm  # noqa: E402
from etp_algorithms._checkpoint import restore_checkpoint, save_checkpoint  # noqa: E402

N, K, B, I, H = 6, 3, 2, 3, 4
CONFIGS = [(learner, model) for learner in ("D_RTRL", "ES_D_RTRL") for model in ("gru", "lif")]


class SNN(brainstate.nn.Module):
    """Linear -> etp_nn.LIF with recurrent spikes -> leaky rate readout."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = etp_nn.Linear(I, H, w_init=brainstate.nn.init.KaimingNormal(3.0))
        self.rec = etp_nn.Linear(H, H, b_init=None)
        self.lif = etp_nn.LIF(H, tau=4.0 * u.ms, V_th=0.5 * u.mV)
        self.out = etp_nn.LeakyRateReadout(H, 2, tau=3.0 * u.ms)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.spikes = brainstate.HiddenState(jnp.zeros((batch_size or 1, H)))

    def update(self, x: Any) -> Any:
        self.spikes.value = self.lif((self.inp(x) + self.rec(self.spikes.value)) * u.mV)
        return self.out(self.spikes.value)


def build(learner_name: str, kind: str, seed: int) -> tuple[ETraceAlgorithm, dict[str, Any]]:
    """A compiled learner on a freshly initialised model, and a zero Adam state for its parameters."""
    brainstate.random.seed(seed)
    model = etp_nn.GRUCell(I, H) if kind == "gru" else SNN()
    brainstate.nn.init_all_states(model, batch_size=B)
    learner: ETraceAlgorithm = D_RTRL(model) if learner_name == "D_RTRL" else ES_D_RTRL(model, 0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(jnp.zeros((B, I), DTYPE))
    params = {".".join(map(str, p)): s.value for p, s in model.states(brainstate.ParamState).items()}
    zeros = jax.tree.map(jnp.zeros_like, params)
    return learner, {"m": zeros, "v": zeros, "count": jnp.zeros((), jnp.int32)}


def data() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(7)
    xs = rng.normal(size=(N, B, I)).astype(DTYPE)
    ys = rng.normal(size=(N, B, H)).astype(DTYPE)
    return jnp.asarray(xs), jnp.asarray(ys)


def train_step(learner: ETraceAlgorithm, adam: dict[str, Any], x: jax.Array, y: jax.Array) -> dict[str, Any]:
    """One online step and Adam (lr 1e-2, b1 0.9, b2 0.999, eps 1e-8) on every parameter."""
    param_states = learner.model.states(brainstate.ParamState)

    def loss(x: jax.Array, y: jax.Array) -> jax.Array:
        out = learner(x)
        return jnp.sum((out - y[..., : out.shape[-1]]) ** 2)

    grads = brainstate.transform.grad(loss, param_states)(x, y)
    count = adam["count"] + 1
    t = count.astype(x.dtype)
    m, v = {}, {}
    for path, state in param_states.items():
        key = ".".join(map(str, path))
        g = grads[path]
        m[key] = jax.tree.map(lambda m0, g0: 0.9 * m0 + 0.1 * g0, adam["m"][key], g)
        v[key] = jax.tree.map(lambda v0, g0: 0.999 * v0 + 0.001 * g0 * g0, adam["v"][key], g)
        state.value = jax.tree.map(
            lambda p, m1, v1: p - 1e-2 * (m1 / (1 - 0.9**t)) / (jnp.sqrt(v1 / (1 - 0.999**t)) + 1e-8),
            state.value,
            m[key],
            v[key],
        )
    return {"m": m, "v": v, "count": count}


def snapshot(learner: ETraceAlgorithm, adam: dict[str, Any], path: Path) -> None:
    """Every leaf of every state and of the Adam state, raw, by its path."""
    arrays = {}
    trees = {".".join(map(str, p)): s.value for p, s in learner.states().items()} | {"adam": adam}
    for name, tree in trees.items():
        for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            arrays[name + jax.tree_util.keystr(keys)] = np.asarray(leaf)
    np.savez(path, **arrays)


def run(learner: ETraceAlgorithm, adam: dict[str, Any], steps: range) -> dict[str, Any]:
    xs, ys = data()
    for t in steps:
        adam = train_step(learner, adam, xs[t], ys[t])
    return adam


def sharded() -> None:
    """A learner split over 2 devices (``XLA_FLAGS`` set by the test): restored leaves keep the target's shardings.

    Prints ``RESULT`` and a JSON record: how many leaves are split, whether every restored leaf has
    the sharding the target's leaf had and the saved value, and the same for an unsharded target.
    """
    from etp_algorithms import shard, shard_batch

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    xs, ys = data()
    learner, adam = build("D_RTRL", "gru", seed=1)
    shard(learner, mesh, "data")
    for t in range(K):
        adam = train_step(learner, adam, shard_batch(xs[t], mesh, "data", axis=0), ys[t])
    saved = {p: [np.asarray(x) for x in jax.tree.leaves(s.value)] for p, s in learner.states().items()}
    save_checkpoint(ROOT / "sharded", learner, extra=adam)

    def restore_into(target: ETraceAlgorithm, template: dict[str, Any]) -> dict[str, bool]:
        before = {p: [x.sharding for x in jax.tree.leaves(s.value)] for p, s in target.states().items()}
        restored = restore_checkpoint(ROOT / "sharded", target, extra=template)
        after = {p: jax.tree.leaves(s.value) for p, s in target.states().items()}
        return {
            "kept": all(
                x.sharding.is_equivalent_to(old, x.ndim)
                for p in after
                for x, old in zip(after[p], before[p], strict=True)
            ),
            "equal": all(
                np.asarray(x).tobytes() == want.tobytes()
                for p in after
                for x, want in zip(after[p], saved[p], strict=True)
            )
            and all(
                np.asarray(a).tobytes() == np.asarray(b).tobytes()
                for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(adam), strict=True)
            ),
        }

    target, template = build("D_RTRL", "gru", seed=2)
    shard(target, mesh, "data")
    split = sum(
        len(x.sharding.device_set) == 2 and not x.sharding.is_fully_replicated
        for s in target.states().values()
        for x in jax.tree.leaves(s.value)
    )
    into_sharded = restore_into(target, template)
    plain, template = build("D_RTRL", "gru", seed=3)
    into_plain = restore_into(plain, template)
    one_device = all(len(x.sharding.device_set) == 1 for s in plain.states().values() for x in jax.tree.leaves(s.value))
    record = {"split": split, "sharded": into_sharded, "plain": into_plain, "plain_one_device": one_device}
    print("RESULT " + json.dumps(record))


def main() -> None:
    if PHASE == "sharded":
        sharded()
        return
    for learner_name, kind in CONFIGS:
        where = ROOT / f"{learner_name}-{kind}"
        where.mkdir(parents=True, exist_ok=True)
        if PHASE == "first":
            learner, adam = build(learner_name, kind, seed=1)
            adam = run(learner, adam, range(K))
            snapshot(learner, adam, where / "at_k.npz")
            save_checkpoint(where / "ckpt", learner, extra=adam, step=K)
            snapshot(learner, run(learner, adam, range(K, N)), where / "full.npz")
        else:
            learner, adam = build(learner_name, kind, seed=2)
            snapshot(learner, adam, where / "fresh.npz")
            adam = restore_checkpoint(where / "ckpt", learner, extra=adam)
            snapshot(learner, adam, where / "restored.npz")
            snapshot(learner, run(learner, adam, range(K, N)), where / "resumed.npz")
    print("worker done", PHASE, DTYPE)


if __name__ == "__main__":
    main()
