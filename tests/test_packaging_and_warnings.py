"""Cross-package checks: the full-stack import, no JAX DeprecationWarning, the README example runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_EXERCISE = """
import jax, jax.numpy as jnp
import saiunit as u, saiunit.sparse as ss
import braintrace, etp_primitives, etp_compiler, etp_algorithms, etp_nn
x, w = jnp.ones((4, 3)), jnp.ones((3, 5))
jax.jit(jax.grad(lambda w: braintrace.matmul(x, w).sum()))(w)
jax.vmap(lambda xi: braintrace.matmul(xi, w))(jnp.ones((2, 4, 3)))
braintrace.conv(jnp.ones((2, 8, 3)), jnp.ones((3, 3, 4)), dimension_numbers=('NWC', 'WIO', 'NWC'))
csr = ss.CSR.fromdense(jnp.eye(3))
jax.jit(lambda x: braintrace.sparse_matmul(x, csr.data, sparse_mat=csr))(jnp.ones((2, 3)))
braintrace.lora_matmul(x, jnp.ones((3, 2)), jnp.ones((2, 5)), alpha=2.0)
braintrace.element_wise(jnp.ones(3) * u.mV, fn=u.math.abs)
print("ok")
"""


def test_no_jax_deprecation_warning_on_import_and_use() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", _EXERCISE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_braintrace_reexports_the_primitives_api() -> None:
    import braintrace
    import braintrace._etrace_op as etrace_op
    import etp_primitives

    for name in (
        "matmul",
        "element_wise",
        "conv",
        "sparse_matmul",
        "lora_matmul",
        "register_primitive",
        "register_primitive_spec",
        "get_primitive_spec",
        "ETPPrimitive",
        "ETPPrimitiveSpec",
    ):
        assert getattr(braintrace, name) is getattr(etp_primitives, name)
    for name in etp_primitives.__all__:
        assert getattr(etrace_op, name) is getattr(etp_primitives, name)
    assert etrace_op.ETP_RULES_YW_TO_W is etp_primitives.ETP_RULES_YW_TO_W


def test_braintrace_nn_lists_the_layer_zoo() -> None:
    import braintrace
    import etp_nn

    expected = {
        "Linear", "SignedWLinear", "ScaledWSLinear", "SparseLinear", "LoRA", "Embedding",
        "Conv1d", "Conv2d", "Conv3d",
        "ValinaRNNCell", "VanillaRNNCell", "GRUCell", "LSTMCell", "MGUCell", "MinimalRNNCell", "URLSTMCell",
        "MiniGRU", "MiniLSTM", "LRUCell",
        "IF", "LIF", "ALIF", "Expon", "LeakyRateReadout", "LeakySpikeReadout",
        "BatchNorm1d", "LayerNorm",
    }  # fmt: skip
    assert expected <= set(braintrace.nn.__all__)
    for name in etp_nn.__all__:
        assert getattr(braintrace.nn, name) is getattr(etp_nn, name)
    assert braintrace.nn.VanillaRNNCell is braintrace.nn.ValinaRNNCell


def test_layers_do_not_import_the_compiler_or_algorithms() -> None:
    code = "import sys, etp_nn; bad = [m for m in ('etp_compiler', 'etp_algorithms') if m in sys.modules]; print(bad)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_readme_example_runs() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    match = re.search(r"## In 15 lines\n\n```python\n(.*?)```", readme, re.S)
    assert match is not None, "README lost its example"
    namespace: dict[str, object] = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    grads = namespace["grads"]
    assert isinstance(grads, dict) and set(grads) >= {("rnn", "Wz", "weight"), ("readout", "weight")}
