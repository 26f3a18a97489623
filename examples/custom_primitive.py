"""A custom ETP primitive, from registration to online gradients, with etp_primitives and JAX only.

Two ways to make an op take part in online learning:

1. ``etp.register_primitive(name, impl)``: one call gives a JAX primitive whose eager,
   abstract-eval, lowering, JVP, transpose and batching rules are all derived from ``impl``,
   so it works under ``jit``, ``grad`` and ``vmap`` at once. Its ETP trace rules are then
   installed with ``primitive.register_etp_rules(...)`` (until then ``etp.require_rules`` says
   which are missing). Example: ``scaled_mm``, ``y = scale * (x @ W)`` with a static ``scale``.
2. ``etp.register_primitive_spec(ETPPrimitiveSpec(...))``: everything in one frozen record, the
   path the built-in primitives take. Example: ``gain_mm``, ``y = (x @ W) * g`` with two
   trainable inputs, the weight ``W`` and a per-output gain ``g``.

The rules use the weight-shaped D-RTRL layout (each weight element feeds one output unit), so
``drtrl_seed``/``drtrl_grad`` take their defaults and ``xy_to_dw`` is derived as the exact VJP of
``impl`` by ``etp.derive_xy_to_dw``; a new op needs ``yw_to_w`` and ``init_drtrl`` written by hand.

The check: a layer of leaky integrators with a per-unit leak, ``h_t = a * h_{t-1} + op(x_t, W)``,
and a loss at every step. The eligibility trace of the op is carried forward with the rules, one
step at a time, and the step gradients are summed (the trace has the same size for any sequence
length). The sum equals the BPTT gradient to float64 round-off, for the built-in ``etp.matmul`` and
for both custom ops: D-RTRL is exact for position-wise dynamics.

Run: ``uv run python examples/custom_primitive.py [--quick] [--steps T]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import etp_primitives as etp

jax.config.update("jax_enable_x64", True)  # the online-vs-BPTT comparison is to float64 round-off

Array = jax.Array


# ------------------------------------------------------------------------------------------ 1. register_primitive


def scaled_mm_impl(x: Array, weight: Array, *, scale: float) -> Array:
    return scale * (x @ weight)


# batched=True: x has leading batch axes, and the traces keep them
scaled_mm_p = etp.register_primitive("etp_example_scaled_mm", scaled_mm_impl, batched=True)


def weight_shaped_yw_to_w(hidden_dim: Array, trace: dict[str, Array], **params: Any) -> dict[str, Array]:
    """Multiply each trace element by the factor of the output unit its weight element feeds."""
    out = {}
    for key, value in trace.items():
        # a matrix weight (..., I, O) feeds output o through its last axis; a vector (..., O) directly
        out[key] = value * (hidden_dim[..., None, :] if key == "weight" else hidden_dim)
    return out


def weight_shaped_init_drtrl(x_var: Any, y_var: Any, weight_vars: dict[str, Any], num_states: int) -> dict[str, Array]:
    """Zero traces shaped like each weight, with x's leading (batch) axes in front and a state axis behind."""
    lead = tuple(etp.aval_of(x_var).shape[:-1])
    traces = {}
    for key, var in weight_vars.items():
        aval = etp.aval_of(var)
        traces[key] = jnp.zeros((*lead, *aval.shape, num_states), aval.dtype)
    return traces


scaled_mm_p.register_etp_rules(
    yw_to_w=weight_shaped_yw_to_w,
    xy_to_dw=etp.derive_xy_to_dw(scaled_mm_impl, lambda params: {"weight": 1}),
    init_drtrl=weight_shaped_init_drtrl,
    init_pp=etp.init_pp_like_output,
)


def scaled_mm(x: Array, weights: dict[str, Array], scale: float = 0.5) -> Array:
    return scaled_mm_p.bind(x, weights["weight"], scale=scale)


# ------------------------------------------------------------------------------------------ 2. the spec path


