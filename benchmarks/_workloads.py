"""The benchmark models and programs, written against the public ``braintrace`` API only.

This module is imported by ``_worker.py`` in two environments: the project's own (where
``braintrace`` is the facade of the ETP packages) and a separate virtual environment holding
the released ``braintrace`` (the peer). Everything here must therefore use only names both
provide: ``braintrace.nn.GRUCell/Linear/LIF``, ``braintrace.D_RTRL``, ``braintrace.ES_D_RTRL``,
``compile_graph``, calling the learner, and ``brainstate.transform``.

Every program is one jitted call that runs ``steps`` time steps in a ``for_loop``:

``forward``    the model alone;
``bptt``       ``grad`` of the summed loss through the unrolled loop (activations kept for all steps);
``d_rtrl``     the per-step online gradient of D_RTRL, summed over the steps;
``es_d_rtrl``  the same with ES_D_RTRL (decay 0.9).

With ``online_inputs=True`` the inputs are drawn inside the loop from a key, so the program's
arguments do not grow with the sequence length and its memory is the learning state alone.
"""

from __future__ import annotations

import inspect
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import saiunit as u

import braintrace

N_OUT = 10
ES_DECAY = 0.9


class GRUNet(brainstate.nn.Module):
    """GRU cell with a linear readout."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.cell = braintrace.nn.GRUCell(n_in, n_hidden)
        self.readout = braintrace.nn.Linear(n_hidden, N_OUT)

    def update(self, x: Any) -> Any:
        return self.readout(self.cell(x))


class RecurrentLIFNet(brainstate.nn.Module):
    """LIF units driven by their input and their own previous spikes (two Linear), linear readout."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.n_hidden = n_hidden
        self.inp = braintrace.nn.Linear(n_in, n_hidden)
        self.rec = braintrace.nn.Linear(n_hidden, n_hidden, b_init=None)
        self.lif = braintrace.nn.LIF(n_hidden, tau=10.0 * u.ms, V_th=1.0 * u.mV)
        # the two libraries differ in the unit of the neuron's input (voltage vs current with R = 1 ohm)
        self.input_unit = u.mA if "R" in inspect.signature(braintrace.nn.LIF.__init__).parameters else u.mV
        self.readout = braintrace.nn.Linear(n_hidden, N_OUT)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        shape = (self.n_hidden,) if batch_size is None else (batch_size, self.n_hidden)
        self.spikes = brainstate.HiddenState(jnp.zeros(shape))

    def update(self, x: Any) -> Any:
        spikes = self.lif((self.inp(x) + self.rec(self.spikes.value)) * self.input_unit)
        self.spikes.value = spikes
        return self.readout(spikes)


MODELS = {"gru": GRUNet, "lif": RecurrentLIFNet}


def build(model: str, batch: int, n_in: int, n_hidden: int, seed: int = 0) -> brainstate.nn.Module:
    brainstate.random.seed(seed)
    brainstate.environ.set(dt=1.0 * u.ms)  # for the neurons; set globally, as compile_graph runs the model too
    net = MODELS[model](n_in, n_hidden)
    brainstate.nn.init_all_states(net, batch_size=batch)
    return net


def make_learner(method: str, net: brainstate.nn.Module) -> Any:
    if method == "d_rtrl":
        return braintrace.D_RTRL(net)
    if method == "es_d_rtrl":
        return braintrace.ES_D_RTRL(net, ES_DECAY)
    raise ValueError(method)


def _loss(out: Any, target: Any) -> Any:
    return jnp.mean((out - target) ** 2)


