r"""Data-parallel online learning over a device mesh: :func:`shard` and :func:`shard_batch`.

A learner's memory is its eligibility traces, of size :math:`O(B \cdot \theta)`
for D-RTRL: they grow with the batch :math:`B`. :func:`shard` places the
learner's per-sample state -- the model's hidden states and the traces --
with its batch axis split over one axis of a :class:`jax.sharding.Mesh`
(``'data'``), and every parameter replicated. Nothing else changes: the
jitted step, :meth:`~etp_algorithms.ETraceAlgorithm.etrace_grad` and the
user's optimizer run on those arrays, and JAX's partitioner (GSPMD) compiles
each program for the mesh. A device holds :math:`B/n` samples of every trace:

.. math::

    \text{trace bytes per device} = \frac{\text{trace bytes}}{n}, \qquad n = \texttt{mesh.shape[batch\_axis]}.

Results are those of the unsharded learner (the same program, partitioned):
a loss reduced over the batch inside ``step_fn`` (e.g. ``jnp.mean``) gives
gradients reduced across devices by the compiled program (an all-reduce of
parameter-sized arrays), replicated on every device.

Which leaves are sharded
------------------------
The trace pytree is the rule's choice (D_RTRL, ES_D_RTRL, RTRL, UORO, ...
each have their own), so the decision is made per leaf, from its shape: the
batch size :math:`B` is the leading axis shared by the model's hidden states
(checked against the learner's compiled inputs), and a leaf of a hidden
state, another non-parameter state or the traces is sharded on its leading
axis exactly when that axis has length :math:`B`. Parameters are always
replicated. A leaf whose leading axis has length :math:`B` by coincidence
(not a batch axis) is then split too: under GSPMD a layout is only a
placement, so a wrong decision costs communication (speed), never
correctness.

Multi-process
-------------
The same code runs under :func:`jax.distributed.initialize` with several
processes: the mesh then spans the devices of every process, each process
holds the same full values (the same seed, the same data) and
:func:`shard`/:func:`shard_batch` keep only its own devices' slices
(:func:`jax.make_array_from_callback`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import brainstate
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["BatchSharding", "shard", "shard_batch", "trace_bytes_per_device"]


@dataclass(frozen=True)
class BatchSharding:
    """What :func:`shard` placed: the mesh, the axes and which state leaves it split.

    Attributes
    ----------
    mesh : jax.sharding.Mesh
        The mesh the arrays live on (the given mesh's devices and names, every axis ``Auto``:
        the partitioner propagates the layouts).
    batch_axis : str
        The mesh axis the batch is split over.
    batch_size : int
        :math:`B`, the global batch size (each device holds ``batch_size // num_shards`` samples).
    num_shards : int
        ``mesh.shape[batch_axis]``.
    sharded, replicated : tuple of str
        The state leaves split on their batch axis and those replicated, as ``'path[leaf]'`` texts
        (``'etrace...'`` for the traces).
    """

    mesh: Mesh
    batch_axis: str
    batch_size: int
    num_shards: int
    sharded: tuple[str, ...]
    replicated: tuple[str, ...]

    @property
    def batch_sharding(self) -> NamedSharding:
        """The sharding of a leaf whose leading axis is the batch."""
        return NamedSharding(self.mesh, PartitionSpec(self.batch_axis))

    @property
    def replicated_sharding(self) -> NamedSharding:
        """The sharding of a replicated leaf (parameters, gradients)."""
        return NamedSharding(self.mesh, PartitionSpec())


def _auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis ``Auto`` (GSPMD propagation), its devices and names unchanged."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _check_mesh(mesh: Any, batch_axis: Any, where: str) -> int:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{where}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if batch_axis not in mesh.axis_names:
        raise ValueError(
            f"{where}: the mesh has no axis {batch_axis!r}; its axes are "
            f"{dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))} (name: size)."
        )
    return int(mesh.shape[batch_axis])


def _text(path: Sequence[Hashable], key: Any) -> str:
    return ".".join(map(str, path)) + jax.tree_util.keystr(key)


def _batch_size(learner: Any, batch_size: int | None) -> int:
    """``B``: the leading axis every hidden-state leaf shares (a ValueError when there is none)."""
    label = type(learner).__name__
    leading: dict[str, int | None] = {}
    for path, state in learner.hidden_states.items():
        for key, leaf in jax.tree_util.tree_leaves_with_path(state.value):
            shape = np.shape(leaf)
            leading[_text(path, key)] = int(shape[0]) if shape else None
    sizes = set(leading.values())
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"shard: batch_size must be a positive int or None, got {batch_size!r}.")
        if sizes and sizes != {batch_size}:
            raise ValueError(
                f"shard: batch_size={batch_size}, but the hidden states of the {label} have leading axes "
                f"{leading}; compile the learner for that batch (compile(..., batch_size={batch_size}))."
            )
        return batch_size
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"shard: the hidden states of the {label} share no leading batch axis ({leading or 'no hidden state'}); "
            "compile the learner with a batch (compile(..., batch_size=B)) or pass batch_size=B."
        )
    (size,) = sizes
    assert size is not None
    inputs = getattr(learner, "_arg_shapes", None) or []
    if inputs and not any(shape and shape[0] == size for shape, _ in inputs):
        raise ValueError(
            f"shard: the hidden states of the {label} lead with an axis of {size}, but no compiled input "
            f"{[shape for shape, _ in inputs]} has a leading batch axis of that size: the learner looks "
            "unbatched. Compile it with a batch (compile(..., batch_size=B)) or pass batch_size=B."
        )
    return size


def _place(value: Any, sharding: NamedSharding) -> jax.Array:
    """``value`` (the same full value on every process) as a global array with ``sharding``."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place_tree(
    tree: Any, name: str, plan: tuple[NamedSharding, NamedSharding], size: int, replicate: bool, record: Any
) -> Any:
    batch, whole = plan

    def one(key: Any, leaf: Any) -> Any:
        shape = np.shape(leaf)
        split = not replicate and len(shape) >= 1 and shape[0] == size
        record[0 if split else 1].append(name + jax.tree_util.keystr(key))
        return _place(leaf, batch if split else whole)

    return jax.tree_util.tree_map_with_path(one, tree)


