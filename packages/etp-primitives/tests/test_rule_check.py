"""``check_rules``: a primitive's rules evaluated abstractly on one equation's shapes, each mistake named."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import pytest

import etp_primitives as etp
from etp_primitives.extend import ETPRuleError, check_rules

F = jnp.float32
X, Y, W, B = (jax.ShapeDtypeStruct(s, F) for s in [(2, 3), (2, 4), (3, 4), (4,)])
_count = itertools.count()


def _impl(x: jax.Array, w: jax.Array) -> jax.Array:
    return 2.0 * (x @ w)


def _good_rules() -> dict[str, Any]:
    return dict(
        yw_to_w=lambda d, e, **p: {"weight": e["weight"] * d[..., None, :]},
        xy_to_dw=etp.derive_xy_to_dw(_impl, lambda params: {"weight": 1}, 0),
        init_drtrl=lambda x, y, ws, n: {
            k: jnp.zeros((*etp.aval_of(x).shape[:-1], *etp.aval_of(v).shape, n)) for k, v in ws.items()
        },
        init_pp=etp.init_pp_like_output,
    )


@pytest.fixture
def register() -> Iterator[Any]:
    made: list[str] = []

    def make(**overrides: Any) -> etp.ETPPrimitive:
        name = f"etp_test_rule_check_{next(_count)}"
        made.append(name)
        p = etp.register_primitive(name, _impl, batched=True, trainable_invars_fn=lambda params: {"weight": 1})
        p.register_etp_rules(**{**_good_rules(), **overrides})
        return p

    yield make
    for name in made:
        etp.unregister_primitive(name)


@pytest.mark.parametrize("num_state", [1, 3])
def test_the_built_in_and_a_correct_custom_primitive_pass(register: Any, num_state: int) -> None:
    check_rules(etp.etp_mm_p, X, Y, {"weight": W, "bias": B}, {"has_bias": True}, num_state)
    check_rules(register(), X, Y, {"weight": W}, {}, num_state)


@pytest.mark.parametrize(
    ("rule", "bad", "message"),
    [
        ("init_drtrl", lambda x, y, ws, n: jnp.zeros((2, 3, 4, n)), r"rule 'init_drtrl' returned array\(2, 3, 4, 1\)"),
        ("init_drtrl", lambda x, y, ws, n: {"weight": jnp.zeros((2, 3, 4))}, r"has no trailing axis of 1 state"),
        ("init_pp", lambda x, y, ws, n: jnp.zeros((2, 4)), r"rule 'init_pp' returned array\(2, 4\).*array\(2, 4, 1\)"),
        ("yw_to_w", lambda d, e, **p: {"weight": e["weight"][0]}, r"rule 'yw_to_w' returned \{'weight': array\(3, 4\)"),
        ("yw_to_w", lambda d, e, **p: e["weight"] * d[..., None, :], r"rule 'yw_to_w' returned array"),
        (
            "xy_to_dw",
            lambda x, d, w, **p: {"weight": (x.T @ d).T},
            r"rule 'xy_to_dw' returned \{'weight': array\(4, 3\)",
        ),
        ("xy_to_dw", lambda x, d, w, **p: {"kernel": x.T @ d}, r"rule 'xy_to_dw' returned \{'kernel'.*\{'weight'"),
        ("yw_to_w", lambda d, e, **p: {"weight": e["weight"] @ d}, r"rule 'yw_to_w' failed on the equation's shapes"),
    ],
)
def test_a_broken_rule_is_named(register: Any, rule: str, bad: Any, message: str) -> None:
    p = register(**{rule: bad})
    with pytest.raises(ETPRuleError, match=message) as caught:
        check_rules(p, X, Y, {"weight": W}, {})
    assert p.name in str(caught.value)
