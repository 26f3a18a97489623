"""Settings shared by every test session of the workspace.

float64 is on for the whole session: exactness tests compare against
float64 oracles. brainstate's precision is set globally (not with
``brainstate.environ.context``), because leaving such a context switches
JAX's global x64 flag back off for every later test in the process.
"""

from __future__ import annotations

import importlib.util

import jax

jax.config.update("jax_enable_x64", True)
if importlib.util.find_spec("brainstate") is not None:  # absent when etp-primitives is tested alone
    import brainstate

    brainstate.environ.set(precision=64)
