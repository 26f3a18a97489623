r"""The step as a function of the old hidden states and the relations' trainable inputs.

Rules that carry a total influence :math:`M^t = \mathrm{d}h^t/\mathrm{d}\theta`
(exact RTRL and its approximations) need the *full* transition

.. math::

    h^t = F(h^{t-1}, \theta^t), \qquad
    \theta^t = (\theta_{r,k})_{r, k}\ \text{the trainable input } k \text{ of relation } r,

with the step's arguments and every other state held at this step's values:
its Jacobian :math:`\partial F/\partial h^{t-1}` across positions, states and
groups (not only the position-wise diagonal :math:`D^t` of
:class:`~etp_algorithms.StepValues`), and :math:`\partial F/\partial\theta`.
:func:`hidden_transition` returns :math:`F` as a pure function, for
``jax.jvp`` / ``jax.vjp`` / ``jax.jacfwd``.

With ``wrt='relations'`` (for rules with ``gradient_targets='relations'``)
each relation's trainable input is replaced *in its own equation*: a weight
that feeds two relations is two inputs of :math:`F`, so the influence of each
relation is its own, and the learner's pull-back through the weight
transforms sums them correctly. With ``wrt='weights'`` (for
``gradient_targets='weights'``) :math:`\theta` is every ParamState leaf of the
step, keyed by ``(state path, leaf key path)``: also the weights that reach
the hidden states only through another weight, or through no ETP op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from etp_compiler import StatePath, bind_eqn, eval_eqns, read_atom

from ._executor import StepValues
from ._rule import RuleContext
from ._substeps import output_shift, shifted_bind

__all__ = ["TrainableKey", "hidden_transition", "trainable_inputs"]

#: ``(relation index, trainable key)``: one trainable input of one relation.
TrainableKey = tuple[int, str]

HiddenTransition = Callable[[Mapping[StatePath, jax.Array], Mapping[Any, jax.Array]], dict[StatePath, jax.Array]]

_WRT = ("relations", "weights")


def _check_wrt(wrt: str) -> None:
    if wrt not in _WRT:
        raise ValueError(f"wrt must be one of {_WRT}, got {wrt!r}.")


def trainable_inputs(ctx: RuleContext, values: StepValues, wrt: str = "relations") -> dict[Any, jax.Array]:
    """The inputs :math:`\theta` of :func:`hidden_transition` as this step has them.

    ``wrt='relations'``: ``(relation index, key) -> value`` of every relation's trainable inputs
    (graph order); ``wrt='weights'``: ``(state path, leaf key path) -> value`` of every ParamState
    leaf of the step (``module_info.invar_to_weight_path`` order).
    """
    _check_wrt(wrt)
    if wrt == "weights":
        return {leaf: values.env[var] for var, leaf in ctx.graph.module_info.invar_to_weight_path.items()}
    return {
        (index, key): read_atom(values.env, var)
        for index, relation in enumerate(ctx.graph.hidden_param_op_relations)
        for key, var in relation.trainable_vars.items()
    }


def hidden_transition(ctx: RuleContext, values: StepValues, wrt: str = "relations") -> HiddenTransition:
    r"""The step's new hidden states as a function of the old ones and the relations' trainable inputs.

    Parameters
    ----------
    ctx : RuleContext
        The compiled graph.
    values : StepValues
        The executed step whose arguments and non-hidden states are held fixed.
    wrt : {'relations', 'weights'}
        What :math:`\theta` is: the relations' trainable inputs, keyed by ``(relation index,
        key)``, or the ParamState leaves, keyed by ``(state path, leaf key path)``.

    Returns
    -------
    callable
        ``F(hidden, trainable) -> new hidden``: ``hidden`` maps each hidden path (of
        ``graph.module_info.hidden_path_to_outvar``) to :math:`h^{t-1}` (the state's shape),
        ``trainable`` maps keys of :func:`trainable_inputs` to values of their shapes (a key
        left out keeps this step's value); returns ``path -> h^t``. At ``values``' own hidden
        inputs and :func:`trainable_inputs` it reproduces the step. The trainable input of an op
        inside a ``lax.scan`` kept as a loop (one relation per sub-step) enters to first order, as
        the change of its sub-step's output at this step's input (see ``_substeps``): value and
        first derivatives at this step's inputs are the unrolled step's.

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import ETraceGraphExecutor
    >>> from etp_algorithms.extend import RuleContext, hidden_transition, trainable_inputs
    >>> cell = etp_nn.VanillaRNNCell(2, 3)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> executor = ETraceGraphExecutor(cell)
    >>> ctx = RuleContext(executor.compile_graph(jnp.zeros(2)))
    >>> values = executor.step(executor.current_invals(jnp.ones(2)))
    >>> F = hidden_transition(ctx, values)
    >>> h = {p: cell.h.value for p in ctx.graph.module_info.hidden_path_to_outvar}
    >>> J = jax.jacfwd(lambda h: F(h, trainable_inputs(ctx, values)))(h)
    >>> J[('h',)][('h',)].shape  # dh^t/dh^{t-1}: the full matrix, across positions
    (3, 3)
    """
    _check_wrt(wrt)
    graph = ctx.graph
    minfo = graph.module_info
    jaxpr = minfo.jaxpr
    hidden_paths = list(minfo.hidden_path_to_outvar)
    slots: dict[int, list[tuple[int, TrainableKey]]] = {}
    substeps: dict[int, Any] = {}
    if wrt == "relations":
        for index, relation in enumerate(graph.hidden_param_op_relations):
            if relation.substep is not None:  # one body equation serves every sub-step: see _substeps
                substeps[index] = relation
                continue
            for key, var in relation.trainable_vars.items():
                positions = [i for i, v in enumerate(relation.eqn.invars) if v is var]
                slots.setdefault(id(relation.eqn), []).extend((i, (index, key)) for i in positions)
    leaf_vars = {leaf: var for var, leaf in minfo.invar_to_weight_path.items()} if wrt == "weights" else {}
    known: set[Any] = set(leaf_vars) if wrt == "weights" else {t for entries in slots.values() for _, t in entries}
    known |= {(index, key) for index, relation in substeps.items() for key in relation.trainable_vars}
    # every input of the step (constants and invars, on every jax) as this step bound it
    inputs = {v: values.env[v] for v in (*jaxpr.constvars, *jaxpr.invars)}

    def transition(
        hidden: Mapping[StatePath, jax.Array], trainable: Mapping[Any, jax.Array]
    ) -> dict[StatePath, jax.Array]:
        missing = [p for p in hidden_paths if p not in hidden]
        if missing:
            raise KeyError(f"hidden_transition: no value for the hidden state(s) {missing}.")
        env = dict(inputs)
        for path in hidden_paths:
            env[minfo.hidden_path_to_invar[path]] = hidden[path]
        unknown = [k for k in trainable if k not in known]
        if unknown:
            raise KeyError(
                f"hidden_transition(wrt={wrt!r}): {unknown} are not among its inputs {sorted(known, key=repr)}."
            )
        for leaf, value in trainable.items():
            if wrt == "weights":
                env[leaf_vars[leaf]] = value

        shifts = {}
        for index, relation in substeps.items():
            theta = {key: trainable[(index, key)] for key in relation.trainable_vars if (index, key) in trainable}
            if theta:
                shifts[index] = output_shift(relation, values, theta)
        base = shifted_bind(graph, shifts) if shifts else bind_eqn

        def bind(eqn: Any, args: Sequence[Any]) -> list[Any]:
            replaced = slots.get(id(eqn))
            if replaced:
                args = list(args)
                for position, tkey in replaced:
                    if tkey in trainable:
                        args[position] = trainable[tkey]
            return base(eqn, args)

        eval_eqns(jaxpr.eqns, env, bind=bind)
        return {path: env[minfo.hidden_path_to_outvar[path]] for path in hidden_paths}

    return transition
