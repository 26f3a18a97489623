r"""A learning rule that is not in the library, written against the public extension API only.

D-RTRL with a forgetting factor :math:`\lambda \in [0, 1]`: the propagated part
of each trace is scaled by :math:`\lambda` at every step,

.. math::

    \epsilon^t_s = \lambda \sum_{s'} \mathrm{yw\_to\_w}(D^t_{ss'}, \epsilon^{t-1}_{s'})
                   + \mathrm{drtrl\_seed}(x^t, D^t_{f,s}, W),
    \qquad
    \frac{\partial L^t}{\partial W} \approx \sum_s \mathrm{drtrl\_grad}(x^t, g^t_s, \epsilon^t_s, W),

so that the influence of step :math:`t-k` on the gradient decays like
:math:`\lambda^k` on top of the model's own dynamics. :math:`\lambda = 1` is
D-RTRL; :math:`\lambda = 0` keeps only the instantaneous term (truncation to
one step). The docs page *Writing a learning rule* walks through this module.

Run ``python examples/forgetting_d_rtrl.py`` to train a leaky RNN with it and
compare with D-RTRL (``--quick``: a short run).
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import brainstate
import jax
import jax.numpy as jnp

from etp_algorithms import ETraceAlgorithm
from etp_algorithms.extend import (
    LearningRule,
    RuleContext,
    StepValues,
    extra_axes,
    host_zeros,
    relation_weights,
    rule_shapes,
    stack_states,
)
from etp_compiler import NotSupportedError
from etp_primitives.extend import drtrl_grad, drtrl_seed, require_rules


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Trace:
    """The trace of one relation toward one hidden group: ``key -> eps`` with the S states on the last axis."""

    relation: int = field(metadata={"static": True})
    group: int = field(metadata={"static": True})
    eps: dict[str, jax.Array]


def forgetting_d_rtrl(forget: float) -> LearningRule:
    """D-RTRL whose propagated traces are scaled by ``forget`` at every step."""
    if not 0.0 <= forget <= 1.0:
        raise ValueError(f"forgetting_d_rtrl: forget must lie in [0, 1], got {forget}.")

    def pairs(ctx: RuleContext) -> Any:
        for index, relation in enumerate(ctx.graph.hidden_param_op_relations):
            for group in relation.hidden_groups:
                yield index, relation, group

    def init_traces(ctx: RuleContext) -> tuple[Trace, ...]:
        traces = []
        for index, relation, group in pairs(ctx):
            if extra_axes(relation, group):
                raise NotSupportedError(f"forgetting_d_rtrl: {relation.primitive} broadcasts over the batch.")
            init = require_rules(relation.primitive, "init_drtrl")["init_drtrl"]
            shapes = rule_shapes(init, relation.x_var, relation.y_var, relation.trainable_vars, group.num_state)
            traces.append(Trace(index, group.index, {k: host_zeros(s.shape, s.dtype) for k, s in shapes.items()}))
        return tuple(traces)

    def per_state(fn: Any, num_state: int) -> dict[str, jax.Array]:
        """``fn(s)`` for every state, stacked on a trailing S axis."""
        parts = [fn(s) for s in range(num_state)]
        return {k: jnp.stack([p[k] for p in parts], axis=-1) for k in parts[0]}

    def propagate(relation: Any, D: jax.Array, eps: dict[str, jax.Array], s: int) -> dict[str, jax.Array]:
        r"""``lambda * sum_s' yw_to_w(D_ss', eps_s')`` for state ``s``."""
        yw_to_w = require_rules(relation.primitive, "yw_to_w")["yw_to_w"]
        S = D.shape[-1]
        terms = [
            yw_to_w(D[..., s, s2], {k: v[..., s2] for k, v in eps.items()}, **relation.eqn_params) for s2 in range(S)
        ]
        return {k: forget * sum(t[k] for t in terms) for k in eps}

    def seed_of(relation: Any, x: Any, Df: jax.Array, w: Any, s: int) -> dict[str, jax.Array]:
        return drtrl_seed(relation.primitive, x, Df[..., s], w, relation.eqn_params)

    def update_traces(ctx: RuleContext, traces: tuple[Trace, ...], values: StepValues) -> tuple[Any, Any]:
        new, propagated = [], []
        for trace, (index, relation, group) in zip(traces, pairs(ctx), strict=True):
            D, Df = values.jacobians[group.index], values.hidden_dims[(index, group.index)]
            x, w, S = values.x_values[index], relation_weights(relation, values), group.num_state
            bar = per_state(partial(propagate, relation, D, trace.eps), S)
            seed = per_state(partial(seed_of, relation, x, Df, w), S)
            new.append(Trace(index, group.index, {k: bar[k] + seed[k] for k in bar}))
            propagated.append(bar)
        # the backward pass needs the new traces and their propagated part
        return tuple(new), (tuple(new), tuple(propagated))

    def trace_gradients(ctx: RuleContext, residual: Any, values: StepValues, dL_dh: Any) -> dict[int, Any]:
        grads: dict[int, dict[str, jax.Array]] = {}
        for trace, bar, (index, relation, group) in zip(*residual, pairs(ctx), strict=True):
            g = stack_states(group, dL_dh)
            x, w = values.x_values[index], relation_weights(relation, values)
            # the step's VJP holds the seed term, except for the keys it skipped (their whole trace is used)
            eps = {k: trace.eps[k] if ctx.keeps_instantaneous(index, k) else bar[k] for k in trace.eps}
            total = grads.setdefault(index, {})
            for s in range(group.num_state):
                part = drtrl_grad(
                    relation.primitive, x, g[..., s], {k: v[..., s] for k, v in eps.items()}, w, relation.eqn_params
                )
                for k, v in part.items():
                    total[k] = total[k] + v if k in total else v
        return grads

    return LearningRule("forgetting_D_RTRL", init_traces, update_traces, trace_gradients)