def shard(learner: Any, mesh: Mesh, batch_axis: str = "data", *, batch_size: int | None = None) -> BatchSharding:
    r"""Place a compiled learner's states on ``mesh``: the batch axis split over ``batch_axis``.

    The model's hidden states (and its other per-sample states) and the eligibility traces get
    their leading batch axis split over the mesh axis ``batch_axis``; the model's parameters and
    every other leaf are replicated (see the module docstring for the per-leaf rule). The jitted
    step, :meth:`~etp_algorithms.ETraceAlgorithm.etrace_grad` and the optimizer then run on the
    mesh, partitioned by the compiler; the traces and hidden states stay split after each call.
    Calling ``shard`` again (e.g. after ``learner.reset_state()``, which makes new traces on one
    device) places the new values the same way.

    Parameters
    ----------
    learner : ETraceAlgorithm
        A compiled learner (``compile(model, ..., batch_size=B)`` or ``compile_graph``).
    mesh : jax.sharding.Mesh
        The devices (of every process, under :func:`jax.distributed.initialize`). Its axes are used
        as ``Auto`` (GSPMD) axes.
    batch_axis : str
        The mesh axis to split the batch over; ``B`` must be divisible by its size :math:`n`.
    batch_size : int, optional
        :math:`B`. Default: the leading axis shared by the model's hidden states.

    Returns
    -------
    BatchSharding
        The mesh, the axes, :math:`B` and the leaves split or replicated.

    Raises
    ------
    RuntimeError
        The learner is not compiled.
    TypeError
        ``learner`` is not an :class:`~etp_algorithms.ETraceAlgorithm`, ``mesh`` not a ``Mesh``.
    ValueError
        ``batch_axis`` is not an axis of ``mesh``; :math:`B` is not divisible by the axis size; the
        learner has no batch axis (or one other than ``batch_size``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpy as np, etp_nn
    >>> import etp_algorithms
    >>> from etp_algorithms import shard
    >>> learner = etp_algorithms.compile(etp_nn.GRUCell(3, 4), "d_rtrl", jnp.zeros((2, 3)), batch_size=2)
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> placed = shard(learner, mesh, "data")
    >>> placed.batch_size, placed.num_shards
    (2, 1)
    >>> learner(jnp.ones((2, 3))).shape
    (2, 4)
    """
    from ._learner import ETraceAlgorithm

    if not isinstance(learner, ETraceAlgorithm):
        raise TypeError(
            f"shard: expected an ETraceAlgorithm (D_RTRL, ES_D_RTRL, a compiled learner), got {type(learner).__name__}."
        )
    label = type(learner).__name__
    if not learner.is_compiled:
        raise RuntimeError(
            f"shard: the {label} is not compiled; compile it first (etp_algorithms.compile(model, ..., batch_size=B) "
            "or learner.compile_graph(x0)), so that its hidden states and traces exist to be placed."
        )
    n = _check_mesh(mesh, batch_axis, "shard")
    size = _batch_size(learner, batch_size)
    if size % n:
        raise ValueError(
            f"shard: the batch of {size} samples of the {label} is not divisible by the {n} devices of mesh axis "
            f"{batch_axis!r}; use a batch that is a multiple of {n} (or a mesh axis whose size divides {size})."
        )
    auto = _auto_mesh(mesh)
    plan = (NamedSharding(auto, PartitionSpec(batch_axis)), NamedSharding(auto, PartitionSpec()))
    record: tuple[list[str], list[str]] = ([], [])
    states = cast(Mapping[Any, brainstate.State[Any]], learner.model.states())
    new_values = {
        path: _place_tree(
            state.value, ".".join(map(str, path)), plan, size, isinstance(state, brainstate.ParamState), record
        )
        for path, state in states.items()
    }
    traces = _place_tree(learner.etrace.value, "etrace", plan, size, False, record)
    for path, state in states.items():  # written only after every leaf was placed
        state.value = new_values[path]
    learner.etrace.value = traces
    return BatchSharding(auto, batch_axis, size, n, tuple(record[0]), tuple(record[1]))


