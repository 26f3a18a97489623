r"""Checkpoints of an online learner: stop a long stream and continue it later, bit for bit.

An online learner's future depends on more than its parameters. After :math:`k` steps the
update of step :math:`k+1` reads

.. math::

    \theta^{k},\quad h^{k},\quad \epsilon^{k},\quad \text{counters (e.g. ES-D-RTRL's } k
    \text{ in } 1/(1-a^{k+1})\text{)},\quad s^{k}_{\mathrm{opt}},

the parameters, the model's hidden states, the eligibility traces, the learner's counters and
the optimizer's state. :func:`save_checkpoint` writes every :class:`brainstate.State` of the
learner's module tree (``learner.states()``: the model's parameters and hidden states, the
learner's :class:`~etp_algorithms.EligibilityTrace`, whatever else the tree holds) by its path,
the caller's ``extra`` pytree (the optimizer state), and a description of the learner (class,
rule, compiled input shapes and dtypes, every leaf's path, shape and dtype). The files are
written by `orbax-checkpoint <https://orbax.readthedocs.io>`_: a ``CompositeCheckpointHandler``
with a JSON item ``etp`` (the description) and ``StandardSave`` items ``states`` and ``extra``;
with ``step=`` they live under an ``orbax.checkpoint.CheckpointManager`` (``directory/<step>``).

:func:`restore_checkpoint` reads the description first and compares it with the target learner,
which must be built and compiled as the saved one was (same class and rule, same input shapes
and dtypes, the same state paths, structures, shapes and dtypes): a difference raises
:class:`CheckpointMismatchError` naming it. It then reads every array and only then writes the
learner's states, so a failed restore leaves the learner as it was.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any, cast

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from ._learner import ETraceAlgorithm

__all__ = ["CheckpointMismatchError", "checkpoint_steps", "restore_checkpoint", "save_checkpoint"]

_FORMAT = "etp-algorithms learner checkpoint"
_FORMAT_VERSION = 1
_META, _STATES, _EXTRA = "etp", "states", "extra"
_SHOWN = 16  # mismatches listed in one error


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the learner (or ``extra``) it is restored into; the message names the difference."""


# ---------------------------------------------------------------------------- pytree descriptions
@dataclass(frozen=True)
class _Tree:
    """A pytree's structure (text), leaf key paths, shapes and dtypes, and the leaves to write."""

    treedef: str
    keys: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    leaves: list[Any]

    def record(self) -> dict[str, Any]:
        return {
            "treedef": self.treedef,
            "leaves": [
                {"key": k, "shape": list(s), "dtype": d} for k, s, d in zip(self.keys, self.shapes, self.dtypes)
            ],
        }


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _describe(value: Any) -> _Tree:
    flat, treedef = jax.tree_util.tree_flatten_with_path(value)
    keys, shapes, dtypes, leaves = [], [], [], []
    for path, leaf in flat:
        if _is_key(leaf):  # a typed PRNG key: its raw key data is saved, its impl kept by the target
            dtype, leaf = str(leaf.dtype), jax.random.key_data(leaf)
        else:
            leaf = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
            dtype = str(leaf.dtype)
        keys.append(jax.tree_util.keystr(path))
        shapes.append(tuple(int(n) for n in leaf.shape))
        dtypes.append(dtype)
        leaves.append(leaf)
    # object addresses in a custom node's aux data differ between processes; they name nothing
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(treedef))
    return _Tree(text, keys, shapes, dtypes, leaves)


