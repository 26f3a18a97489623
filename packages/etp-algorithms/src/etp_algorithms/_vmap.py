"""``ETraceVmap``: a per-sample learner run over a batch with ``brainstate.transform.vmap``."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, cast

import brainstate
import jax
import jax.numpy as jnp

from ._driver import SequenceDriverMixin
from ._learner import ETraceAlgorithm

__all__ = ["ETraceVmap"]


def _per_sample(path: Any, state: Any) -> bool:
    """The default mapped states: every state but the parameters (hidden states, traces, counters)."""
    return not isinstance(state, brainstate.ParamState)


def _states(module: brainstate.nn.Module, filter_: Any) -> Mapping[Any, brainstate.State[Any]]:
    """``path -> state`` of ``module``'s states that pass one brainstate filter."""
    return cast(Mapping[Any, brainstate.State[Any]], module.states(filter_))


def _text(path: Sequence[Hashable]) -> str:
    return ".".join(map(str, path))


def _shapes(value: Any) -> list[tuple[int, ...]]:
    return [tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(value)]


def _by_axis(mapped: list[tuple[brainstate.State[Any], int]]) -> dict[int, list[brainstate.State[Any]]]:
    by_axis: dict[int, list[brainstate.State[Any]]] = {}
    for state, axis in mapped:
        by_axis.setdefault(axis, []).append(state)
    return by_axis


class _Batching:
    """The mapped states, their axes and per-sample leaf shapes (a plain holder, not part of the state graph)."""

    def __init__(self, mapped: list[tuple[brainstate.State[Any], int]]) -> None:
        self.mapped = mapped
        self.sample_shapes = {id(state): _shapes(state.value) for state, _ in mapped}
        self.size: int | None = None