def _train_step(learner: Any, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """One online step: the gradient of this step's loss, applied at once (SGD)."""
    g, loss = brainstate.transform.grad(lambda x, y: jnp.mean((learner(x) - y) ** 2), params, return_value=True)(x, y)
    for path, state in params.items():
        state.value = jax.tree.map(lambda p, d: p - 0.05 * d, state.value, g[path])
    return loss


def main() -> None:
    import etp_nn
    from etp_algorithms import D_RTRL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*non-parametric-tail")  # the GRU's reset gate: no trace, by design
    steps, epochs = (20, 30) if args.quick else (50, 200)
    xs = jnp.sin(jnp.linspace(0, 6.0, steps))[:, None, None] * jnp.ones((steps, 4, 2))
    targets = jnp.roll(xs[..., :1], 3, axis=0)

    class Net(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = etp_nn.GRUCell(2, 16)
            self.out = etp_nn.Linear(16, 1)

        def update(self, x: jax.Array) -> jax.Array:
            return self.out(self.rnn(x))

    print(f"{'learner':<22}{'first loss':>12}{'last loss':>12}")
    for name, make in [
        ("D_RTRL", lambda m: D_RTRL(m)),
        ("forgetting 0.9", lambda m: ETraceAlgorithm(m, forgetting_d_rtrl(0.9))),
        ("forgetting 0.0", lambda m: ETraceAlgorithm(m, forgetting_d_rtrl(0.0))),
    ]:
        brainstate.random.seed(0)
        model = Net()
        brainstate.nn.init_all_states(model, batch_size=4)
        learner = make(model)
        learner.compile_graph(xs[0])
        train_step = brainstate.transform.jit(partial(_train_step, learner, model.states(brainstate.ParamState)))
        losses = []
        for _ in range(epochs):
            learner.reset_state()
            for state in model.states(brainstate.HiddenState).values():
                state.value = jnp.zeros_like(state.value)
            losses.append(sum(float(train_step(x, y)) for x, y in zip(xs, targets, strict=True)) / steps)
        print(f"{name:<22}{losses[0]:>12.4f}{losses[-1]:>12.4f}")


if __name__ == "__main__":
    main()
