"""Helpers for the layer tests: which parameter leaves reach which ETP primitive in a layer's jaxpr."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import brainstate
import jax

import etp_primitives as etp


def _sub_jaxprs(eqn: Any) -> Iterable[Any]:
    for value in eqn.params.values():
        if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
            yield value.jaxpr
        elif hasattr(value, "eqns"):
            yield value


def _reach(jaxpr: Any, tainted: dict[Any, set[str]], found: dict[str, set[str]]) -> dict[Any, set[str]]:
    """Propagate leaf labels forward; record label -> ETP primitive names whose trainable invars they reach."""
    for eqn in jaxpr.eqns:
        labels_in = [tainted.get(v, set()) if not isinstance(v, jax.extend.core.Literal) else set() for v in eqn.invars]
        if etp.is_etp_primitive(eqn.primitive):
            for index in etp.trainable_invars(eqn.primitive, eqn.params).values():
                for label in labels_in[index]:
                    found.setdefault(label, set()).add(eqn.primitive.name)
        subs = list(_sub_jaxprs(eqn))
        for sub in subs:
            if len(sub.invars) == len(eqn.invars):
                inner = {iv: labels_in[i] for i, iv in enumerate(sub.invars) if labels_in[i]}
                _reach(sub, inner, found)
        union = set().union(*labels_in) if labels_in else set()
        if union:
            for out in eqn.outvars:
                tainted[out] = tainted.get(out, set()) | union
    return tainted


def param_leaves_reaching_etp(module: brainstate.nn.Module, *args: Any) -> dict[tuple[Any, ...], set[str]]:
    """For every ParamState leaf of ``module`` (keyed by ``(*state_path, *leaf_path)``), the ETP primitives
    whose trainable inputs it flows into when ``module(*args)`` runs. Leaves that reach none map to ``set()``."""
    sf = brainstate.transform.StatefulFunction(module)
    jaxpr = sf.get_jaxpr(*args)
    states = sf.get_states(*args)
    path_of = {id(state): path for path, state in module.states(brainstate.ParamState).items()}
    invars = list(jaxpr.jaxpr.invars)
    n_args = len(jax.tree.leaves(args))
    position = n_args
    tainted: dict[Any, set[str]] = {}
    labels: list[tuple[Any, ...]] = []
    for state in states:
        leaves = jax.tree_util.tree_flatten_with_path(state.value)[0]
        for leaf_path, _ in leaves:
            if id(state) in path_of:
                label = (*path_of[id(state)], *(getattr(k, "key", getattr(k, "idx", k)) for k in leaf_path))
                labels.append(label)
                tainted[invars[position]] = {label}  # type: ignore[dict-item]
            position += 1
    found: dict[str, set[str]] = {}
    _reach(jaxpr.jaxpr, tainted, found)
    return {label: found.get(label, set()) for label in labels}  # type: ignore[call-overload]
