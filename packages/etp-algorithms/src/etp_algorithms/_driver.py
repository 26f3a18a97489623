r"""Sequence drivers: :meth:`~SequenceDriverMixin.etrace_grad` and :meth:`~SequenceDriverMixin.etrace_evolve`.

A learner driven over a time-major sequence :math:`x^0, \dots, x^{T-1}` in
**one compiled program**: a ``scan`` over time inside one ``jit``, the hidden
states and eligibility traces carried by the loop, the gradient accumulated in
the carry. The program is built once per call signature (the ``step_fn``, the
options, the shapes) and reused, so a second call with the same shapes does
not trace again. States are written back once, after the program ran; a call
that fails (a bad argument, a ``step_fn`` of the wrong contract) changes none.

The user's ``step_fn`` runs the model itself (``learner(x_t)``) and returns the
loss :math:`\ell^t` of the step; with per-step weights :math:`c^t` (``mask``
times the optional per-step ``weights``) the driver returns the learner's online
estimate of the gradient of

.. math::

    L_\mathrm{sum} = \sum_t c^t \ell^t, \qquad
    L_\mathrm{mean} = \frac{\sum_t c^t \ell^t}{\max(\sum_t m^t, 1)},

that is :math:`\sum_t c^t\, \widehat{\partial \ell^t/\partial\theta}` (divided
by the mask's total weight for ``'mean'``), where
:math:`\widehat{\partial \ell^t/\partial\theta}` is the learner's online
gradient of step :math:`t` (exact reverse mode inside a window with
``chunk_size``). Memory is independent of :math:`T`.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ._compat import inside_staging
from ._inputs import MultiStepData, SingleStepData

__all__ = ["SequenceDriverMixin"]

_REDUCTIONS = ("mean", "sum")
_LOSS_OUTPUTS = ("per_step", "masked", "scalar")
_CACHE_SIZE = 32


def _is_wrapper(x: Any) -> bool:
    return isinstance(x, (SingleStepData, MultiStepData))


def _chunk(chunk_size: Any) -> int | None:
    """``None`` or an int ``>= 2`` (``1`` is the plain step-by-step path, as in braintrace 0.2.8)."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be None or a Python int, got {type(chunk_size).__name__} ({chunk_size!r}).")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (the window length in steps), got {chunk_size}.")
    return None if chunk_size == 1 else int(chunk_size)


def _length(sequences: tuple[Any, ...]) -> int:
    """The common leading (time) length of every leaf of every sequence; a ValueError naming a mismatch."""
    if not sequences:
        raise ValueError(
            "etrace_grad/etrace_evolve need at least one time-major sequence (it defines T), "
            "e.g. learner.etrace_grad(xs, ys, step_fn=step_loss)."
        )
    length: int | None = None
    origin = ""
    for pos, seq in enumerate(sequences):
        if any(_is_wrapper(leaf) for leaf in jax.tree.leaves(seq, is_leaf=_is_wrapper)):
            raise TypeError(
                f"sequence {pos} is (or holds) a SingleStepData/MultiStepData: the driver slices the raw "
                "time-major arrays along axis 0; wrap the slices inside step_fn instead."
            )
        leaves = jax.tree_util.tree_leaves_with_path(seq)
        if not leaves:
            raise ValueError(f"sequence {pos} holds no array to take the time length T from.")
        for path, leaf in leaves:
            shape = jnp.shape(leaf)
            name = f"sequence {pos}{jax.tree_util.keystr(path)}"
            if not shape:
                raise ValueError(f"{name} is a scalar: it has no leading time axis (close over constants in step_fn).")
            if length is None:
                length, origin = int(shape[0]), name
            elif shape[0] != length:
                raise ValueError(
                    f"the sequences must share their leading (time) length: {origin} has T={length}, "
                    f"but {name} has {shape[0]}."
                )
    assert length is not None
    if length == 0:
        raise ValueError("the sequences are empty (T = 0): there is no step to drive.")
    return length


def _step_weights(value: Any, length: int, name: str) -> jax.Array | None:
    """``None`` or a ``(T,)``/``(T, B)`` array of per-step weights; a ValueError naming the expected shape."""
    if value is None:
        return None
    arr = jnp.asarray(value)
    if arr.ndim not in (1, 2) or arr.shape[0] != length:
        raise ValueError(
            f"{name} must have shape (T,) = ({length},) (one weight per step) or (T, B) = ({length}, B) "
            f"(one per step and sample), got {arr.shape}."
        )
    return arr


