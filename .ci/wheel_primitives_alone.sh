#!/usr/bin/env bash
# etp-primitives is a product on its own: build its wheel, install it alone in a clean
# environment (no sibling packages, no brainstate), and define and use a custom primitive.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
uv build --package etp-primitives --wheel --out-dir "$work/dist" >/dev/null
uv venv --quiet --python 3.11 "$work/venv"
VIRTUAL_ENV="$work/venv" uv pip install --quiet "$work"/dist/etp_primitives-*.whl
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib.util

import jax
import jax.numpy as jnp

import etp_primitives as etp

for sibling in ("etp_compiler", "etp_algorithms", "etp_nn", "braintrace", "brainstate"):
    assert importlib.util.find_spec(sibling) is None, f"{sibling} must not be installed with etp-primitives alone"

p = etp.register_primitive("etp_wheel_check_mm", lambda x, w, *, scale: scale * (x @ w), batched=True)
x, w = jnp.ones((4, 3)), jnp.ones((3, 5))
y = jax.jit(lambda x, w: p.bind(x, w, scale=2.0))(x, w)
assert jnp.allclose(y, 2.0 * x @ w)
g = jax.grad(lambda w: jnp.sum(p.bind(x, w, scale=2.0)))(w)
assert jnp.allclose(g, 2.0 * jnp.ones((3, 1)) * 4.0)
v = jax.vmap(lambda xi: p.bind(xi, w, scale=2.0))(jnp.ones((8, 4, 3)))
assert v.shape == (8, 4, 5)
assert jnp.allclose(etp.matmul(x, w), x @ w)
print("etp-primitives wheel alone: custom primitive works under jit, grad and vmap")
PY
