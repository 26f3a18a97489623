"""Online gradients from ETP rules, checked against BPTT.

A layer of leaky integrators with a per-unit leak is driven by a marked dense
op, ``h^t = a * h^{t-1} + matmul(x^t, W, b)``. The eligibility trace of the op
(its D-RTRL layout) is carried forward one step at a time, so the gradient of
each step is available at that step, in memory independent of the sequence
length. The script compares the accumulated online gradient with
backpropagation through time and shows that a custom primitive works the same
way. (The full online learners arrive with etp-algorithms.)

Run: ``uv run python examples/primitives_demo.py [--steps T]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import etp_primitives as etp

jax.config.update("jax_enable_x64", True)


def main(steps: int) -> float:
    batch, n_in, n_hidden = 8, 16, 32
    key_w, key_x, key_a, key_r = jax.random.split(jax.random.PRNGKey(0), 4)
    weights = {"weight": 0.3 * jax.random.normal(key_w, (n_in, n_hidden)), "bias": jnp.zeros(n_hidden)}
    xs = jax.random.normal(key_x, (steps, batch, n_in))
    leak = jax.random.uniform(key_a, (n_hidden,), minval=0.8, maxval=0.99)
    target = jax.random.normal(key_r, (batch, n_hidden))

    def layer(x: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
        return etp.matmul(x, w["weight"], w["bias"])

    def step_loss(h: jax.Array) -> jax.Array:
        return 0.5 * jnp.mean((jnp.tanh(h) - target) ** 2)

    # The equation of the marked op: its primitive, static params and vars.
    eqn = next(e for e in jax.make_jaxpr(layer)(xs[0], weights).jaxpr.eqns if etp.is_etp_primitive(e.primitive))
    rules = etp.require_rules(eqn.primitive)
    trace = rules["init_drtrl"](eqn.invars[0], eqn.outvars[0], {"weight": eqn.invars[1], "bias": eqn.invars[2]}, 1)
    trace = {k: v[..., 0] for k, v in trace.items()}
    a = jnp.broadcast_to(leak, (batch, n_hidden))

    @jax.jit
    def online_step(h, trace, x):  # type: ignore[no-untyped-def]
        h = a * h + layer(x, weights)
        trace = rules["yw_to_w"](a, trace, **eqn.params)
        seed = etp.drtrl_seed(eqn.primitive, x, jnp.ones_like(h), weights, eqn.params)
        trace = {k: trace[k] + seed[k] for k in trace}
        g = jax.grad(step_loss)(h)
        grad = etp.drtrl_grad(eqn.primitive, x, g, trace, weights, eqn.params)
        return h, trace, grad

    h = jnp.zeros((batch, n_hidden))
    online = {k: jnp.zeros_like(v) for k, v in weights.items()}
    for t in range(steps):
        h, trace, grad = online_step(h, trace, xs[t])
        online = {k: online[k] + grad[k] for k in online}

    def total_loss(w: dict[str, jax.Array]) -> jax.Array:
        def body(h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            h = a * h + layer(x, w)
            return h, step_loss(h)

        return jnp.sum(jax.lax.scan(body, jnp.zeros((batch, n_hidden)), xs)[1])

    bptt = jax.grad(total_loss)(weights)
    trace_bytes = sum(v.size * v.dtype.itemsize for v in trace.values())
    print(f"leaky-integrator layer: B={batch}, I={n_in}, H={n_hidden}, T={steps}")
    print(f"eligibility trace: {trace_bytes / 1024:.1f} KiB, the same for any T")
    worst = 0.0
    for key in weights:
        err = float(jnp.max(jnp.abs(online[key] - bptt[key])) / jnp.max(jnp.abs(bptt[key])))
        worst = max(worst, err)
        print(f"  d loss / d {key:<6}: online vs BPTT relative error {err:.2e}")

    # A custom primitive: register it, and it works under jit/grad/vmap at once.
    scaled_p = etp.register_primitive("etp_demo_scaled_mm", lambda x, w, *, scale: scale * (x @ w), batched=True)
    x0 = xs[0]
    gw = jax.jit(jax.grad(lambda w: jnp.sum(scaled_p.bind(x0, w, scale=2.0) ** 2)))(weights["weight"])
    per_sample = jax.vmap(lambda xi: scaled_p.bind(xi[None], weights["weight"], scale=2.0))(x0)
    print(f"custom primitive {scaled_p.name!r}: grad {gw.shape}, vmap {per_sample.shape}")
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="sequence length T")
    args = parser.parse_args()
    error = main(args.steps)
    if error > 1e-9:
        raise SystemExit(f"online gradient differs from BPTT (relative error {error:.2e})")
    print("online gradient equals BPTT.")