def _is_state_set(weights: Any) -> bool:
    if isinstance(weights, brainstate.State):
        return True
    if isinstance(weights, Mapping):
        return all(isinstance(v, brainstate.State) for v in weights.values())
    if isinstance(weights, (list, tuple)):
        return bool(weights) and all(isinstance(v, brainstate.State) for v in weights)
    return False


def _zeros_like_values(states: Any) -> Any:
    if isinstance(states, brainstate.State):
        return jax.tree.map(jnp.zeros_like, states.value)
    if isinstance(states, Mapping):
        return {k: jax.tree.map(jnp.zeros_like, s.value) for k, s in states.items()}
    return [jax.tree.map(jnp.zeros_like, s.value) for s in states]


def _like(states: Any, grads: Any) -> Any:
    """``grads`` (as ``brainstate.transform.grad`` returns them) in the accumulator's container."""
    if isinstance(states, brainstate.State):
        return grads
    if isinstance(states, Mapping):
        return {k: grads[k] for k in states}
    return list(grads)


def _windows(tree: Any, n: int, k: int) -> Any:
    """Leaves ``(T, ...) -> (n, k, ...)`` for the first ``n k`` steps."""
    return jax.tree.map(lambda a: jnp.reshape(a[: n * k], (n, k, *jnp.shape(a)[1:])), tree)


def _tail(tree: Any, start: int) -> Any:
    return jax.tree.map(lambda a: a[start:], tree)


def _append(stacked: Any, last: Any, what: str) -> Any:
    """Stack the ragged last window's value under the full windows' ``(n, ...)`` stack."""
    treedef: Any = jax.tree.structure(stacked)
    same = bool(treedef == jax.tree.structure(last))
    if not same or any(
        jnp.shape(a)[1:] != jnp.shape(b) for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(last), strict=True)
    ):
        raise ValueError(
            f"{what} of the ragged last window differs in shape from a full window's, so the windows' "
            f"{what} cannot be stacked; pick a chunk_size that divides T, or return {what} of a shape "
            "independent of the window length."
        )
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), stacked, last)


def _flat(losses: Any, n: int, k: int) -> Any:
    return jnp.reshape(losses, (n * k, *jnp.shape(losses)[2:]))


