"""Shared by ``digits_rnn.py``, ``digits_snn.py`` and ``copy_task.py``: one training protocol for every learner.

A sequence classifier (time-major inputs ``(T, N, I)``, one label per sequence, read out over the
last ``readout_steps`` steps) is trained with each learner from the same initial weights, on the
same mini-batches in the same order, with the same optimizer (Adam, cosine decay, gradient-norm
clipping):

* ``BPTT``: ``brainstate.transform.grad`` through a ``for_loop`` over the whole sequence;
* every online learner: ``braintrace.compile(model, name, x0, batch_size=B, **options)`` and one
  ``learner.etrace_grad(xs, labels, step_fn=..., mask=...)`` per mini-batch, the mask keeping the
  read-out steps: each step's gradient comes from the eligibility traces, in one compiled loop.

Online learners are taken by their registered names (``braintrace.registered_learners()``), so a
learner added to the library joins the comparison by being listed in an example's ``LEARNERS``;
names not registered in this installation are reported and skipped.

Each run prints a table (held-out accuracy, trace memory, time per step, what is exact) and writes
the results as JSON and the learning curves and accuracy-vs-memory as a PNG.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import braintrace


@dataclass(frozen=True)
class LearnerSpec:
    """A row of the comparison: ``algorithm`` a registered learner name (``None``: BPTT) and its options."""

    name: str
    algorithm: str | None
    options: dict[str, Any] = field(default_factory=dict)
    exact: str = ""  # what the learner computes exactly, for the table
    default: bool = True  # in a default run (expensive learners are run with --learners, and in --quick)


BPTT = LearnerSpec("BPTT", None, exact="the gradient (memory grows with T)")


@dataclass
class Split:
    """Time-major inputs ``(T, N, I)`` and integer labels ``(N,)`` of a train and a test set."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


@dataclass
class Result:
    name: str
    exact: str = ""
    curve_epoch: list[float] = field(default_factory=list)
    curve_loss: list[float] = field(default_factory=list)
    curve_test_acc: list[float] = field(default_factory=list)
    test_acc: float = float("nan")
    trace_bytes: int | None = None
    ms_per_step: float = float("nan")
    seconds: float = 0.0
    skipped: str = ""


def available(specs: Sequence[LearnerSpec]) -> tuple[list[LearnerSpec], list[str]]:
    """The specs runnable here (BPTT and the registered learner names), and a note per skipped one."""
    registered = {name.lower() for name in braintrace.registered_learners()}
    keep, notes = [], []
    for spec in specs:
        if spec.algorithm is None or spec.algorithm.lower() in registered:
            keep.append(spec)
        else:
            notes.append(f"{spec.name}: learner {spec.algorithm!r} is not registered in this installation, skipped")
    return keep, notes


def select(specs: Sequence[LearnerSpec], wanted: Sequence[str], quick: bool) -> list[LearnerSpec]:
    """The learners asked for by name; without names, the default ones (every one with ``--quick``)."""
    if wanted:
        return [s for s in specs if s.name in wanted]
    return [s for s in specs if s.default or quick]


def cross_entropy(logits: jax.Array, labels: jax.Array, n_classes: int) -> jax.Array:
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, n_classes), axis=-1))


def _optimizer(args: argparse.Namespace, updates: int) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(args.lr, max(updates, 1), alpha=0.1)
    return optax.chain(optax.clip_by_global_norm(args.clip), optax.adam(schedule))


def make_update(
    spec: LearnerSpec,
    model: brainstate.nn.Module,
    steps: int,
    n_in: int,
    args: argparse.Namespace,
    n_classes: int,
    updates: int,
) -> tuple[Callable[[jax.Array, jax.Array], jax.Array], Any]:
    """The jitted training update on one mini-batch ``(T, B, I)``, and the learner (``None`` for BPTT)."""
    params = model.states(brainstate.ParamState)
    batch = args.batch
    optimizer = _optimizer(args, updates)
    opt_state = brainstate.ShortTermState(optimizer.init({k: s.value for k, s in params.items()}))
    mask = jnp.zeros(steps).at[steps - args.readout_steps :].set(1.0)  # the loss is read out at the end

    def apply(grads: dict[Any, Any]) -> None:
        values = {k: s.value for k, s in params.items()}
        updates_, opt_state.value = optimizer.update(grads, opt_state.value, values)
        for k, s in params.items():
            s.value = optax.apply_updates(s.value, updates_[k])

    if spec.algorithm is None:

        def bptt_update(xs: jax.Array, labels: jax.Array) -> jax.Array:
            def loss_fn() -> jax.Array:
                brainstate.nn.reset_all_states(model, batch_size=batch)
                logits = brainstate.transform.for_loop(model, xs)
                per_step = jax.vmap(cross_entropy, (0, None, None))(logits, labels, n_classes)
                return jnp.sum(mask * per_step) / jnp.sum(mask)

            grads, loss = brainstate.transform.grad(loss_fn, params, return_value=True)()
            apply(grads)
            return loss

        return brainstate.transform.jit(bptt_update), None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compiler's notes on weights without traces (the readout)
        learner = braintrace.compile(
            model, spec.algorithm, jnp.zeros((batch, n_in), jnp.float32), batch_size=batch, **spec.options
        )

    def step_loss(x: jax.Array, labels: jax.Array) -> jax.Array:
        return cross_entropy(learner(x), labels, n_classes)

    def online_update(xs: jax.Array, labels: jax.Array) -> jax.Array:
        brainstate.nn.reset_all_states(model, batch_size=batch)
        learner.reset_state()  # zero traces: a new sequence
        per_step_labels = jnp.broadcast_to(labels, (xs.shape[0], *labels.shape))
        grads, loss = learner.etrace_grad(
            xs,
            per_step_labels,
            step_fn=step_loss,
            mask=mask,
            weights=params,
            reduction="mean",
            loss_output="scalar",
            return_value=True,
        )
        apply(grads)
        return loss

    return brainstate.transform.jit(online_update), learner