def shard_batch(tree: Any, mesh: Mesh, batch_axis: str = "data", *, axis: int = 1) -> Any:
    """Inputs (or targets) split over ``batch_axis`` of ``mesh`` along their batch axis ``axis``.

    Parameters
    ----------
    tree : pytree of arrays
        The full (global) values, the same on every process. ``axis=1`` for time-major sequences
        ``(T, B, ...)`` as :meth:`~etp_algorithms.ETraceAlgorithm.etrace_grad` takes them,
        ``axis=0`` for one step's inputs ``(B, ...)``.
    mesh : jax.sharding.Mesh
    batch_axis : str
    axis : int
        The batch axis of every leaf.

    Returns
    -------
    pytree of jax.Array
        The same values, each leaf split along ``axis`` over the mesh axis.

    Raises
    ------
    ValueError
        An unknown mesh axis; a leaf without the axis ``axis`` or whose size there is not divisible
        by the mesh axis's size (the message names the leaf and the sizes).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from etp_algorithms import shard_batch
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> xs = shard_batch(jnp.ones((5, 2, 3)), mesh, "data", axis=1)
    >>> xs.shape, tuple(xs.sharding.spec)
    ((5, 2, 3), (None, 'data', None))
    """
    n = _check_mesh(mesh, batch_axis, "shard_batch")
    auto = _auto_mesh(mesh)

    def one(key: Any, leaf: Any) -> jax.Array:
        shape = np.shape(leaf)
        name = f"input{jax.tree_util.keystr(key)}"
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"shard_batch: {name} of shape {shape} has no batch axis {axis}.")
        if shape[axis] % n:
            raise ValueError(
                f"shard_batch: {name} has {shape[axis]} samples on axis {axis} (shape {shape}), not divisible by "
                f"the {n} devices of mesh axis {batch_axis!r}."
            )
        spec = [None] * len(shape)
        spec[axis % len(shape)] = batch_axis  # type: ignore[call-overload]
        return _place(leaf, NamedSharding(auto, PartitionSpec(*spec)))

    return jax.tree_util.tree_map_with_path(one, tree)


def trace_bytes_per_device(learner: Any) -> dict[int, int]:
    """``device id -> bytes`` of the learner's eligibility traces held on each of this process's devices.

    Examples
    --------
    >>> import jax.numpy as jnp, etp_nn
    >>> import etp_algorithms
    >>> from etp_algorithms import trace_bytes_per_device
    >>> learner = etp_algorithms.compile(etp_nn.GRUCell(3, 4), "d_rtrl", jnp.zeros((2, 3)), batch_size=2)
    >>> sum(trace_bytes_per_device(learner).values()) == learner.trace_bytes()
    True
    """
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(learner.etrace.value):
        for piece in leaf.addressable_shards:
            out[piece.device.id] = out.get(piece.device.id, 0) + int(piece.data.nbytes)
    return out
