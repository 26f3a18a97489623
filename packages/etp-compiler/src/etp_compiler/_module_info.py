"""Stage 1: trace one step of a brainstate model and classify its states."""

from __future__ import annotations

import builtins
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import brainstate
import jax

from ._compat import ClosedJaxpr, Jaxpr, JaxprEqn, Var, aval_dtype, aval_shape, trace_stateful
from ._control_flow import ControlFlowPolicy, convert_step_control_flow
from ._errors import CompilationError
from ._eval import read_atom
from ._jaxpr_walk import inline_calls
from ._scan_descent import DescentScan, descent_scans, with_twins

__all__ = ["ModuleInfo", "extract_module_info", "StatePath", "WeightLeaf"]

#: Path of a state in the module tree, e.g. ``('rnn', 'h')``.
StatePath = tuple[Hashable, ...]
#: A ParamState leaf: the state's path and the key path of the leaf inside its value (``()`` for a bare array).
WeightLeaf = tuple[StatePath, tuple[Hashable, ...]]


class ModuleInfo(NamedTuple):
    """One traced step of a model: its jaxpr and the maps between jaxpr variables and states.

    The jaxpr's invars are the flattened arguments followed by the leaves of
    every state the step touches (in :attr:`compiled_model_states` order);
    its outvars are the flattened outputs followed by the new values of the
    written states.

    Attributes
    ----------
    model : brainstate.nn.Module
    closed_jaxpr : ClosedJaxpr
    jaxpr : Jaxpr
        ``closed_jaxpr.jaxpr``.
    stateful_fn : brainstate.transform.StatefulFunction
    compiled_model_states : tuple of brainstate.State
        Every state read or written by the step, in invar order.
    state_paths : dict
        ``id(state) -> path``.
    arg_invars, out_vars : tuple of Var
        The invars of the flattened arguments; the outvars of the flattened outputs.
    out_treedef : PyTreeDef
        Structure of the model's output.
    hidden_states, weight_states, other_states : dict
        ``path -> state`` for HiddenState (and subclasses), ParamState, and everything else.
    hidden_path_to_invar, hidden_path_to_outvar : dict
        ``path -> Var`` of each hidden state's single array leaf, before and after the step.
    invar_to_hidden_path, outvar_to_hidden_path : dict
        The inverse maps.
    weight_path_to_invars : dict
        ``path -> tuple of Var``: the invars of every leaf of a ParamState.
    invar_to_weight_path : dict
        ``Var -> (path, leaf_key_path)``.
    state_invars, state_outvars : dict
        ``path -> tuple of Var`` for every state (outvars only for written states).
    inlined_custom_calls : tuple of str
        ``custom_jvp``/``custom_vjp`` calls inlined because they contain an ETP primitive.
    control_flow_actions : tuple of str
        What was done to each control-flow construct of the step (if-converted, unrolled, left opaque).
    descent_scans : tuple of DescentScan
        The scans of :attr:`jaxpr` kept as loops with the traces propagated through them
        (:mod:`etp_compiler._scan_descent`).

    Notes
    -----
    Nested ``jit`` calls are inlined, so every ETP primitive is an equation of :attr:`jaxpr`.

    The invar order is owned here: :meth:`flatten_inputs` (and :meth:`current_inputs`)
    give the values of :attr:`jaxpr`'s invars, :meth:`read_outputs` and
    :meth:`unflatten_outputs` read the outputs and new states back, and
    :meth:`write_states` stores new states.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import etp_compiler, etp_nn
    >>> cell = etp_nn.ValinaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> minfo = etp_compiler.extract_module_info(cell, jnp.ones(3))
    >>> invals = minfo.current_inputs(jnp.ones(3))
    >>> len(invals) == len(minfo.jaxpr.invars)
    True
    >>> env = etp_compiler.run_step(minfo, invals)
    >>> outputs, new_states = minfo.read_outputs(env)
    >>> minfo.unflatten_outputs(outputs).shape, list(new_states)
    ((4,), [('h',)])
    """

    model: brainstate.nn.Module
    closed_jaxpr: ClosedJaxpr
    jaxpr: Jaxpr
    stateful_fn: Any
    compiled_model_states: tuple[brainstate.State[Any], ...]
    state_paths: dict[int, StatePath]
    arg_invars: tuple[Var, ...]
    out_vars: tuple[Any, ...]
    out_treedef: Any
    hidden_states: dict[StatePath, brainstate.State[Any]]
    weight_states: dict[StatePath, brainstate.State[Any]]
    other_states: dict[StatePath, brainstate.State[Any]]
    hidden_path_to_invar: dict[StatePath, Var]
    hidden_path_to_outvar: dict[StatePath, Var]
    invar_to_hidden_path: dict[Var, StatePath]
    outvar_to_hidden_path: dict[Var, StatePath]
    weight_path_to_invars: dict[StatePath, tuple[Var, ...]]
    invar_to_weight_path: dict[Var, WeightLeaf]
    state_invars: dict[StatePath, tuple[Var, ...]]
    state_outvars: dict[StatePath, tuple[Any, ...]]
    inlined_custom_calls: tuple[str, ...] = ()
    control_flow_actions: tuple[str, ...] = ()
    descent_scans: tuple[DescentScan, ...] = ()

    @property
    def held_eqns(self) -> tuple[JaxprEqn, ...]:
        """The step's equations with each scan kept as a loop replaced by its twin.

        In the twin every trainable ETP output inside the loop is held (``stop_gradient``) before its
        delta is added, so a derivative through it is one with the relations' outputs fixed, as the
        unrolled step's slices have it; values are the step's. Without kept scans: ``jaxpr.eqns``.
        """
        return tuple(with_twins(self.jaxpr.eqns, self.descent_scans))

    # ------------------------------------------------------------------ the invar order
    @property
    def compiled_state_paths(self) -> tuple[StatePath, ...]:
        """The paths of :attr:`compiled_model_states`, in invar order."""
        return tuple(self.state_paths[id(s)] for s in self.compiled_model_states)

    @property
    def other_state_paths(self) -> tuple[StatePath, ...]:
        """The paths of the compiled states that are not ParamStates, in invar order."""
        return tuple(p for p in self.compiled_state_paths if p not in self.weight_states)

    def state_at(self, path: Sequence[Hashable]) -> brainstate.State[Any]:
        """The compiled state at ``path``.

        Raises
        ------
        KeyError
            If the step touches no state at ``path`` (the message lists those it touches).
        """
        key = tuple(path)
        for state in self.compiled_model_states:
            if self.state_paths[id(state)] == key:
                return state
        raise KeyError(
            f"the step of {type(self.model).__name__} touches no state at {_path_text(key)}; its states: "
            + ", ".join(_path_text(p) for p in self.compiled_state_paths)
        )

    def flatten_args(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The leaves of one call's arguments (the first invars of :attr:`jaxpr`).

        Raises
        ------
        ValueError
            If their number differs from the compiled call's.
        """
        leaves = list(jax.tree.leaves((args, kwargs)))
        if len(leaves) != len(self.arg_invars):
            raise ValueError(
                f"the step of {type(self.model).__name__} was compiled for {len(self.arg_invars)} argument leaves, "
                f"got {len(leaves)}; call it with arguments structured like the compiled ones."
            )
        return leaves

    def current_state_leaves(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """The leaves of the states as stored now: ``(weights, others)``.

        ``weights`` has one list per ParamState (:attr:`weight_states` order),
        ``others`` one per other compiled state (:attr:`other_state_paths` order):
        the arguments :meth:`flatten_inputs` takes.
        """
        weights = [list(jax.tree.leaves(state.value)) for state in self.weight_states.values()]
        others = [list(jax.tree.leaves(self.state_at(p).value)) for p in self.other_state_paths]
        return weights, others

    def flatten_inputs(
        self,
        weight_leaves: Mapping[StatePath, Sequence[Any]] | Sequence[Sequence[Any]],
        other_state_leaves: Sequence[Sequence[Any]],
        arg_leaves: Sequence[Any],
    ) -> list[Any]:
        """The values of :attr:`jaxpr`'s invars: the argument leaves, then every compiled state's leaves.

        Parameters
        ----------
        weight_leaves : mapping or sequence
            ``ParamState path -> its leaves``, or one list of leaves per ParamState in
            :attr:`weight_states` order.
        other_state_leaves : sequence
            One list of leaves per other compiled state, in :attr:`other_state_paths` order.
        arg_leaves : sequence
            The leaves of the call's arguments (:meth:`flatten_args`).

        Returns
        -------
        list
            ``[*arg_leaves, *leaves of each state in compiled_model_states order]``.

        Raises
        ------
        ValueError
            If a state is missing, unknown, or given the wrong number of leaves (named by path).
        """
        by_path = self._weight_leaves_by_path(weight_leaves)
        others = list(other_state_leaves)
        other_paths = self.other_state_paths
        if len(others) != len(other_paths):
            raise ValueError(
                f"expected the leaves of {len(other_paths)} non-parameter states "
                f"({', '.join(_path_text(p) for p in other_paths) or 'none'}), got {len(others)}."
            )
        if len(arg_leaves) != len(self.arg_invars):
            raise ValueError(f"expected {len(self.arg_invars)} argument leaves, got {len(arg_leaves)}.")
        by_path.update(zip(other_paths, others, strict=True))
        values = list(arg_leaves)
        for path in self.compiled_state_paths:
            leaves = list(by_path[path])
            if len(leaves) != len(self.state_invars[path]):
                raise ValueError(
                    f"state {_path_text(path)} has {len(self.state_invars[path])} leaves in the step, "
                    f"got {len(leaves)}."
                )
            values.extend(leaves)
        return values

    def current_inputs(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The values of :attr:`jaxpr`'s invars for the call ``model(*args, **kwargs)`` at the states stored now."""
        weights, others = self.current_state_leaves()
        return self.flatten_inputs(weights, others, self.flatten_args(*args, **kwargs))

    def weight_env(
        self, weight_leaves: Mapping[StatePath, Sequence[Any]] | Sequence[Sequence[Any]]
    ) -> builtins.dict[Var, Any]:
        """``ParamState leaf invar -> value`` for the leaves of every ParamState (as :meth:`flatten_inputs` takes them)."""
        by_path = self._weight_leaves_by_path(weight_leaves)
        return {
            var: value
            for path, invars in self.weight_path_to_invars.items()
            for var, value in zip(invars, by_path[path], strict=True)
        }

    def read_outputs(self, env: Mapping[Var, Any]) -> tuple[list[Any], builtins.dict[StatePath, list[Any]]]:
        """From the environment of an evaluated step (:func:`run_step`): ``(output leaves, {path: new state leaves})``.

        The new state leaves are given for every written state (:attr:`state_outvars`).
        """
        outputs = [read_atom(env, v) for v in self.out_vars]
        states = {path: [read_atom(env, v) for v in outvars] for path, outvars in self.state_outvars.items()}
        return outputs, states

    def unflatten_outputs(self, env_or_values: Mapping[Var, Any] | Sequence[Any]) -> Any:
        """The model's output pytree, from a step's environment or from its output leaves."""
        if isinstance(env_or_values, Mapping):
            leaves = [read_atom(env_or_values, v) for v in self.out_vars]
        else:
            leaves = list(env_or_values)
        if len(leaves) != len(self.out_vars):
            raise ValueError(f"the step has {len(self.out_vars)} output leaves, got {len(leaves)}.")
        return jax.tree.unflatten(self.out_treedef.children()[0], leaves)

    def unflatten_state(self, path: Sequence[Hashable], leaves: Sequence[Any]) -> Any:
        """A value for the state at ``path`` with the structure of its current value and the given leaves."""
        state = self.state_at(path)
        return jax.tree.unflatten(jax.tree.structure(state.value), list(leaves))

    def write_states(self, new_states: Mapping[StatePath, Sequence[Any]]) -> None:
        """Store new leaves (``path -> leaves``, as :meth:`read_outputs` gives them) into the model's states."""
        values = {path: self.unflatten_state(path, leaves) for path, leaves in new_states.items()}
        for path, value in values.items():  # every state is checked before any is written
            self.state_at(path).value = value

    def _weight_leaves_by_path(
        self, weight_leaves: Mapping[StatePath, Sequence[Any]] | Sequence[Sequence[Any]]
    ) -> builtins.dict[StatePath, Sequence[Any]]:
        if isinstance(weight_leaves, Mapping):
            by_path = {tuple(p): v for p, v in weight_leaves.items()}
            unknown = [p for p in by_path if p not in self.weight_states]
            if unknown:
                raise ValueError(
                    f"{', '.join(_path_text(p) for p in unknown)}: not a ParamState of the step; its ParamStates: "
                    + (", ".join(_path_text(p) for p in self.weight_states) or "none")
                )
        else:
            if len(weight_leaves) != len(self.weight_states):
                raise ValueError(
                    f"expected the leaves of {len(self.weight_states)} ParamStates, got {len(weight_leaves)}."
                )
            by_path = dict(zip(self.weight_states, weight_leaves, strict=True))
        missing = [p for p in self.weight_states if p not in by_path]
        if missing:
            raise ValueError(f"no leaves given for the ParamState(s) {', '.join(_path_text(p) for p in missing)}.")
        return by_path

    def dict(self) -> builtins.dict[str, Any]:
        """The fields as a plain ``dict`` (name -> value), e.g. for printing."""
        return {**self._asdict()}


def _key_name(key: Any) -> Hashable:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return getattr(key, attribute)  # type: ignore[no-any-return]
    return str(key)


def _leaf_paths(value: Any) -> list[tuple[Hashable, ...]]:
    return [tuple(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(value)[0]]


def _path_text(path: Sequence[Hashable]) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def _hidden_positions(
    traced: ClosedJaxpr,
    states: Sequence[brainstate.State[Any]],
    write_ids: set[int],
    args: Any,
    kwargs: Any,
) -> dict[int, int]:
    """``outvar position -> invar position`` of every written single-array HiddenState."""
    n_written = sum(len(jax.tree.leaves(s.value)) for s in states if id(s) in write_ids)
    in_position = len(jax.tree.leaves((args, kwargs)))
    out_position = len(traced.jaxpr.outvars) - n_written
    positions: dict[int, int] = {}
    for state in states:
        n_leaves = len(jax.tree.leaves(state.value))
        if id(state) in write_ids:
            if isinstance(state, brainstate.HiddenState) and n_leaves == 1:
                positions[out_position] = in_position
            out_position += n_leaves
        in_position += n_leaves
    return positions


def extract_module_info(
    model: brainstate.nn.Module, *args: Any, control_flow: ControlFlowPolicy | None = None, **kwargs: Any
) -> ModuleInfo:
    """Trace ``model(*args, **kwargs)`` once and classify the states it touches.

    Parameters
    ----------
    model : brainstate.nn.Module
        A model with initialised states (``brainstate.nn.init_all_states``).
    *args, **kwargs
        Example inputs of one step (only shapes and dtypes matter).
    control_flow : ControlFlowPolicy, optional
        What to do with ``cond`` / ``scan`` / ``while`` in the step that touch a hidden state or
        hold an ETP op (default: ``ControlFlowPolicy()``: if-convert conds, unroll scans of up to
        16 iterations, refuse data-dependent while loops); see :mod:`etp_compiler._control_flow`.

    Returns
    -------
    ModuleInfo

    Raises
    ------
    CompilationError
        If the model has no hidden state, a hidden state is not a single
        array, a hidden state is read but never written, a hidden state is
        written with its own old value or a constant, or a state is not
        reachable from the model's attributes.
    TypeError
        If ``model`` is not a brainstate module.

    Notes
    -----
    Every hidden state's new value is a distinct variable produced by an
    equation of :attr:`ModuleInfo.jaxpr`: a state set to another state's old
    value, to an input, or to the same value as another hidden state gets a
    ``copy`` equation of its own (where its perturbation is added).
    """
    if not isinstance(model, brainstate.nn.Module):
        raise TypeError(f"extract_module_info expects a brainstate.nn.Module, got {type(model).__name__}.")
    stateful_fn, traced, states, write_ids, out_treedef = trace_stateful(model, *args, **kwargs)
    own_outputs = _hidden_positions(traced, states, write_ids, args, kwargs)
    closed_jaxpr, inlined_custom_calls = inline_calls(traced, own_outputs)
    closed_jaxpr, control_flow_actions = convert_step_control_flow(closed_jaxpr, own_outputs, control_flow)
    jaxpr = closed_jaxpr.jaxpr

    all_states = model.states()
    assert not isinstance(all_states, tuple)  # no filters given: a single FlattedDict
    state_paths = {id(state): path for path, state in all_states.items()}
    for state in states:
        if id(state) not in state_paths:
            raise CompilationError(
                f"the step uses a {type(state).__name__} of shape "
                f"{jax.tree.map(lambda v: getattr(v, 'shape', ()), state.value)} that is not an attribute of the "
                "model (a global or closed-over state); make it an attribute of a module so it has a path."
            )

    n_arg_leaves = len(jax.tree.leaves((args, kwargs)))
    invars = list(jaxpr.invars)
    arg_invars = tuple(invars[:n_arg_leaves])
    n_out = len(jaxpr.outvars) - sum(len(jax.tree.leaves(s.value)) for s in states if id(s) in write_ids)
    out_vars = tuple(jaxpr.outvars[:n_out])

    hidden_states: dict[StatePath, brainstate.State[Any]] = {}
    weight_states: dict[StatePath, brainstate.State[Any]] = {}
    other_states: dict[StatePath, brainstate.State[Any]] = {}
    state_invars: dict[StatePath, tuple[Var, ...]] = {}
    state_outvars: dict[StatePath, tuple[Any, ...]] = {}
    position, out_position = n_arg_leaves, n_out
    for state in states:
        path = state_paths[id(state)]
        n_leaves = len(jax.tree.leaves(state.value))
        state_invars[path] = tuple(invars[position : position + n_leaves])
        position += n_leaves
        if id(state) in write_ids:
            state_outvars[path] = tuple(jaxpr.outvars[out_position : out_position + n_leaves])
            out_position += n_leaves
        if isinstance(state, brainstate.HiddenState):
            hidden_states[path] = state
        elif isinstance(state, brainstate.ParamState):
            weight_states[path] = state
        else:
            other_states[path] = state

    if not hidden_states:
        raise CompilationError(
            "the model has no hidden state: online learning needs at least one brainstate.HiddenState that the "
            "step reads and writes (e.g. the membrane potential or the recurrent activity). States seen: "
            + (", ".join(f"{_path_text(state_paths[id(s)])} ({type(s).__name__})" for s in states) or "none")
            + "."
        )

    produced = {v for eqn in jaxpr.eqns for v in eqn.outvars}
    hidden_path_to_invar: dict[StatePath, Var] = {}
    hidden_path_to_outvar: dict[StatePath, Var] = {}
    for path in hidden_states:
        if len(state_invars[path]) != 1:
            raise CompilationError(
                f"hidden state {_path_text(path)} holds {len(state_invars[path])} arrays; each "
                "brainstate.HiddenState must hold a single array (or a saiunit Quantity). Split it into "
                "several HiddenStates."
            )
        if path not in state_outvars:
            raise CompilationError(
                f"hidden state {_path_text(path)} is read but never written by the step; a HiddenState must be "
                "updated every step (use a ShortTermState or ParamState for values that do not evolve)."
            )
        (hidden_path_to_invar[path],) = state_invars[path]
        (outvar,) = state_outvars[path]
        if not isinstance(outvar, Var) or outvar not in produced:
            what = "its own old value" if outvar is hidden_path_to_invar[path] else "a constant"
            raise CompilationError(
                f"hidden state {_path_text(path)} is written with {what}, a value that the step does not "
                "compute; it has no dynamics to learn through (use a ShortTermState or ParamState for it)."
            )
        hidden_path_to_outvar[path] = outvar

    for path, outvars in state_outvars.items():
        for invar, outvar in zip(state_invars[path], outvars, strict=True):
            old_shape, new_shape = aval_shape(invar), aval_shape(outvar)
            old_dtype, new_dtype = aval_dtype(invar), aval_dtype(outvar)
            if old_shape == new_shape and old_dtype != new_dtype:
                raise CompilationError(
                    f"state {_path_text(path)} changes dtype within one step, from {old_dtype} to {new_dtype} "
                    f"(inputs: {[str(aval_dtype(v)) for v in arg_invars]}); feed inputs of the state's dtype, "
                    "cast the new value (e.g. .astype(old.dtype)), or initialise states in the wider dtype "
                    "(brainstate.environ.set(precision=64))."
                )
            if old_shape != new_shape:
                raise CompilationError(
                    f"state {_path_text(path)} changes shape within one step, from {old_shape} to {new_shape}, "
                    f"for inputs of shapes {[aval_shape(v) for v in arg_invars]}; the step must keep every "
                    "state's shape (initialise states for this batch size with "
                    "brainstate.nn.init_all_states(model, batch_size=...))."
                )

    weight_path_to_invars = {path: state_invars[path] for path in weight_states}
    invar_to_weight_path: dict[Var, WeightLeaf] = {}
    for path, state in weight_states.items():
        for var, leaf in zip(state_invars[path], _leaf_paths(state.value), strict=True):
            invar_to_weight_path[var] = (path, leaf)

    return ModuleInfo(
        model=model,
        closed_jaxpr=closed_jaxpr,
        jaxpr=jaxpr,
        stateful_fn=stateful_fn,
        compiled_model_states=states,
        state_paths={id(s): state_paths[id(s)] for s in states},
        arg_invars=arg_invars,
        out_vars=out_vars,
        out_treedef=out_treedef,
        hidden_states=hidden_states,
        weight_states=weight_states,
        other_states=other_states,
        hidden_path_to_invar=hidden_path_to_invar,
        hidden_path_to_outvar=hidden_path_to_outvar,
        invar_to_hidden_path={v: p for p, v in hidden_path_to_invar.items()},
        outvar_to_hidden_path={v: p for p, v in hidden_path_to_outvar.items()},
        weight_path_to_invars=weight_path_to_invars,
        invar_to_weight_path=invar_to_weight_path,
        state_invars=state_invars,
        state_outvars=state_outvars,
        inlined_custom_calls=tuple(inlined_custom_calls),
        control_flow_actions=tuple(control_flow_actions),
        descent_scans=descent_scans(jaxpr),
    )