def _differences(where: str, saved: dict[str, Any], target: _Tree) -> list[str]:
    """What differs between a saved tree record and the target tree, one line each."""
    saved_leaves = saved["leaves"]
    saved_keys = [leaf["key"] for leaf in saved_leaves]
    if saved_keys != target.keys:
        only_saved = [k for k in saved_keys if k not in target.keys]
        only_target = [k for k in target.keys if k not in saved_keys]
        detail = "; ".join(
            part
            for part in (
                f"leaves only in the checkpoint: {only_saved}" if only_saved else "",
                f"leaves only in the target: {only_target}" if only_target else "",
            )
            if part
        )
        return [f"{where}: structure differs ({detail or f'leaf order {saved_keys} vs {target.keys}'})"]
    if saved["treedef"] != target.treedef:
        return [f"{where}: structure differs: checkpoint {saved['treedef']}, target {target.treedef}"]
    problems = []
    for leaf, shape, dtype in zip(saved_leaves, target.shapes, target.dtypes, strict=True):
        name = f"{where}{leaf['key']}"
        if tuple(leaf["shape"]) != shape:
            problems.append(f"{name}: shape {tuple(leaf['shape'])} in the checkpoint, {shape} in the target")
        if leaf["dtype"] != dtype:
            problems.append(f"{name}: dtype {leaf['dtype']} in the checkpoint, {dtype} in the target")
    return problems


# ---------------------------------------------------------------------------- the learner's record
def _text(path: Sequence[Any]) -> str:
    return ".".join(map(str, path))


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _states(learner: ETraceAlgorithm) -> dict[str, brainstate.State[Any]]:
    """``path -> State`` of every state of the learner's module tree (one filter: one mapping)."""
    states = cast(Mapping[Any, brainstate.State[Any]], learner.states())
    return {_text(path): state for path, state in states.items()}


def _inputs(learner: ETraceAlgorithm) -> list[list[Any]]:
    shapes = learner._arg_shapes or []
    return [[list(shape), str(np.dtype(dtype))] for shape, dtype in shapes]


def _require_compiled(learner: Any, action: str) -> ETraceAlgorithm:
    if not isinstance(learner, ETraceAlgorithm):
        raise TypeError(
            f"{action} expects an etp_algorithms learner (an ETraceAlgorithm), got {type(learner).__name__}."
        )
    if not learner.is_compiled:
        raise RuntimeError(
            f"{action}: {type(learner).__name__} is not compiled; call learner.compile_graph(*example_inputs) "
            "(or one step) first, so that its eligibility traces exist."
        )
    return learner


def _versions() -> dict[str, str]:
    return {name: _version(name) for name in ("etp-algorithms", "jax", "brainstate", "orbax-checkpoint")}


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp  # type: ignore[import-untyped]
    except ImportError as error:  # a declared dependency; only a broken environment lacks it
        raise ImportError(
            "etp_algorithms checkpoints need orbax-checkpoint, a dependency of etp-algorithms; install it with "
            "'pip install orbax-checkpoint' (or reinstall etp-algorithms)."
        ) from error
    return ocp


