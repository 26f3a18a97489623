r"""Stage 4: the hidden-state perturbation :math:`h^t = \hat h^t + \Delta`.

The step is re-traced with one extra input :math:`\Delta` per hidden state,
added where the new state is produced, so that
:math:`\partial L^t / \partial \Delta = \partial L^t / \partial h^t`: the
cotangent :math:`g^t` that the online learners contract with their traces,
:math:`\partial L^t / \partial W \approx \sum_s g^t_s\, \epsilon^t_s`.

Which computations see the perturbed value is fixed by what the traces
already hold. The traces are total derivatives along every path that avoids
trainable ETP primitives: the transition :math:`h^{t-1} \to h^t` and the
:math:`y \to h` maps of the relations both run through the other new hidden
states of the step (an LSTM's :math:`h^t = o \odot \phi(c^t)` reads
:math:`c^t`). So :math:`\Delta` reaches

* the model's outputs and every non-hidden computation (e.g. a readout);
* the inputs of trainable ETP primitives, and through them everything
  downstream, hidden states included (the next layer of a stack reads
  :math:`h^t` through its weight: that path is in no trace);

but not the other hidden states' new values along ETP-free paths, which see
:math:`\hat h^t` (counting those paths in :math:`g` too would count them twice).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any, NamedTuple

import brainstate
import jax

from ._compat import ClosedJaxpr, Var, aval_dtype, aval_shape
from ._eval import bind_eqn, bind_inputs, eval_jaxpr_env, is_var, read_atom
from ._jaxpr_walk import is_trainable_etp
from ._module_info import ModuleInfo, StatePath

__all__ = ["HiddenPerturbation", "add_hidden_perturbation_from_minfo", "run_step"]


def run_step(minfo: ModuleInfo, invals: Sequence[Any], deltas: Sequence[Any] | None = None) -> dict[Var, Any]:
    r"""Evaluate the step jaxpr on its invars' values; returns the environment of every variable.

    With ``deltas`` (one per hidden state, in ``hidden_path_to_outvar`` order)
    each new hidden state gets its perturbation added where it is produced;
    the environment then holds the perturbed values (those the outputs see),
    and each hidden state's new value is :math:`\hat h^t + \Delta` with
    :math:`\hat h^t` computed as described in the module docstring.
    """
    jaxpr = minfo.jaxpr
    if deltas is None:
        return eval_jaxpr_env(jaxpr, minfo.closed_jaxpr.consts, *invals)
    env = bind_inputs(jaxpr, minfo.closed_jaxpr.consts, invals)
    add = dict(zip(minfo.hidden_path_to_outvar.values(), deltas, strict=True))
    # `hidden` holds, where it differs from `env`, the value that the hidden states' computation sees
    # (downstream of a new hidden state along ETP-free paths: without the perturbation).
    hidden: dict[Var, Any] = {}
    for eqn in jaxpr.eqns:
        outs = bind_eqn(eqn, [read_atom(env, v) for v in eqn.invars])
        hidden_outs = outs
        if not is_trainable_etp(eqn) and any(is_var(v) and v in hidden for v in eqn.invars):
            hidden_outs = bind_eqn(
                eqn, [read_atom(hidden if is_var(v) and v in hidden else env, v) for v in eqn.invars]
            )
        for var, value, hidden_value in zip(eqn.outvars, outs, hidden_outs, strict=True):
            if not is_var(var):
                continue
            if var in add:
                env[var], hidden[var] = hidden_value + add[var], hidden_value
            else:
                env[var] = value
                if hidden_value is not value:
                    hidden[var] = hidden_value
    return env


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

    def dict(self) -> builtins.dict[str, Any]:
        """The fields as a plain ``dict`` (name -> value), e.g. for printing."""
        return {**self._asdict()}


def add_hidden_perturbation_from_minfo(minfo: ModuleInfo) -> HiddenPerturbation:
    """Build the step jaxpr with a perturbation input added to every new hidden state."""
    paths = tuple(minfo.hidden_path_to_outvar)
    invar_avals = [
        jax.ShapeDtypeStruct(aval_shape(v), aval_dtype(v), weak_type=getattr(v.aval, "weak_type", False))
        for v in minfo.jaxpr.invars
    ]
    delta_avals = [
        jax.ShapeDtypeStruct(aval_shape(minfo.hidden_path_to_outvar[p]), aval_dtype(minfo.hidden_path_to_outvar[p]))
        for p in paths
    ]
    n_in = len(invar_avals)

    def perturbed(*values: Any) -> list[Any]:
        env = run_step(minfo, values[:n_in], values[n_in:])
        return [read_atom(env, v) for v in minfo.jaxpr.outvars]

    closed = jax.make_jaxpr(perturbed)(*invar_avals, *delta_avals)
    return HiddenPerturbation(
        perturb_vars=tuple(closed.jaxpr.invars[n_in:]),
        perturb_hidden_paths=paths,
        perturb_hidden_states=tuple(minfo.hidden_states[p] for p in paths),
        perturb_jaxpr=closed,
    )