def gain_mm_impl(x: Array, weight: Array, gain: Array) -> Array:
    return (x @ weight) * gain


def gain_mm_layout(params: dict[str, Any]) -> dict[str, int]:
    return {"weight": 1, "gain": 2}  # trainable key -> position among the primitive's inputs


gain_mm_p = etp.register_primitive_spec(
    etp.ETPPrimitiveSpec(
        name="etp_example_gain_mm",
        impl=gain_mm_impl,
        yw_to_w=weight_shaped_yw_to_w,
        xy_to_dw=etp.derive_xy_to_dw(gain_mm_impl, gain_mm_layout),
        init_drtrl=weight_shaped_init_drtrl,
        init_pp=etp.init_pp_like_output,
        trainable_invars_fn=gain_mm_layout,
        x_invar_index=0,
        batched=True,
    )
)


def gain_mm(x: Array, weights: dict[str, Array]) -> Array:
    return gain_mm_p.bind(x, weights["weight"], weights["gain"])


# ------------------------------------------------------------------------------------------ checks


def rel_error(got: Array, want: Array) -> float:
    return float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-300))


def check_transforms(x: Array, weights: dict[str, Array]) -> list[tuple[str, float]]:
    """The primitive agrees with its plain-JAX impl under jit, grad and vmap."""

    def loss_prim(w: dict[str, Array]) -> Array:
        return jnp.sum(jnp.sin(gain_mm(x, w)))

    def loss_plain(w: dict[str, Array]) -> Array:
        return jnp.sum(jnp.sin(gain_mm_impl(x, w["weight"], w["gain"])))

    plain = gain_mm_impl(x, weights["weight"], weights["gain"])
    g_prim, g_plain = jax.jit(jax.grad(loss_prim))(weights), jax.grad(loss_plain)(weights)
    per_sample = jax.vmap(lambda xi: gain_mm(xi[None], weights)[0])(x)
    scaled = jax.vmap(lambda xi: scaled_mm(xi, weights))(x[:, None])[:, 0]
    return [
        ("gain_mm under jit", rel_error(jax.jit(gain_mm)(x, weights), plain)),
        ("gain_mm grad (W, g) under jit", max(rel_error(g_prim[k], g_plain[k]) for k in weights)),
        ("gain_mm under vmap", rel_error(per_sample, plain)),
        ("scaled_mm under vmap", rel_error(scaled, scaled_mm_impl(x, weights["weight"], scale=0.5))),
    ]


def etp_equation(layer: Callable[..., Array], x: Array, weights: dict[str, Array]) -> tuple[Any, dict[str, Any]]:
    """The ETP primitive that ``layer`` binds, and its static params (found in the jaxpr)."""
    jaxpr = jax.make_jaxpr(layer)(x, weights).jaxpr
    eqn = next(e for e in jaxpr.eqns if etp.is_etp_primitive(e.primitive))
    return eqn.primitive, dict(eqn.params)


