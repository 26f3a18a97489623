r"""The graph executor: one model step plus the quantities the eligibility traces need.

For a compiled :class:`etp_compiler.ETraceGraph` and the values of the step's
inputs (arguments and state leaves), :meth:`ETraceGraphExecutor.step` returns

* the model outputs and the new values of every written state;
* per hidden group :math:`g`, the Jacobian blocks
  :math:`D^t_g = \partial h^t / \partial h^{t-1}` (ETP outputs held fixed),
  shape ``(*varshape, S, S)``;
* per relation :math:`r` and connected group, :math:`D^t_{f} = \partial h^t / \partial y_r^t`,
  shape ``(*varshape, S)``, and the op's input :math:`x_r^t`.

Everything is a pure function of values, so it composes with ``jit``,
``vmap`` and ``custom_vjp``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import brainstate
import jax

from etp_compiler import ControlFlowPolicy, ETraceGraph, compile_etrace_graph, read_atom, run_step

__all__ = ["ETraceGraphExecutor", "StepValues", "KeyedValues", "execute_step"]


@jax.tree_util.register_pytree_node_class
class KeyedValues(Mapping[Any, Any]):
    """An insertion-ordered mapping that is a JAX pytree without sorting its keys.

    Keys (jaxpr variables, state paths mixing str and int) need not be
    comparable; they travel as static structure, the values as leaves.
    """

    def __init__(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        self._keys = tuple(keys)
        self._values = list(values)
        self._index = {k: i for i, k in enumerate(self._keys)}

    @classmethod
    def of(cls, mapping: Mapping[Any, Any]) -> KeyedValues:
        return cls(list(mapping.keys()), list(mapping.values()))

    def __getitem__(self, key: Any) -> Any:
        return self._values[self._index[key]]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def tree_flatten(self) -> tuple[list[Any], tuple[Any, ...]]:
        return self._values, self._keys

    @classmethod
    def tree_unflatten(cls, keys: tuple[Any, ...], values: Sequence[Any]) -> KeyedValues:
        return cls(keys, values)


class StepValues(NamedTuple):
    r"""What one executed step produced.

    Attributes
    ----------
    outputs : list
        The model's flattened outputs.
    state_values : dict
        ``state path -> list of new leaf values`` for every written state.
    jacobians : dict
        ``group index -> D`` of shape ``(*varshape, S, S)``.
    hidden_dims : dict
        ``(relation index, group index) -> D_f`` of shape ``(*varshape, S)``.
    x_values : dict
        ``relation index -> x`` (``None`` for input-free primitives).
    y_values : dict
        ``relation index -> y``.
    env : dict
        Every variable of the step jaxpr and its value (for further queries).
    output_cotangents : list or None
        In a rule's ``trace_gradients`` (the backward pass): :math:`\partial L/\partial y^t_{out}`,
        the cotangents of the flattened outputs, in :attr:`outputs` order (for rules that send
        the learning signal by another route than :math:`(\partial y_{out}/\partial h)^\top`,
        such as random feedback). ``None`` in the forward pass.
    """

    outputs: list[Any]
    state_values: KeyedValues
    jacobians: dict[int, jax.Array]
    hidden_dims: dict[tuple[int, int], jax.Array]
    x_values: dict[int, Any]
    y_values: dict[int, Any]
    env: KeyedValues
    output_cotangents: list[Any] | None = None


class ETraceGraphExecutor:
    """Compile a model's step once, then evaluate steps with the trace quantities.

    Parameters
    ----------
    model : brainstate.nn.Module
        With initialised states.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with control flow in the step (default: ``ControlFlowPolicy()``).

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import ETraceGraphExecutor
    >>> cell = etp_nn.VanillaRNNCell(3, 4)
    >>> brainstate.nn.init_all_states(cell)  # doctest: +ELLIPSIS
    VanillaRNNCell(...)
    >>> executor = ETraceGraphExecutor(cell)
    >>> graph = executor.compile_graph(jnp.zeros(3))
    >>> values = executor.step(executor.current_invals(jnp.ones(3)))
    >>> values.jacobians[0].shape
    (4, 1, 1)
    """

    def __init__(self, model: brainstate.nn.Module, control_flow: ControlFlowPolicy | None = None) -> None:
        if not isinstance(model, brainstate.nn.Module):
            raise TypeError(f"ETraceGraphExecutor expects a brainstate.nn.Module, got {type(model).__name__}.")
        if control_flow is not None and not isinstance(control_flow, ControlFlowPolicy):
            raise TypeError(
                f"ETraceGraphExecutor: control_flow must be an etp_compiler.ControlFlowPolicy or None, got "
                f"{type(control_flow).__name__}."
            )
        self.model = model
        self.control_flow = control_flow
        self._graph: ETraceGraph | None = None

    @property
    def graph(self) -> ETraceGraph:
        """The compiled graph; a ``RuntimeError`` before :meth:`compile_graph`."""
        if self._graph is None:
            raise RuntimeError(
                f"ETraceGraphExecutor of {type(self.model).__name__}: call compile_graph(*example_args) first."
            )
        return self._graph

    @property
    def is_compiled(self) -> bool:
        """Whether :meth:`compile_graph` has run."""
        return self._graph is not None

    def compile_graph(self, *args: Any, **kwargs: Any) -> ETraceGraph:
        """Compile the model's step for inputs shaped like ``args`` (see :func:`etp_compiler.compile_etrace_graph`)."""
        self._graph = compile_etrace_graph(self.model, *args, control_flow=self.control_flow, **kwargs)
        return self._graph

    def current_invals(self, *args: Any) -> list[Any]:
        """The step's invar values: flattened ``args`` then the leaves of every state, as stored now."""
        return self.graph.module_info.current_inputs(*args)

    def step(self, invals: Sequence[Any], deltas: Sequence[Any] | None = None) -> StepValues:
        """Evaluate one step on ``invals`` (see :meth:`current_invals`); optionally perturb the new hidden states."""
        return execute_step(self.graph, invals, deltas)


