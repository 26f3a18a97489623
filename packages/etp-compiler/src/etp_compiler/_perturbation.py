r"""Stage 4: the hidden-state perturbation :math:`h^t = \hat h^t + \Delta`.

The step is re-traced with one extra input :math:`\Delta` per hidden state,
added where the new state is produced (so everything downstream in the step,
e.g. a readout, sees the perturbed value). Then
:math:`\partial L^t / \partial \Delta = \partial L^t / \partial h^t`: the
cotangent that the online learners contract with their traces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import brainstate
import jax

from ._compat import ClosedJaxpr, Var
from ._jaxpr_walk import eval_eqns, is_var
from ._module_info import ModuleInfo, StatePath

__all__ = ["HiddenPerturbation", "add_hidden_perturbation_from_minfo", "run_step"]


def run_step(
    minfo: ModuleInfo, invals: Sequence[Any], deltas: Sequence[Any] | None = None
) -> dict[Var, Any]:
    """Evaluate the step jaxpr on its invars' values; returns the environment of every variable.

    With ``deltas`` (one per hidden state, in ``hidden_path_to_outvar`` order)
    each new hidden state gets its perturbation added where it is produced.
    """
    jaxpr = minfo.jaxpr
    env: dict[Var, Any] = dict(zip(jaxpr.constvars, minfo.closed_jaxpr.consts, strict=True))
    env.update(zip(jaxpr.invars, invals, strict=True))
    if deltas is None:
        return eval_eqns(jaxpr.eqns, env)
    add = dict(zip(minfo.hidden_path_to_outvar.values(), deltas, strict=True))
    return eval_eqns(jaxpr.eqns, env, override=lambda v, value: value + add[v] if v in add else value)


class HiddenPerturbation(NamedTuple):
    """The perturbed step.

    Attributes
    ----------
    perturb_vars : tuple of Var
        The :math:`\\Delta` invars of :attr:`perturb_jaxpr` (last invars), one per hidden state.
    perturb_hidden_paths : tuple of state paths
    perturb_hidden_states : tuple of brainstate.HiddenState
    perturb_jaxpr : ClosedJaxpr
        The step with invars ``(*step invars, *perturb_vars)`` and the step's outvars.
    """

    perturb_vars: tuple[Var, ...]
    perturb_hidden_paths: tuple[StatePath, ...]
    perturb_hidden_states: tuple[brainstate.State[Any], ...]
    perturb_jaxpr: ClosedJaxpr


def add_hidden_perturbation_from_minfo(minfo: ModuleInfo) -> HiddenPerturbation:
    """Build the step jaxpr with a perturbation input added to every new hidden state."""
    paths = tuple(minfo.hidden_path_to_outvar)
    invar_avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type) for v in minfo.jaxpr.invars]
    delta_avals = [
        jax.ShapeDtypeStruct(minfo.hidden_path_to_outvar[p].aval.shape, minfo.hidden_path_to_outvar[p].aval.dtype)
        for p in paths
    ]
    n_in = len(invar_avals)

    def perturbed(*values: Any) -> list[Any]:
        env = run_step(minfo, values[:n_in], values[n_in:])
        return [env[v] if is_var(v) else v.val for v in minfo.jaxpr.outvars]

    closed = jax.make_jaxpr(perturbed)(*invar_avals, *delta_avals)
    return HiddenPerturbation(
        perturb_vars=tuple(closed.jaxpr.invars[n_in:]),
        perturb_hidden_paths=paths,
        perturb_hidden_states=tuple(minfo.hidden_states[p] for p in paths),
        perturb_jaxpr=closed,
    )