def online_vs_bptt(
    layer: Callable[..., Array], weights: dict[str, Array], xs: Array, leak: Array, target: Array
) -> tuple[float, int]:
    """Relative error of the summed online D-RTRL gradient against BPTT, and the trace's bytes."""
    primitive, params = etp_equation(layer, xs[0], weights)
    rules = etp.require_rules(primitive)
    trainable = {k: weights[k] for k in etp.trainable_invars(primitive, params)}
    y0 = layer(xs[0], weights)
    trace0 = {k: v[..., 0] for k, v in rules["init_drtrl"](xs[0], y0, trainable, 1).items()}  # one hidden state

    def step_loss(h: Array) -> Array:
        return 0.5 * jnp.mean((jnp.tanh(h) - target) ** 2)

    @jax.jit
    def online(xs: Array) -> dict[str, Array]:
        def step(carry: Any, x: Array) -> tuple[Any, None]:
            h, trace, total = carry
            h = leak * h + layer(x, weights)
            decay = jnp.broadcast_to(leak, h.shape)  # D = dh_t/dh_{t-1}, per unit
            trace = rules["yw_to_w"](decay, trace, **params)  # carry the old trace forward ...
            seed = etp.drtrl_seed(primitive, x, jnp.ones_like(h), trainable, params)  # ... and add this step's
            trace = {k: trace[k] + seed[k] for k in trace}
            g = jax.grad(step_loss)(h)  # dL_t/dh_t, available now
            grad = etp.drtrl_grad(primitive, x, g, trace, trainable, params)  # the online gradient of step t
            return (h, trace, {k: total[k] + grad[k] for k in total}), None

        zeros = {k: jnp.zeros_like(v) for k, v in trainable.items()}
        return jax.lax.scan(step, (jnp.zeros_like(y0), trace0, zeros), xs)[0][2]

    def total_loss(w: dict[str, Array]) -> Array:
        def step(h: Array, x: Array) -> tuple[Array, Array]:
            h = leak * h + layer(x, {**weights, **w})
            return h, step_loss(h)

        return jnp.sum(jax.lax.scan(step, jnp.zeros_like(y0), xs)[1])

    got, want = online(xs), jax.grad(total_loss)(trainable)
    trace_bytes = sum(v.size * v.dtype.itemsize for v in trace0.values())
    return max(rel_error(got[k], want[k]) for k in trainable), trace_bytes


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--steps", type=int, default=200, help="sequence length T")
    args = parser.parse_args(argv)
    batch, n_in, n_hidden, steps = (4, 5, 6, 12) if args.quick else (8, 16, 32, args.steps)

    k_w, k_g, k_b, k_x, k_a, k_t = jax.random.split(jax.random.PRNGKey(0), 6)
    weights = {
        "weight": jax.random.normal(k_w, (n_in, n_hidden)) / jnp.sqrt(n_in),
        "gain": jax.random.uniform(k_g, (n_hidden,), minval=0.5, maxval=1.5),
        "bias": 0.1 * jax.random.normal(k_b, (n_hidden,)),
    }
    xs = jax.random.normal(k_x, (steps, batch, n_in))
    leak = jax.random.uniform(k_a, (n_hidden,), minval=0.8, maxval=0.99)  # a per-unit leak
    target = jax.random.normal(k_t, (batch, n_hidden))

    print(f"custom primitives {scaled_mm_p.name!r} (register_primitive) and {gain_mm_p.name!r} (spec)")
    print(f"leaky-integrator layer: batch {batch}, {n_in} inputs, {n_hidden} units, T={steps}, float64\n")

    # a primitive registered without trace rules works under JAX, but the learners refuse it, saying what is missing
    bare = etp.register_primitive("etp_example_bare_mm", lambda x, w: x @ w, batched=True)
    try:
        etp.require_rules(bare)
    except ValueError as err:
        print(f"without rules: {str(err).split(';')[0]}.")
    finally:
        etp.unregister_primitive(bare)
    print()
    rows = [(name, err, "") for name, err in check_transforms(xs[0], weights)]
    layers = {
        "etp.matmul (built-in)": lambda x, w: etp.matmul(x, w["weight"], w["bias"]),
        "scaled_mm": scaled_mm,
        "gain_mm": gain_mm,
    }
    for name, layer in layers.items():
        err, trace_bytes = online_vs_bptt(layer, weights, xs, leak, target)
        rows.append((f"online D-RTRL vs BPTT, {name}", err, f"trace {trace_bytes / 2**10:.1f} KiB"))

    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  {'rel. error':<10}  note")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 16}")
    for name, err, note in rows:
        print(f"{name:<{width}}  {err:<10.1e}  {note}")
    print("\nThe traces have the same size for any T; BPTT keeps all T steps.")
    return max(err for _, err, _ in rows)


if __name__ == "__main__":
    worst = main()
    if worst > 1e-9:
        raise SystemExit(f"a check failed: relative error {worst:.1e}")
    print("all checks pass: the primitives match plain JAX, and the online gradients equal BPTT.")