def execute_step(graph: ETraceGraph, invals: Sequence[Any], deltas: Sequence[Any] | None = None) -> StepValues:
    r"""One step of ``graph`` on the step jaxpr's invar values, with the trace quantities (a pure function).

    ``deltas`` (one array per hidden state, in ``module_info.hidden_path_to_outvar`` order) are added to the
    new hidden states, so a VJP with respect to them gives :math:`\partial L/\partial h^t`.
    """
    minfo = graph.module_info
    env = run_step(minfo, invals, deltas)

    def value(atom: Any) -> Any:
        return read_atom(env, atom)

    outputs, new_states = minfo.read_outputs(env)
    state_values = KeyedValues.of(new_states)
    jacobians = {
        group.index: group.jacobian_blocks(
            [env[v] for v in group.hidden_invars], [value(v) for v in group.transition_jaxpr_constvars]
        )
        for group in graph.hidden_groups
    }
    hidden_dims: dict[tuple[int, int], jax.Array] = {}
    x_values: dict[int, Any] = {}
    y_values: dict[int, Any] = {}
    stacked: dict[tuple[int, int], jax.Array] = {}
    for index, relation in enumerate(graph.hidden_param_op_relations):
        sub = relation.substep
        if sub is not None:
            # a sub-step of a scan kept as a loop: its x, y and D_f are slices of the loop's stacks
            x_values[index] = None if relation.x_var is None else env[sub.x_stack_var][sub.index]
            y_values[index] = env[sub.y_stack_var][sub.index]
            for group in relation.hidden_groups:
                key = (id(sub.delta_var), group.index)
                if key not in stacked:
                    _, consts = relation.y_to_hidden[group.index]
                    stacked[key] = relation.substep_hidden_dims(group, env[sub.delta_var], [value(v) for v in consts])
                hidden_dims[(index, group.index)] = stacked[key][sub.index]
            continue
        x_values[index] = None if relation.x_var is None else value(relation.x_var)
        y_values[index] = env[relation.y_var]
        for group in relation.hidden_groups:
            _, consts = relation.y_to_hidden[group.index]
            hidden_dims[(index, group.index)] = relation.hidden_dim(
                group, env[relation.y_var], [value(v) for v in consts]
            )
    return StepValues(outputs, state_values, jacobians, hidden_dims, x_values, y_values, KeyedValues.of(env))
