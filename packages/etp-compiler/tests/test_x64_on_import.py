"""A user's ``jax_enable_x64`` reset by brainstate's import (brainstate 0.5) is reported, never silently lost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent(
    """
    import json, warnings
    import jax
    jax.config.update("jax_enable_x64", {asked})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import etp_compiler  # the first ETP package that imports brainstate
    import jax.numpy as jnp
    print(json.dumps({{
        "x64": bool(jax.config.jax_enable_x64),
        "dtype": str(jnp.zeros(()).dtype),
        "warnings": [str(w.message) for w in caught if "jax_enable_x64" in str(w.message)],
    }}))
    """
)


def _run(asked: bool) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(asked=asked)], capture_output=True, text=True, timeout=300, check=True
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("asked", [True, False])
def test_a_reset_x64_is_reported(asked: bool) -> None:
    result = _run(asked)
    lost = asked and not result["x64"]  # brainstate 0.5 resets it on import; 0.6 keeps it
    assert result["dtype"] == ("float64" if result["x64"] else "float32")
    if lost:
        (message,) = result["warnings"]  # type: ignore[misc]
        assert "set it back to False" in message and "brainstate.environ.set(precision=64)" in message
    else:
        assert result["warnings"] == []
