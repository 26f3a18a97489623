r"""Which weights reach the loss of a step only through their relation's hidden states.

For a trainable input :math:`W` of a relation :math:`y = \mathrm{op}(x, W)`, the
instantaneous gradient of step :math:`t` (with :math:`h^{t-1}` held fixed) is

.. math::

    \frac{\partial L^t}{\partial W}\Big|_{h^{t-1}} = \mathrm{xy\_to\_dw}\big(x^t, \textstyle\sum_s g^t_s D^t_{f,s}\big)
        + (\text{paths from } W \text{ to the outputs that bypass } h^t),

exactly when :math:`y \mapsto h^t` is position-wise (then :math:`D_f` is exact). When
there are no bypassing paths, the learners need not differentiate the step with respect to
:math:`W` at all: the first term is the seed term of the trace contraction, which they
compute anyway. This skips the weight-gradient matmuls of those weights in the backward
pass (for ES_D_RTRL it also skips computing the term only to subtract it again).

The analysis is structural (:func:`etp_compiler.reach`): a scan is followed inside, so an op
inside a scan kept as a loop is judged as its unrolled copies would be; any other equation with
sub-jaxprs passes dependence from every input to every output (conservative).
"""

from __future__ import annotations

from typing import Any

from etp_compiler import ETraceGraph, HiddenParamOpRelation, is_var, reach

__all__ = ["hidden_only_keys", "output_source", "reach"]


def output_source(relation: HiddenParamOpRelation) -> Any:
    """The step variable whose change is a change of the relation's output: ``y``, or a kept scan's delta."""
    return relation.y_var if relation.substep is None else relation.substep.delta_var


def hidden_only_keys(graph: ETraceGraph) -> frozenset[tuple[int, str]]:
    """The relation keys whose weights reach the outputs only through their relations' hidden states.

    Returns ``(relation index, trainable key)`` pairs whose ParamState leaves reach the outputs only
    through their relations' position-wise ``y -> h`` maps (so the step's VJP may skip those leaves).

    Every leaf of such a key is used by no other computation that reaches an output (model
    outputs or any written state), and every relation it feeds reaches only the hidden
    states of its own groups.
    """
    minfo = graph.module_info
    eqns = list(minfo.jaxpr.eqns)
    relations = graph.hidden_param_op_relations
    outputs = {v for v in minfo.out_vars if is_var(v)}
    for outvars in minfo.state_outvars.values():
        outputs.update(v for v in outvars if is_var(v))

    def leaves(index: int, key: str) -> tuple[Any, ...]:
        return tuple(relations[index].weight_fns[key][0].invars)

    users: dict[Any, set[int]] = {}
    for index, relation in enumerate(relations):
        for key in relation.weight_fns:
            for leaf in leaves(index, key):
                users.setdefault(leaf, set()).add(index)

    def leaf_ok(leaf: Any) -> bool:
        indices = users[leaf]
        if not all(all(relations[i].y_to_hidden_positionwise.values()) for i in indices):
            return False
        hidden_out = {
            minfo.hidden_path_to_outvar[path]
            for i in indices
            for group in relations[i].hidden_groups
            for path in group.hidden_paths
        }
        # no path from the leaf to an output that avoids the relations' own equations
        if reach(eqns, {leaf}, stop=set(), cut={id(relations[i].eqn) for i in indices}) & outputs:
            return False
        # each relation's output reaches the outputs only through its groups' hidden states
        for i in indices:
            reached = reach(eqns, {output_source(relations[i])}, stop=hidden_out, cut=set())
            if (reached & outputs) - hidden_out:
                return False
        return True

    ok_leaves = {leaf for leaf in users if leaf_ok(leaf)}
    keys = {
        (index, key)
        for index, relation in enumerate(relations)
        for key in relation.weight_fns
        if leaves(index, key) and all(leaf in ok_leaves for leaf in leaves(index, key))
    }
    # a leaf shared with a key that is not skipped keeps its VJP, so every key using it must keep it too
    while True:
        kept = {
            leaf
            for index, relation in enumerate(relations)
            for key in relation.weight_fns
            if (index, key) not in keys
            for leaf in leaves(index, key)
        }
        shrunk = {(index, key) for index, key in keys if not kept.intersection(leaves(index, key))}
        if shrunk == keys:
            return frozenset(keys)
        keys = shrunk