def make_evaluate(model: brainstate.nn.Module, args: argparse.Namespace) -> Callable[[np.ndarray, np.ndarray], float]:
    """Held-out accuracy: the mean of the read-out steps' logits, argmax against the label (plain forward pass)."""
    batch, k = args.batch, args.readout_steps

    @brainstate.transform.jit
    def correct(xs: jax.Array, labels: jax.Array) -> jax.Array:
        brainstate.nn.reset_all_states(model, batch_size=batch)
        logits = brainstate.transform.for_loop(model, xs)
        return jnp.sum(jnp.argmax(jnp.mean(logits[-k:], axis=0), -1) == labels)

    def evaluate(xs: np.ndarray, labels: np.ndarray) -> float:
        n = (labels.shape[0] // batch) * batch
        hits = sum(
            int(correct(jnp.asarray(xs[:, i : i + batch]), jnp.asarray(labels[i : i + batch])))
            for i in range(0, n, batch)
        )
        return hits / n

    return evaluate


def train(
    spec: LearnerSpec,
    make_model: Callable[[], brainstate.nn.Module],
    data: Split,
    args: argparse.Namespace,
) -> Result:
    """Train one learner for ``args.epochs`` epochs of ``args.batch``-sized mini-batches; evaluate as it goes."""
    steps, n_train, n_in = data.x_train.shape
    brainstate.random.seed(args.seed)  # identical initial weights for every learner
    model = make_model()
    brainstate.nn.init_all_states(model, batch_size=args.batch)
    per_epoch = n_train // args.batch
    update, learner = make_update(spec, model, steps, n_in, args, data.n_classes, per_epoch * args.epochs)
    evaluate = make_evaluate(model, args)
    rng = np.random.default_rng(args.seed)  # identical mini-batches for every learner
    result = Result(spec.name, exact=spec.exact)
    start = time.perf_counter()
    step_seconds: list[float] = []
    for epoch in tqdm(range(1, args.epochs + 1), desc=f"{spec.name:>10}", ncols=100):
        order = rng.permutation(n_train)
        losses = []
        for b in range(per_epoch):
            idx = order[b * args.batch : (b + 1) * args.batch]
            xs, labels = jnp.asarray(data.x_train[:, idx]), jnp.asarray(data.y_train[idx])
            tick = time.perf_counter()
            losses.append(float(update(xs, labels)))  # float() waits for the result
            if epoch > 1 or b > 0:  # the first call compiles
                step_seconds.append((time.perf_counter() - tick) / steps)
        result.curve_epoch.append(epoch)
        result.curve_loss.append(float(np.mean(losses)))
        result.curve_test_acc.append(evaluate(data.x_test, data.y_test))
    result.seconds = time.perf_counter() - start
    result.test_acc = result.curve_test_acc[-1]
    result.ms_per_step = 1e3 * float(np.median(step_seconds)) if step_seconds else float("nan")
    if learner is not None:
        result.trace_bytes = int(learner.trace_bytes())
    return result


# ------------------------------------------------------------------------------------------ report


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB"


def table(results: Sequence[Result]) -> str:
    head = ("learner", "test acc", "trace memory", "ms/step", "time", "exact")
    rows = [
        (r.name, f"{r.test_acc:.1%}", fmt_bytes(r.trace_bytes), f"{r.ms_per_step:.3f}", f"{r.seconds:.1f} s", r.exact)
        for r in results
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*head), line.format(*("-" * w for w in widths)), *(line.format(*r) for r in rows)])


def save(results: Sequence[Result], meta: dict[str, Any], json_path: Path, png_path: Path, title: str) -> None:
    """The results as JSON (with ``meta``: task, sizes, machine) and a PNG: learning curves, accuracy vs memory."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_mem) = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        ax_loss.plot(r.curve_epoch, r.curve_loss, label=r.name)
        ax_acc.plot(r.curve_epoch, r.curve_test_acc, label=r.name)
        if r.trace_bytes:
            ax_mem.scatter(r.trace_bytes, r.test_acc, label=r.name)
            ax_mem.annotate(r.name, (r.trace_bytes, r.test_acc), fontsize=8)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="held-out accuracy")
    ax_mem.set(xlabel="eligibility-trace bytes", ylabel="held-out accuracy", xscale="log")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_mem.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (a smoke test)")
    parser.add_argument("--learners", default="", help="comma-separated subset of the learners (default: all)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="initial Adam learning rate (cosine decay to 10%%)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient global-norm clipping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"), help="directory of the JSON and PNG")
    parser.set_defaults(name=name)


def run(
    specs: Sequence[LearnerSpec],
    make_model: Callable[[], brainstate.nn.Module],
    data: Split,
    args: argparse.Namespace,
    meta: dict[str, Any],
    title: str,
) -> list[Result]:
    """Select (``--learners``), train every learner, print the table, write ``<out>/<name>.json`` and ``.png``."""
    wanted = [s.strip() for s in args.learners.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {s.name for s in specs})
    if unknown:
        raise SystemExit(f"unknown learner(s) {unknown}; choose from {[s.name for s in specs]}")
    chosen, notes = available(select(specs, wanted, args.quick))
    for note in notes:
        print(note)
    results = [train(spec, make_model, data, args) for spec in chosen]
    print()
    print(table(results))
    meta = {**meta, "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seed": args.seed, "quick": args.quick}
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    save(results, meta, json_path, png_path, title)
    print(f"\nresults: {json_path}, {png_path}")
    return results