def _progress_windows(progress_chunk: Any, length: int, k: int | None) -> int:
    """The steps per eagerly run chunk of ``progress=True``: ``progress_chunk`` (default ``ceil(T / 100)``),
    rounded up to a multiple of the window length ``k``; a ValueError naming a bad value."""
    if progress_chunk is None:
        size = -(-length // 100)
    elif isinstance(progress_chunk, bool) or not isinstance(progress_chunk, (int, np.integer)) or progress_chunk < 1:
        raise ValueError(f"progress_chunk must be None or a positive int (steps per chunk), got {progress_chunk!r}.")
    else:
        size = int(progress_chunk)
    return size if k is None else -(-size // k) * k


def _refuse_progress_in_jit(method: str) -> None:
    if inside_staging():
        raise ValueError(
            f"{method}(progress=True) runs the sequence eagerly, one compiled program per chunk, to update a "
            "progress bar between chunks; it cannot do that inside jit (or another staging transform). "
            "Drop progress=True there (the whole sequence is then one program), or call it outside jit."
        )


def _bar(method: str, length: int) -> Any:
    return tqdm.tqdm(total=length, desc=method, unit="step", file=sys.stderr, leave=True, dynamic_ncols=True)


def _slice(sequences: tuple[Any, ...], start: int, stop: int) -> tuple[Any, ...]:
    return tuple(jax.tree.map(lambda a: a[start:stop], seq) for seq in sequences)


def _cat(parts: list[Any], what: str) -> Any:
    """Concatenate the chunks' stacked ``what`` along axis 0 (a ValueError, as :func:`_append`, on a mismatch)."""
    treedef: Any = jax.tree.structure(parts[0])
    shapes = [jnp.shape(a)[1:] for a in jax.tree.leaves(parts[0])]
    for part in parts[1:]:
        if jax.tree.structure(part) != treedef or [jnp.shape(a)[1:] for a in jax.tree.leaves(part)] != shapes:
            raise ValueError(
                f"{what} of the ragged last window differs in shape from a full window's, so the windows' "
                f"{what} cannot be stacked; pick a chunk_size that divides T, or return {what} of a shape "
                "independent of the window length."
            )
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


class _Programs:
    """The jitted programs of a host (a plain holder: not part of the module's state graph)."""

    def __init__(self) -> None:
        self.cache: OrderedDict[Hashable, Any] = OrderedDict()


class SequenceDriverMixin:
    r"""``etrace_grad`` and ``etrace_evolve``: drive a learner over a whole sequence in one compiled program.

    Mixed into :class:`~etp_algorithms.ETraceAlgorithm` (every learner has the two
    methods). A host supplies three hooks, with defaults for a learner:

    * ``_seq_call`` -- the callable that runs one step or window (default ``self``);
    * ``_seq_param_states`` -- the default ParamStates to differentiate (default ``self.param_states``);
    * ``_seq_vjp_method`` -- ``'single-step'``, ``'multi-step'`` or ``None`` (default ``self.vjp_method``).

    A host that maps the time axis as a batch axis (a vmapped learner) sets
    ``_seq_is_vmapped = True``; window mode is then refused.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> from etp_algorithms import D_RTRL
    >>> class Leaky(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState({"weight": jnp.full((2, 3), 0.5)})
    ...         self.h = brainstate.HiddenState(jnp.zeros(3))
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + etp.matmul(x, self.w.value["weight"])
    ...         return self.h.value
    >>> learner = D_RTRL(Leaky())
    >>> _ = learner.compile_graph(jnp.zeros(2))
    >>> xs, ys = jnp.ones((5, 2)), jnp.zeros((5, 3))
    >>> def step_loss(x, y):
    ...     return jnp.sum((learner(x) - y) ** 2)
    >>> grads, losses = learner.etrace_grad(xs, ys, step_fn=step_loss, return_value=True)
    >>> grads[("w",)]["weight"].shape, losses.shape
    ((2, 3), (5,))
    >>> learner.etrace_evolve(xs, return_outputs=True).shape
    (5, 3)
    """

    _seq_is_vmapped: bool = False

    # ---------------------------------------------------------------- hooks
    @property
    def _seq_call(self) -> Callable[..., Any]:
        return self  # type: ignore[return-value]

    @property
    def _seq_param_states(self) -> Any:
        return self.param_states  # type: ignore[attr-defined]

    @property
    def _seq_vjp_method(self) -> str | None:
        return getattr(self, "vjp_method", None)

    def _seq_token(self) -> Hashable:
        """Changes when the host's compiled step changes (the cached programs are then rebuilt)."""
        return id(self.graph) if getattr(self, "is_compiled", False) else None  # type: ignore[attr-defined]

    def _seq_program(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The jitted program of ``key``, built once (a small LRU cache per host)."""
        holder = self.__dict__.get("_seq_programs")
        if not isinstance(holder, _Programs):
            holder = self.__dict__["_seq_programs"] = _Programs()
        cache = holder.cache
        key = (self._seq_token(), key)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        program = cache[key] = build()
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
        return program

    def _seq_check_window(self, chunk_size: int | None, for_grad: bool) -> None:
        if chunk_size is None:
            return
        if self._seq_is_vmapped:
            raise ValueError(
                f"chunk_size={chunk_size} (window mode) is not supported on a vmapped learner: its in_axes=0 "
                "would map the window's time axis as the batch axis. Use the batched (non-vmapped) learner, "
                "or chunk_size=None."
            )
        if for_grad and self._seq_vjp_method != "multi-step":
            raise ValueError(
                f"chunk_size={chunk_size} (windows of exact reverse mode) needs a learner built with "
                f"vjp_method='multi-step'; this {type(self).__name__} has vjp_method={self._seq_vjp_method!r}. "
                "Build it with vjp_method='multi-step', or drive with chunk_size=None "
                "(etrace_evolve accepts windows on either)."
            )

    # ---------------------------------------------------------------- etrace_grad
    def etrace_grad(
        self,
        *sequences: Any,
        step_fn: Callable[..., Any],
        mask: Any = None,
        chunk_size: int | None = None,
        weights: Any = None,
        reduction: str = "mean",
        loss_output: str = "per_step",
        has_aux: bool = False,
        return_value: bool = False,
        progress: bool = False,
        progress_chunk: int | None = None,
    ) -> Any:
        r"""Accumulated online gradients of a per-step loss over a whole sequence (one compiled program).

        Parameters
        ----------
        *sequences : pytrees of arrays
            Time-major: every leaf has the leading length :math:`T`. Sliced in lockstep and
            passed to ``step_fn`` positionally (``seq[t]``, or ``seq[t:t+k]`` with ``chunk_size=k``).
            Not :class:`SingleStepData`/:class:`MultiStepData` (wrap inside ``step_fn``).
        step_fn : callable
            ``step_fn(*slices) -> loss`` (``(loss, aux)`` with ``has_aux``). It runs the model
            itself, calling this learner exactly once (the call advances the hidden states and
            traces). ``loss``: a scalar; shape ``(B,)`` (one loss per sample) when ``mask`` or
            ``weights`` is ``(T, B)``; with ``chunk_size=k`` a leading axis of the window's
            length, ``(k,)``/``(k, B)`` (``(r,)`` for a ragged last window of ``r = T mod k``
            steps), and the model's inputs wrapped in :class:`MultiStepData`. Define it once:
            the compiled program is cached per ``step_fn``.
        mask : array, optional
            ``(T,)`` or ``(T, B)`` weights :math:`m^t` of the steps' losses (``0`` excludes a
            padded step); ``None``: all ones. Only the loss is gated: the model and the traces
            run every step, so a zero-weighted step still shapes later steps' gradients.
        chunk_size : int, optional
            ``None`` or ``1``: step by step. ``k >= 2``: windows of ``k`` steps with exact
            reverse mode inside a window and the traces across windows (``k = T`` from reset
            traces is BPTT); needs ``vjp_method='multi-step'``. :math:`T` need not be a multiple
            of ``k``: the last window is shorter.
        weights : optional
            braintrace 0.2.8's meaning: the ParamStates to differentiate (a mapping ``path ->
            ParamState``, a ParamState, or a list of them); default: the learner's
            ``param_states``. An array instead is a per-step weight :math:`w^t` (``(T,)`` or
            ``(T, B)``), multiplied into the loss weights: :math:`c^t = m^t w^t`.
        reduction : {'mean', 'sum'}
            ``'sum'``: :math:`L = \sum_t c^t \ell^t`. ``'mean'``: the same divided by
            :math:`\max(\sum_t m^t, 1)` (the mask's total weight: the number of unmasked steps,
            or step-samples for a ``(T, B)`` mask; :math:`T` (:math:`TB`) without a mask; never
            the per-step weights).
        loss_output : {'per_step', 'masked', 'scalar'}
            With ``return_value``: the raw losses :math:`\ell^t` (shape ``(T,)``, ``(T, B)``),
            the weighted :math:`c^t \ell^t` (same shape), or :math:`L` (a scalar).
        has_aux : bool
            ``step_fn`` returns ``(loss, aux)``; the aux are stacked over steps (over windows with
            ``chunk_size``: leading axis :math:`\lceil T/k \rceil`).
        return_value : bool
            Also return the losses (see ``loss_output``).
        progress : bool
            Show a ``tqdm`` progress bar (on ``sys.stderr``) over the steps. The sequence is then
            run eagerly in chunks of ``progress_chunk`` steps, each chunk one compiled program,
            the states and traces carried from chunk to chunk and written after each; the gradients,
            losses and aux equal those of one program (up to the order of the floating-point sums).
            Refused (``ValueError``) inside ``jit``, where nothing runs eagerly: drop it there.
        progress_chunk : int, optional
            Steps per chunk with ``progress=True`` (default :math:`\lceil T/100 \rceil`, so at most
            100 bar updates), rounded up to a multiple of ``chunk_size``. Ignored without ``progress``.

        Returns
        -------
        grads, or (grads, losses), (grads, aux), (grads, losses, aux)
            As ``brainstate.transform.grad``: ``grads`` is ``path -> gradient`` (in the container
            of ``weights``), :math:`\partial L/\partial\theta` as the learner estimates it online
            (exact for an exact rule in its regime, e.g. D_RTRL on leaky integrators).

        Raises
        ------
        TypeError
            ``chunk_size`` not an int; a sequence that is a ``SingleStepData``/``MultiStepData``.
        ValueError
            No sequence, sequences of different lengths or empty; ``mask``/``weights`` not
            ``(T,)``/``(T, B)``; ``chunk_size <= 0``; ``chunk_size >= 2`` on a learner without
            ``vjp_method='multi-step'``; an unknown ``reduction``/``loss_output``; a loss of the
            wrong shape; ``progress=True`` inside ``jit``, a bad ``progress_chunk``. Nothing is
            changed by a failed call (with ``progress``, by a call failing in its first chunk).

        Notes
        -----
        The hidden states and traces end advanced over the whole sequence (written back once,
        after the program ran). Use :meth:`etrace_evolve` for a long unsupervised prefix rather
        than a mask of zeros (a masked step still costs its backward pass).

        Examples
        --------
        See :class:`SequenceDriverMixin`.
        """
        program, args = self._etrace_grad_program(
            *sequences,
            step_fn=step_fn,
            mask=mask,
            chunk_size=chunk_size,
            weights=weights,
            reduction=reduction,
            loss_output=loss_output,
            has_aux=has_aux,
            return_value=return_value,
        )
        if not progress:
            return program(*args)
        _refuse_progress_in_jit("etrace_grad")
        length = _length(sequences)
        size = _progress_windows(progress_chunk, length, _chunk(chunk_size))
        m_arr = args[1]
        per_step = weights is not None and not _is_state_set(weights)
        acc: Any = None
        total: Any = 0.0
        losses: list[Any] = []
        auxes: list[Any] = []
        with _bar("etrace_grad", length) as bar:
            for start in range(0, length, size):
                stop = min(start + size, length)
                out = self.etrace_grad(
                    *_slice(sequences, start, stop),
                    step_fn=step_fn,
                    mask=None if mask is None else m_arr[start:stop],
                    chunk_size=chunk_size,
                    weights=jnp.asarray(weights)[start:stop] if per_step else weights,
                    reduction="sum",
                    loss_output=loss_output,
                    has_aux=has_aux,
                    return_value=True,
                )
                grads, value = out[0], out[1]
                acc = grads if acc is None else jax.tree.map(jnp.add, acc, grads)
                if loss_output == "scalar":
                    total = total + value
                else:
                    losses.append(value)
                if has_aux:
                    auxes.append(out[2])
                bar.update(stop - start)
        if reduction == "mean":
            denom = jnp.maximum(jnp.sum(m_arr), 1.0)
            acc = jax.tree.map(lambda g: g / denom.astype(jnp.result_type(g)), acc)
            total = total / denom
        result: list[Any] = [acc]
        if return_value:
            result.append(total if loss_output == "scalar" else _cat(losses, "the losses"))
        if has_aux:
            result.append(_cat(auxes, "aux"))
        return result[0] if len(result) == 1 else tuple(result)

    def _etrace_grad_program(
        self,
        *sequences: Any,
        step_fn: Callable[..., Any],
        mask: Any,
        chunk_size: int | None,
        weights: Any,
        reduction: str,
        loss_output: str,
        has_aux: bool,
        return_value: bool,
    ) -> tuple[Any, tuple[Any, ...]]:
        """The cached jitted program of an :meth:`etrace_grad` call and its arguments (checked, not run)."""
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}.")
        if loss_output not in _LOSS_OUTPUTS:
            raise ValueError(f"loss_output must be one of {list(_LOSS_OUTPUTS)}, got {loss_output!r}.")
        if not callable(step_fn):
            raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}.")
        k = _chunk(chunk_size)
        length = _length(sequences)
        self._seq_check_window(k, for_grad=True)
        m = _step_weights(mask, length, "mask")
        if weights is None or _is_state_set(weights):
            states = self._seq_param_states if weights is None else weights
            w = None
        elif isinstance(weights, (Mapping, list, tuple)):
            raise TypeError(
                "weights must be the ParamStates to differentiate (a ParamState, a mapping path -> ParamState, "
                f"or a list of them) or an array of per-step weights; got a {type(weights).__name__} holding "
                "something else."
            )
        else:
            states, w = self._seq_param_states, _step_weights(weights, length, "weights (per-step weights)")
        if m is not None and w is not None and m.shape != w.shape:
            raise ValueError(f"mask {m.shape} and per-step weights {w.shape} must have the same shape.")
        lanes = max(m.ndim if m is not None else 1, w.ndim if w is not None else 1) == 2
        m_arr = jnp.ones((length,) if w is None else w.shape) if m is None else m
        c_arr = m_arr * (1.0 if w is None else w)
        state_key = (
            ("one", id(states))
            if isinstance(states, brainstate.State)
            else tuple((p, id(s)) for p, s in states.items())
            if isinstance(states, Mapping)
            else tuple(id(s) for s in states)
        )
        key = ("grad", step_fn, k, reduction, loss_output, has_aux, return_value, lanes, length, state_key)

        def build() -> Any:
            return brainstate.transform.jit(
                _grad_program(step_fn, states, k, length, lanes, reduction, loss_output, has_aux, return_value)
            )

        return self._seq_program(key, build), (sequences, m_arr, c_arr)

    # ---------------------------------------------------------------- etrace_evolve
    def etrace_evolve(
        self,
        *sequences: Any,
        step_fn: Callable[..., Any] | None = None,
        chunk_size: int | None = None,
        return_outputs: bool = False,
        progress: bool = False,
        progress_chunk: int | None = None,
    ) -> Any:
        r"""Advance the hidden states and traces over a sequence, computing no gradient (one compiled program).

        Parameters
        ----------
        *sequences : pytrees of arrays
            Time-major, as in :meth:`etrace_grad`.
        step_fn : callable, optional
            ``step_fn(*slices) -> output``, calling this learner once. ``None``: the learner is
            called with the slices (as :class:`SingleStepData` on a multi-step learner; as
            :class:`MultiStepData` windows with ``chunk_size``).
        chunk_size : int, optional
            ``k >= 2``: windows of ``k`` steps (on either ``vjp_method``: no loss is
            differentiated); the last window may be shorter. ``None``/``1``: step by step.
            The states end the same either way.
        return_outputs : bool
            ``False``: return ``None`` (no output memory). ``True``: the outputs stacked over
            steps, leading axis :math:`T` (over windows with ``chunk_size``, leading axis
            :math:`\lceil T/k \rceil`, each window's outputs ``(k, ...)``; a ragged last window
            must then give outputs of a full window's shape).
        progress, progress_chunk
            As in :meth:`etrace_grad`: a ``tqdm`` bar on ``sys.stderr``, the sequence run eagerly
            in chunks (each one compiled program, states carried); refused inside ``jit``.

        Returns
        -------
        None or the stacked outputs

        Raises
        ------
        TypeError, ValueError
            As :meth:`etrace_grad` for the sequences, ``chunk_size`` and ``progress``.

        Examples
        --------
        See :class:`SequenceDriverMixin`.
        """
        k = _chunk(chunk_size)
        length = _length(sequences)
        self._seq_check_window(k, for_grad=False)
        if progress:
            _refuse_progress_in_jit("etrace_evolve")
            size = _progress_windows(progress_chunk, length, k)
            outs: list[Any] = []
            with _bar("etrace_evolve", length) as bar:
                for start in range(0, length, size):
                    stop = min(start + size, length)
                    out = self.etrace_evolve(
                        *_slice(sequences, start, stop),
                        step_fn=step_fn,
                        chunk_size=chunk_size,
                        return_outputs=return_outputs,
                    )
                    outs.append(out)
                    bar.update(stop - start)
            return _cat(outs, "the outputs") if return_outputs else None
        if step_fn is not None and not callable(step_fn):
            raise TypeError(f"step_fn must be callable or None, got {type(step_fn).__name__}.")
        if step_fn is None:
            call = self._seq_call
            multi = self._seq_vjp_method == "multi-step"

            def run(*slices: Any) -> Any:
                wrap = MultiStepData if k is not None else SingleStepData if multi else None
                return call(*(slices if wrap is None else [wrap(s) for s in slices]))

            fn: Callable[..., Any] = run
        else:
            fn = step_fn
        key = ("evolve", step_fn, k, return_outputs, length)
        program = self._seq_program(
            key, lambda: brainstate.transform.jit(_evolve_program(fn, k, length, return_outputs))
        )
        return program(sequences)


def _grad_program(
    step_fn: Callable[..., Any],
    states: Any,
    k: int | None,
    length: int,
    lanes: bool,
    reduction: str,
    loss_output: str,
    has_aux: bool,
    return_value: bool,
) -> Callable[..., Any]:
    """The function of ``(sequences, mask, loss_weights)`` that :meth:`etrace_grad` jits."""
    keep_losses = return_value and loss_output != "scalar"

    def objective(slices: Any, c: Any) -> Any:
        result = step_fn(*slices)
        if has_aux:
            if not (isinstance(result, (tuple, list)) and len(result) == 2):
                raise ValueError(f"has_aux=True: step_fn must return (loss, aux), got {type(result).__name__}.")
            loss, aux = result
        else:
            loss, aux = result, None
        want = jnp.shape(c)
        if jnp.shape(loss) != want:
            steps = f"a leading window axis of {want[0]} steps" if k is not None else "no time axis"
            kind = "one loss per sample (B,)" if lanes else "a scalar loss"
            raise ValueError(
                f"step_fn must return {kind} with {steps}: expected shape {want}, got {jnp.shape(loss)}"
                + (" (reduce over the batch and feature axes inside step_fn)" if not lanes else "")
                + "."
            )
        c = c.astype(jnp.result_type(loss)) if jnp.issubdtype(jnp.result_type(loss), jnp.floating) else c
        weighted = jnp.sum(c * loss)
        return weighted, (weighted, loss, aux)

    grad_fn = brainstate.transform.grad(objective, states, has_aux=True)

    def one(slices: Any, c: Any) -> Any:
        grads, (weighted, loss, aux) = grad_fn(slices, c)
        return _like(states, grads), weighted, loss, aux

    def body(carry: Any, xs: Any) -> Any:
        acc, total = carry
        grads, weighted, loss, aux = one(*xs)
        ys = (loss if keep_losses else None, aux)
        return (jax.tree.map(jnp.add, acc, grads), total + weighted), ys

    def program(sequences: Any, m: Any, c: Any) -> Any:
        size = 1 if k is None else k
        n, r = divmod(length, size)
        xs = (sequences, c) if k is None else (_windows(sequences, n, size), _windows(c, n, size))
        acc, total = _zeros_like_values(states), jnp.zeros((), jnp.result_type(c))
        losses: Any = None
        aux: Any = None
        if n:
            (acc, total), (losses, aux) = brainstate.transform.scan(body, (acc, total), xs)
            if keep_losses and k is not None:
                losses = _flat(losses, n, size)
        if r:
            grads, weighted, loss, last_aux = one(_tail(sequences, n * size), c[n * size :])
            acc, total = jax.tree.map(jnp.add, acc, grads), total + weighted
            if keep_losses:
                losses = loss if n == 0 else jnp.concatenate([losses, loss])
            if has_aux:
                aux = jax.tree.map(lambda b: b[None], last_aux) if n == 0 else _append(aux, last_aux, "aux")
        if reduction == "mean":
            denom = jnp.maximum(jnp.sum(m), 1.0)
            acc = jax.tree.map(lambda g: g / denom.astype(jnp.result_type(g)), acc)
            total = total / denom
        out: list[Any] = [acc]
        if return_value:
            out.append(total if loss_output == "scalar" else losses * c if loss_output == "masked" else losses)
        if has_aux:
            out.append(aux)
        return out[0] if len(out) == 1 else tuple(out)

    return program


def _evolve_program(fn: Callable[..., Any], k: int | None, length: int, return_outputs: bool) -> Callable[..., Any]:
    """The function of ``sequences`` that :meth:`etrace_evolve` jits."""

    def body(*slices: Any) -> Any:
        out = fn(*slices)
        return out if return_outputs else None

    def program(sequences: Sequence[Any]) -> Any:
        size = 1 if k is None else k
        n, r = divmod(length, size)
        xs = sequences if k is None else _windows(tuple(sequences), n, size)
        outs = brainstate.transform.for_loop(body, *xs) if n else None
        if r:
            last = body(*_tail(tuple(sequences), n * size))
            if return_outputs:
                outs = jax.tree.map(lambda b: b[None], last) if n == 0 else _append(outs, last, "the outputs")
        return outs if return_outputs else None

    return program