# ---------------------------------------------------------------------------- save
def save_checkpoint(
    directory: str | os.PathLike[str],
    learner: ETraceAlgorithm,
    *,
    extra: Any = None,
    step: int | None = None,
    overwrite: bool = False,
    max_to_keep: int | None = None,
) -> Path:
    """Save everything ``learner`` needs to continue, and the caller's ``extra`` pytree, with orbax.

    Parameters
    ----------
    directory : str or path-like
        Without ``step``: the checkpoint's own directory (it must not exist unless ``overwrite``).
        With ``step``: the directory of an ``orbax.checkpoint.CheckpointManager``; this checkpoint
        goes to ``directory/<step>``.
    learner : ETraceAlgorithm
        A compiled learner (any of :mod:`etp_algorithms`'s). Every state of ``learner.states()``
        is saved by its path: the model's parameters and hidden states, the eligibility traces,
        counters (ES-D-RTRL's bias-correction step count), other states.
    extra : pytree, optional
        What else the run needs, typically the optimizer state (an optax state, a dict of
        arrays); leaves are arrays, NumPy scalars or typed PRNG keys.
    step : int, optional
        The position in the stream (recorded, and the CheckpointManager's step).
    overwrite : bool
        Replace an existing checkpoint at that place.
    max_to_keep : int, optional
        With ``step``: keep only the newest this many steps (orbax's ``max_to_keep``).

    Returns
    -------
    pathlib.Path
        The directory of the checkpoint written.

    Examples
    --------
    >>> import tempfile, brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import D_RTRL
    >>> from etp_algorithms import save_checkpoint, restore_checkpoint
    >>> cell = etp_nn.VanillaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell, batch_size=2)
    >>> learner = D_RTRL(cell)
    >>> _ = learner.compile_graph(jnp.zeros((2, 3)))
    >>> _ = learner(jnp.ones((2, 3)))
    >>> path = save_checkpoint(tempfile.mkdtemp() + "/ckpt", learner, extra={"count": jnp.asarray(1)})
    >>> restored = restore_checkpoint(path, learner, extra={"count": jnp.asarray(0)})
    >>> int(restored["count"])
    1
    """
    label = "save_checkpoint"
    learner = _require_compiled(learner, label)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0):
        raise TypeError(f"{label}: step must be a non-negative int, got {step!r}.")
    if max_to_keep is not None and step is None:
        raise ValueError(f"{label}: max_to_keep applies to checkpoints saved with step=...; none was given.")
    states = {path: _describe(state.value) for path, state in _states(learner).items()}
    extra_tree = None if extra is None else _describe(extra)
    meta = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "learner": _class_name(learner),
        "rule": learner.rule.name,
        "model": _class_name(learner.model),
        "inputs": _inputs(learner),
        "step": None if step is None else int(step),
        "states": [
            {"path": path, "type": type(state).__name__, **states[path].record()}
            for path, state in _states(learner).items()
        ],
        "extra": None if extra_tree is None else extra_tree.record(),
        "versions": _versions(),
    }
    ocp = _orbax()
    items = {_META: ocp.args.JsonSave(meta)}
    leaves = [leaf for tree in states.values() for leaf in tree.leaves]
    if leaves:
        items[_STATES] = ocp.args.StandardSave(leaves)
    if extra_tree is not None and extra_tree.leaves:
        items[_EXTRA] = ocp.args.StandardSave(extra_tree.leaves)
    root = Path(directory).absolute()
    if step is None:
        if root.exists() and not overwrite:
            raise FileExistsError(
                f"{label}: {root} already exists; pass overwrite=True to replace it, or step=... to keep a "
                "series of checkpoints in that directory."
            )
        ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(root, args=ocp.args.Composite(**items), force=True)
        return root
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    with ocp.CheckpointManager(root, options=options) as manager:
        if int(step) in manager.all_steps():
            if not overwrite:
                raise FileExistsError(f"{label}: step {int(step)} already exists in {root}; pass overwrite=True.")
            manager.delete(int(step))
        manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
    return root / str(int(step))


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps saved in ``directory`` by :func:`save_checkpoint` with ``step=...``, oldest first.

    Examples
    --------
    >>> import tempfile, brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import ES_D_RTRL
    >>> from etp_algorithms import checkpoint_steps, save_checkpoint
    >>> cell = etp_nn.VanillaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = ES_D_RTRL(cell, 0.9)
    >>> _ = learner.compile_graph(jnp.zeros(3))
    >>> run = tempfile.mkdtemp()
    >>> for step in range(1, 5):
    ...     _ = learner(jnp.ones(3))
    ...     _ = save_checkpoint(run, learner, step=step, max_to_keep=2)
    >>> checkpoint_steps(run)
    [3, 4]
    """
    root = Path(directory).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint_steps: no directory {root}.")
    ocp = _orbax()
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False)) as manager:
        return sorted(int(s) for s in manager.all_steps())


# ---------------------------------------------------------------------------- restore
def _reader(root: Path, step: int | None) -> tuple[Any, Any]:
    """A function ``items -> restored`` reading the single checkpoint at ``root`` or one step under it."""
    ocp = _orbax()
    if (root / _META).is_dir():
        if step is not None:
            raise ValueError(f"restore_checkpoint: {root} is one checkpoint (saved without step=); pass no step.")
        checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
        return ocp, lambda items: checkpointer.restore(root, args=ocp.args.Composite(**items))
    if not root.is_dir():
        raise FileNotFoundError(f"restore_checkpoint: no checkpoint at {root}.")
    steps = checkpoint_steps(root)
    if not steps:
        raise FileNotFoundError(f"restore_checkpoint: {root} holds no checkpoint (neither one nor a series of steps).")
    chosen = steps[-1] if step is None else int(step)
    if chosen not in steps:
        raise FileNotFoundError(f"restore_checkpoint: no step {chosen} in {root}; saved steps: {steps}.")

    def read(items: dict[str, Any]) -> Any:
        with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False)) as manager:
            return manager.restore(chosen, args=ocp.args.Composite(**items))

    return ocp, read


def _abstract(leaves: list[Any], current_leaves: list[Any]) -> list[jax.ShapeDtypeStruct]:
    """Targets for orbax: each leaf placed as the current one is (its sharding), on the default device otherwise.

    ``leaves``: the described leaves (raw key data for typed keys); ``current_leaves``: the values they replace.
    """
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = []
    for leaf, current in zip(leaves, current_leaves, strict=True):
        sharding = current.sharding if isinstance(current, jax.Array) and not _is_key(current) else default
        out.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
    return out


def _rebuild(value: Any, restored: list[Any]) -> Any:
    """``value``'s structure with the restored leaves (typed PRNG keys re-wrapped with ``value``'s impl)."""
    flat, treedef = jax.tree_util.tree_flatten(value)
    leaves = [
        jax.random.wrap_key_data(new, impl=jax.random.key_impl(old)) if _is_key(old) else new
        for old, new in zip(flat, restored, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _check(meta: dict[str, Any], learner: ETraceAlgorithm, states: dict[str, _Tree], extra: _Tree | None) -> None:
    name = type(learner).__name__
    if meta.get("format") != _FORMAT or meta.get("format_version") != _FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"restore_checkpoint: not an etp-algorithms learner checkpoint of format version {_FORMAT_VERSION} "
            f"(found {meta.get('format')!r}, version {meta.get('format_version')!r})."
        )
    problems = []
    if meta["learner"] != _class_name(learner):
        problems.append(f"learner: {meta['learner']} in the checkpoint, {_class_name(learner)} in the target")
    if meta["rule"] != learner.rule.name:
        problems.append(f"rule: {meta['rule']!r} in the checkpoint, {learner.rule.name!r} in the target")
    if meta["inputs"] != _inputs(learner):

        def shown(inputs: list[list[Any]]) -> str:
            return ", ".join(f"{tuple(shape)} {dtype}" for shape, dtype in inputs)

        hint = (
            "another batch size or input shape: reset_state(batch_size=...) and compile_graph(...) the target with "
            "inputs shaped as the saved learner's"
            if [shape for shape, _ in meta["inputs"]] != [shape for shape, _ in _inputs(learner)]
            else "another dtype: build the model in the saved precision (brainstate.environ.context(precision=...)) "
            "and compile_graph(...) with inputs of the saved dtype"
        )
        problems.append(
            f"compiled inputs: [{shown(meta['inputs'])}] in the checkpoint, [{shown(_inputs(learner))}] in the "
            f"target ({hint})"
        )
    saved = {record["path"]: record for record in meta["states"]}
    only_saved = [p for p in saved if p not in states]
    only_target = [p for p in states if p not in saved]
    if only_saved or only_target:
        problems.append(
            f"states (another model: checkpoint {meta['model']}, target {_class_name(learner.model)}): "
            + "; ".join(
                part
                for part in (
                    f"only in the checkpoint: {only_saved}" if only_saved else "",
                    f"only in the target: {only_target}" if only_target else "",
                )
                if part
            )
        )
    for path, tree in states.items():
        if path in saved:
            problems.extend(_differences(f"state {path}", saved[path], tree))
    if extra is not None:
        if meta["extra"] is None:
            problems.append("extra: the checkpoint holds no extra (saved with extra=None), but one was given")
        else:
            problems.extend(_differences("extra", meta["extra"], extra))
    if problems:
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise CheckpointMismatchError(
            f"restore_checkpoint: the checkpoint does not fit this {name} (nothing was restored):\n  "
            + "\n  ".join(problems[:_SHOWN])
            + more
        )


def restore_checkpoint(
    directory: str | os.PathLike[str],
    learner: ETraceAlgorithm,
    *,
    extra: Any = None,
    step: int | None = None,
) -> Any:
    """Load a checkpoint of :func:`save_checkpoint` into ``learner``; return the restored ``extra``.

    ``learner`` must be built and compiled as the saved one was: the same learner class and rule,
    compiled for inputs of the same shapes and dtypes (the same batch size), on a model with the
    same state paths, structures, shapes and dtypes (its values may differ: they are replaced).
    Everything is checked and read before anything is written; on any error the learner is
    unchanged.

    Parameters
    ----------
    directory : str or path-like
        A checkpoint's directory, or the directory of a series saved with ``step=...``.
    learner : ETraceAlgorithm
        The compiled target learner; all its states are overwritten.
    extra : pytree, optional
        A pytree shaped like the saved ``extra`` (e.g. a freshly initialised optimizer state): its
        structure, leaf shapes and dtypes are checked and a pytree of that structure with the saved
        values is returned (``extra`` itself is not modified). ``None``: the saved ``extra`` is not read.
    step : int, optional
        For a series: the step to restore (default: the newest).

    Returns
    -------
    pytree or None
        The restored ``extra`` (``None`` when ``extra`` is ``None``).

    Raises
    ------
    CheckpointMismatchError
        When the checkpoint does not fit: the message names each mismatching state path and leaf
        with its shape or dtype, the learner class, rule or compiled inputs.
    FileNotFoundError
        No checkpoint (or no such step) at ``directory``.

    Examples
    --------
    A checkpoint of a learner compiled for a batch of 2, restored into one compiled for 3:

    >>> import tempfile, brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import D_RTRL
    >>> from etp_algorithms import restore_checkpoint, save_checkpoint
    >>> def learner(batch):
    ...     cell = etp_nn.VanillaRNNCell(3, 4)
    ...     _ = brainstate.nn.init_all_states(cell, batch_size=batch)
    ...     out = D_RTRL(cell)
    ...     _ = out.compile_graph(jnp.zeros((batch, 3)))
    ...     return out
    >>> path = save_checkpoint(tempfile.mkdtemp() + "/ckpt", learner(2))
    >>> restore_checkpoint(path, learner(3))
    Traceback (most recent call last):
    ...
    etp_algorithms._checkpoint.CheckpointMismatchError: restore_checkpoint: the checkpoint does not fit this D_RTRL (nothing was restored):
      compiled inputs: [(2, 3) float...] in the checkpoint, [(3, 3) float...] in the target (another batch size ...)
      ...
      state model.h: shape (2, 4) in the checkpoint, (3, 4) in the target
    """
    learner = _require_compiled(learner, "restore_checkpoint")
    ocp, read = _reader(Path(directory).absolute(), step)
    meta = read({_META: ocp.args.JsonRestore()})[_META]
    if isinstance(meta, str | bytes):  # some orbax versions hand JSON items back as text
        meta = json.loads(meta)
    targets = _states(learner)
    states = {path: _describe(state.value) for path, state in targets.items()}
    extra_tree = None if extra is None else _describe(extra)
    _check(meta, learner, states, extra_tree)

    # read everything, then write: a failing read leaves the learner untouched
    order = [record["path"] for record in meta["states"]]
    items: dict[str, Any] = {}
    state_targets = [leaf for path in order for leaf in jax.tree_util.tree_leaves(targets[path].value)]
    state_leaves = [leaf for path in order for leaf in states[path].leaves]
    if state_leaves:
        items[_STATES] = ocp.args.StandardRestore(_abstract(state_leaves, state_targets))
    if extra_tree is not None and extra_tree.leaves:
        items[_EXTRA] = ocp.args.StandardRestore(_abstract(extra_tree.leaves, jax.tree_util.tree_leaves(extra)))
    restored = read(items) if items else {}
    new_values, start = {}, 0
    saved_leaves = list(restored[_STATES]) if _STATES in items else []
    for path in order:
        count = len(states[path].leaves)
        new_values[path] = _rebuild(targets[path].value, saved_leaves[start : start + count])
        start += count
    new_extra = None if extra_tree is None else _rebuild(extra, list(restored[_EXTRA]) if _EXTRA in items else [])
    for path, value in new_values.items():
        targets[path].value = value
    return new_extra