def make_program(
    method: str,
    net: brainstate.nn.Module,
    batch: int,
    n_in: int,
    steps: int,
    online_inputs: bool,
    learner: Any = None,
    param_paths: Any = None,
) -> tuple[Any, tuple[Any, ...], Any]:
    """``(jitted program, its arguments, learner or None)``.

    Without ``online_inputs`` the arguments are ``(xs, targets)`` with a leading time axis;
    with it, a PRNG key. ``param_paths`` (state paths) restricts the gradient to those
    parameters; ``learner`` reuses one already made for ``net``.
    """
    params = net.states(brainstate.ParamState)
    if param_paths is not None:
        wanted = {tuple(path) for path in param_paths}
        params = {path: state for path, state in params.items() if path in wanted}
    if learner is None and method in ("d_rtrl", "es_d_rtrl"):
        learner = make_learner(method, net)

    def inputs_at(data: Any, t: Any) -> tuple[Any, Any]:
        if online_inputs:
            kx, ky = jax.random.split(jax.random.fold_in(data, t))
            return jax.random.normal(kx, (batch, n_in)), jax.random.normal(ky, (batch, N_OUT))
        xs, ys = data
        return xs[t], ys[t]

    def step_time(data: Any) -> Any:
        if method == "forward":

            def body(t: Any) -> Any:
                x, y = inputs_at(data, t)
                return _loss(net(x), y)

            return jnp.sum(brainstate.transform.for_loop(body, jnp.arange(steps)))
        if method == "bptt":

            def total(data: Any) -> Any:
                def body(t: Any) -> Any:
                    x, y = inputs_at(data, t)
                    return _loss(net(x), y)

                return jnp.sum(brainstate.transform.for_loop(body, jnp.arange(steps)))

            return brainstate.transform.grad(total, params)(data)

        def accumulate(total: Any, t: Any) -> tuple[Any, None]:
            x, y = inputs_at(data, t)
            grads = brainstate.transform.grad(lambda x, y: _loss(learner(x), y), params)(x, y)
            return jax.tree.map(jnp.add, total, grads), None

        zeros = jax.tree.map(jnp.zeros_like, {path: state.value for path, state in params.items()})
        total, _ = brainstate.transform.scan(accumulate, zeros, jnp.arange(steps))
        return total

    if online_inputs:
        args: tuple[Any, ...] = (jax.random.PRNGKey(0),)
    else:
        k1, k2 = jax.random.split(jax.random.PRNGKey(0))
        args = ((jax.random.normal(k1, (steps, batch, n_in)), jax.random.normal(k2, (steps, batch, N_OUT))),)
    return brainstate.transform.jit(step_time), args, learner


def compile_learner(
    method: str, net: brainstate.nn.Module, batch: int, n_in: int, vjp_method: str | None = None
) -> Any:
    """``braintrace.compile`` of the learner (states initialised for ``batch``, graph compiled);
    ``vjp_method="multi-step"`` for the windows of ``etrace_grad(chunk_size=k)``."""
    options: dict[str, Any] = {"decay_or_rank": ES_DECAY} if method == "es_d_rtrl" else {}
    if vjp_method is not None:
        options["vjp_method"] = vjp_method
    return braintrace.compile(net, method, jnp.zeros((batch, n_in)), batch_size=batch, seed=0, **options)


def sequence_data(steps: int, batch: int, n_in: int) -> tuple[Any, Any]:
    """Time-major inputs ``(steps, batch, n_in)`` and targets ``(steps, batch, N_OUT)``."""
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    return jax.random.normal(kx, (steps, batch, n_in)), jax.random.normal(ky, (steps, batch, N_OUT))


def make_sequence_program(
    program: str, learner: Any, net: brainstate.nn.Module, jit: Any = None, chunk_size: int | None = None
) -> Any:
    """A function of ``(xs, ys)`` returning the summed online gradients of the steps' losses.

    ``etrace_grad``: the learner's sequence driver (``reduction='sum'``), jitted by ``jit``
    (default ``brainstate.transform.jit``); with ``chunk_size=k`` it drives windows of ``k``
    steps (``MultiStepData``; exact reverse mode inside a window, traces between windows: the
    peer's chunked trace; the learner must be built with ``vjp_method="multi-step"``).
    ``etrace_grad_direct``: the driver called as is (no outer jit; ours compiles and caches one
    program itself); ``hand_loop``: a ``scan`` over the steps taking each step's gradient through
    the learner and summing, jitted by ``jit``.
    """
    params = net.states(brainstate.ParamState)
    jit = brainstate.transform.jit if jit is None else jit

    def step_loss(x: Any, y: Any) -> Any:
        return _loss(learner(x), y)

    def window_loss(xs: Any, ys: Any) -> Any:  # one loss per step of the window: shape (k,)
        return jnp.mean((learner(braintrace.MultiStepData(xs)) - ys) ** 2, axis=tuple(range(1, ys.ndim)))

    def driver(xs: Any, ys: Any) -> Any:
        if chunk_size is None:
            return learner.etrace_grad(xs, ys, step_fn=step_loss, weights=params, reduction="sum")
        return learner.etrace_grad(xs, ys, step_fn=window_loss, weights=params, reduction="sum", chunk_size=chunk_size)

    def hand_loop(xs: Any, ys: Any) -> Any:
        def body(total: Any, xy: Any) -> tuple[Any, None]:
            grads = brainstate.transform.grad(step_loss, params)(*xy)
            return jax.tree.map(jnp.add, total, grads), None

        zeros = jax.tree.map(jnp.zeros_like, {path: state.value for path, state in params.items()})
        return brainstate.transform.scan(body, zeros, (xs, ys))[0]

    if program == "etrace_grad":
        return jit(driver)
    if program == "etrace_grad_direct":
        return driver
    if program == "hand_loop":
        return jit(hand_loop)
    raise ValueError(program)