class ETraceVmap(SequenceDriverMixin, brainstate.nn.Vmap):
    """A per-sample learner (or any module) called on batches: ``brainstate.transform.vmap`` over the batch.

    The wrapped module is *per sample*: its model's states were initialised
    without a batch axis and (for a learner) its graph compiled with one
    sample. ETraceVmap gives the mapped states (by default every state but the
    parameters: hidden states, the learner's :class:`EligibilityTrace`, other
    counters) a leading batch axis, copying the per-sample values to every
    lane, and each call runs the module once per sample, in one vmapped
    program. The parameters are shared, so a gradient taken through a call
    sums over the batch, exactly as for a learner of the batched model.
    Built by :func:`etp_algorithms.compile` with ``vmap=True``. It drives
    sequences as a learner does (:meth:`~SequenceDriverMixin.etrace_grad`,
    :meth:`~SequenceDriverMixin.etrace_evolve`; time-major inputs ``(T, batch, ...)``,
    no ``chunk_size`` windows), and is a ``brainstate.nn.Vmap`` (``.module`` is the learner).

    Parameters
    ----------
    module : brainstate.nn.Module
        The per-sample learner (compiled) or module.
    in_axes, out_axes
        As for ``brainstate.transform.vmap``: the batch axis of the inputs and outputs.
    vmap_states : filter or dict, optional
        The states with a batch axis: a brainstate filter (axis 0) or ``{filter: axis}``.
        Default: every state of ``module`` that is not a ``ParamState``, axis 0.
    vmap_out_states : filter or dict, optional
        The written states returned with a batch axis; defaults to ``vmap_states``'s
        default when ``vmap_states`` is not given.
    axis_name : hashable, optional
    axis_size : int, optional
        The batch size. The states get their batch axis now when it is given,
        otherwise at the first call (from the inputs' batch axis).

    Notes
    -----
    A mapped state whose value is per-sample again (e.g. after the learner's
    ``reset_state()``) gets its batch axis back at the next call. Build a new
    ETraceVmap after compiling the learner again.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import D_RTRL, ETraceVmap
    >>> cell = etp_nn.ValinaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)       # per sample: h has shape (4,)
    >>> learner = D_RTRL(cell)
    >>> _ = learner.compile_graph(jnp.zeros(3))
    >>> batched = ETraceVmap(learner, axis_size=5)
    >>> batched(jnp.ones((5, 3))).shape, cell.h.value.shape
    ((5, 4), (5, 4))
    """

    def __init__(
        self,
        module: brainstate.nn.Module,
        in_axes: int | None | Sequence[Any] = 0,
        out_axes: Any = 0,
        vmap_states: Any = None,
        vmap_out_states: Any = None,
        axis_name: Hashable | None = None,
        axis_size: int | None = None,
    ) -> None:
        if not isinstance(module, brainstate.nn.Module):
            raise TypeError(f"ETraceVmap expects a brainstate.nn.Module, got {type(module).__name__}.")
        if isinstance(module, ETraceAlgorithm) and not module.is_compiled:
            raise ValueError(
                f"ETraceVmap: the learner {type(module).__name__} is not compiled; call "
                "learner.compile_graph(*one_sample_inputs) on the per-sample model first."
            )
        if axis_size is not None and (isinstance(axis_size, bool) or not isinstance(axis_size, int) or axis_size < 1):
            raise ValueError(f"ETraceVmap: axis_size must be a positive int, got {axis_size!r}.")
        if vmap_states is None:
            vmap_states = _per_sample
            if vmap_out_states is None:
                vmap_out_states = _per_sample
        super().__init__(module, in_axes=in_axes, out_axes=out_axes, axis_name=axis_name, axis_size=axis_size)
        mapped = self._mapped_states(module, vmap_states)
        mapped_out = None if vmap_out_states is None else self._mapped_states(module, vmap_out_states)
        self._batching = _Batching(mapped)
        self._vmap_args = (in_axes, out_axes, _by_axis(mapped), None if mapped_out is None else _by_axis(mapped_out))
        self._modulated: dict[Any, Any] = {}
        # The states declared by instance, {axis: [states]} (brainstate.nn.Vmap's own filter form maps a
        # single {filter: axis} entry wrongly on brainstate 0.5.4 and 0.6).
        self.vmapped_fn = brainstate.transform.vmap(
            module,
            in_axes=in_axes,
            out_axes=out_axes,
            in_states=_by_axis(mapped),
            out_states=None if mapped_out is None else _by_axis(mapped_out),
            axis_name=axis_name,
            axis_size=axis_size,
        )
        if axis_size is not None:
            self._batch_states(axis_size)

    @staticmethod
    def _mapped_states(module: brainstate.nn.Module, spec: Any) -> list[tuple[brainstate.State[Any], int]]:
        pairs = list(spec.items()) if isinstance(spec, dict) else [(spec, 0)]
        mapped: list[tuple[brainstate.State[Any], int]] = []
        seen: set[int] = set()
        for filter_, axis in pairs:
            if isinstance(axis, bool) or not isinstance(axis, int):
                raise TypeError(f"ETraceVmap: vmap_states maps a filter to its axis (an int), got {axis!r}.")
            for state in _states(module, filter_).values():
                if id(state) not in seen:
                    seen.add(id(state))
                    mapped.append((state, axis))
        return mapped

    # ---------------------------------------------------------------- the sequence driver's hooks
    _seq_is_vmapped = True

    @property
    def _seq_param_states(self) -> Any:
        module: Any = self.module
        return module.param_states if isinstance(module, ETraceAlgorithm) else module.states(brainstate.ParamState)

    @property
    def _seq_vjp_method(self) -> str | None:
        return getattr(self.module, "vjp_method", None)

    def _seq_token(self) -> Hashable:
        module: Any = self.module
        return id(module.graph) if getattr(module, "is_compiled", False) else None

    @property
    def batch_size(self) -> int | None:
        """The batch size (``None`` until given or seen at the first call)."""
        return self._batching.size

    def _path(self, state: brainstate.State[Any]) -> str:
        for path, candidate in _states(self.module, ...).items():
            if candidate is state:
                return _text(path)
        return type(state).__name__

    def _batch_states(self, size: int) -> None:
        """Give every per-sample mapped state its batch axis (size ``size``); check the others have it."""
        batching = self._batching
        if batching.size is not None and batching.size != size:
            raise ValueError(
                f"ETraceVmap: the states carry a batch of {batching.size}, the inputs a batch of {size}; "
                "build a new ETraceVmap for another batch size."
            )
        updates = []
        for state, axis in batching.mapped:
            shapes, sample = _shapes(state.value), batching.sample_shapes[id(state)]
            batched = [(*s[:axis], size, *s[axis:]) for s in sample]
            if shapes == batched:
                continue
            if shapes != sample:
                raise ValueError(
                    f"ETraceVmap: state {self._path(state)} has leaf shapes {shapes}; expected the per-sample "
                    f"{sample} or the batched {batched}. Build a new ETraceVmap after compiling the learner again."
                )
            updates.append((state, axis))
        for state, axis in updates:
            state.value = jax.tree.map(
                lambda v, axis=axis: jnp.moveaxis(jnp.broadcast_to(v, (size, *jnp.shape(v))), 0, axis), state.value
            )
        batching.size = size

    def _batch_size_of(self, args: tuple[Any, ...]) -> int:
        axes = self.in_axes
        per_arg = [axes] * len(args) if axes is None or isinstance(axes, int) else list(axes)
        for arg, axis in zip(args, per_arg):
            if isinstance(axis, int) and not isinstance(axis, bool):
                leaves = jax.tree.leaves(arg)
                if leaves:
                    return int(jnp.shape(leaves[0])[axis])
        raise ValueError("ETraceVmap: cannot tell the batch size from these inputs and in_axes; pass axis_size=... .")

    def update(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module on each sample of the batch; return the outputs with their batch axis.

        ``modulator=`` (a :class:`~etp_algorithms.ThreeFactor` learner's third factor) is split per
        sample: each leaf with a leading axis of the batch size is mapped along it, the others
        (a scalar reward, a per-unit array) go to every sample whole.
        """
        size = self._batching.size if self._batching.size is not None else self._batch_size_of(args)
        self._batch_states(size)
        modulator = kwargs.pop("modulator", None)
        if modulator is None:
            return self.vmapped_fn(*args, **kwargs)
        if not isinstance(self.module, ETraceAlgorithm):
            raise TypeError(f"ETraceVmap: modulator= is for a learner; the module is a {type(self.module).__name__}.")
        return self._modulated_fn(args, modulator, size)(*args, modulator, **kwargs)

    def _modulated_fn(self, args: tuple[Any, ...], modulator: Any, size: int) -> Any:
        """A vmapped call of the learner with the modulator as a last positional input (built once per layout)."""
        in_axes, out_axes, in_states, out_states = self._vmap_args
        per_arg = [in_axes] * len(args) if in_axes is None or isinstance(in_axes, int) else list(in_axes)
        mod_axes = jax.tree.map(lambda v: 0 if jnp.ndim(v) >= 1 and jnp.shape(v)[0] == size else None, modulator)
        key = (len(args), jax.tree.structure(modulator), tuple(jax.tree.leaves(mod_axes)), size)
        if key not in self._modulated:
            module = self.module

            def call(*inputs: Any, **kwargs: Any) -> Any:
                return module(*inputs[:-1], modulator=inputs[-1], **kwargs)

            self._modulated[key] = brainstate.transform.vmap(
                call,
                in_axes=(*per_arg, mod_axes),
                out_axes=out_axes,
                in_states=in_states,
                out_states=out_states,
                axis_name=self.axis_name,
                axis_size=size,
            )
        return self._modulated[key]
