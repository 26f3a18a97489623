"""The compiler checks every relation's rules on its shapes: a custom rule's mistake is a CompilationError naming it."""

from __future__ import annotations

from typing import Any

import brainstate
import jax.numpy as jnp
import pytest

import etp_compiler
import etp_primitives as etp


def _impl(x: Any, w: Any) -> Any:
    return x @ w


class Leaky(brainstate.nn.Module):
    def __init__(self, op: Any) -> None:
        super().__init__()
        self.op = op
        self.w = brainstate.ParamState(jnp.ones((3, 4)))
        self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

    def update(self, x: Any) -> Any:
        self.h.value = 0.9 * self.h.value + self.op.bind(x, self.w.value)
        return self.h.value


@pytest.mark.parametrize("broken", [False, True])
def test_a_wrong_trace_shape_is_refused_at_compile(broken: bool) -> None:
    name = f"etp_test_compile_checks_rules_{broken}"
    p = etp.register_primitive(name, _impl, batched=True, trainable_invars_fn=lambda params: {"weight": 1})
    try:
        p.register_etp_rules(
            yw_to_w=lambda d, e, **kw: {"weight": e["weight"] * d[..., None, :]},
            xy_to_dw=etp.derive_xy_to_dw(_impl, lambda params: {"weight": 1}, 0),
            init_drtrl=(
                (lambda x, y, ws, n: {"weight": jnp.zeros((4, 3, n))})  # the weight's transpose, no batch axis
                if broken
                else (lambda x, y, ws, n: {k: jnp.zeros((2, *etp.aval_of(v).shape, n)) for k, v in ws.items()})
            ),
            init_pp=etp.init_pp_like_output,
        )
        model = Leaky(p)
        if not broken:
            graph = etp_compiler.compile_etrace_graph(model, jnp.ones((2, 3)))
            assert len(graph.hidden_param_op_relations) == 1
            return
        with pytest.raises(etp_compiler.CompilationError) as caught:
            etp_compiler.compile_etrace_graph(model, jnp.ones((2, 3)))
        message = str(caught.value)
        assert name in message and "rule 'yw_to_w'" in message and "('w',)" in message, message
    finally:
        etp.unregister_primitive(name)
