"""Bad inputs to the user-facing functions raise our own ValueError/TypeError.

Every message names the function (and the primitive where it is known), the
offending argument, and what was expected versus what was given. The
exception type is checked *exactly*, so a JAX-internal error that happens to
subclass ValueError/TypeError does not pass unless its message is ours.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit.sparse as ss

import etp_primitives as etp

NWC = ("NWC", "WIO", "NWC")
_DENSE = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])  # (in=2, out=3), nse=3


def _csr() -> ss.CSR:
    return ss.CSR.fromdense(jnp.asarray(_DENSE))


def _ones(*shape: int) -> jax.Array:
    return jnp.ones(shape)


def _traced_alpha() -> None:
    jax.jit(lambda a: etp.lora_matmul(_ones(2, 3), _ones(3, 2), _ones(2, 4), alpha=a))(2.0)


# (id, call, exact exception type, regexes that must all occur in the message)
CASES: list[tuple[str, Callable[[], object], type[Exception], list[str]]] = [
    # ---------------------------------------------------------------- matmul
    (
        "matmul-in-features",
        lambda: etp.matmul(_ones(2, 5), _ones(3, 4)),
        ValueError,
        [
            r"matmul",
            r"etp_mm",
            r"\bx\b",
            r"weight",
            r"5 input features",
            r"\(2, 5\)",
            r"\(3, 4\)",
            r"\(5, out_features\)",
        ],
    ),
    (
        "matmul-in-features-vector",
        lambda: etp.matmul(_ones(5), _ones(3, 4)),
        ValueError,
        [r"matmul", r"etp_mv", r"\(5,\)", r"\(3, 4\)", r"\(5, out_features\)"],
    ),
    (
        "matmul-3d-weight",
        lambda: etp.matmul(_ones(2, 3), _ones(3, 4, 5)),
        ValueError,
        [r"matmul", r"etp_mm", r"weight", r"\(in_features, out_features\)", r"\(3, 4, 5\)"],
    ),
    (
        "matmul-1d-weight",
        lambda: etp.matmul(_ones(2, 3), _ones(3)),
        ValueError,
        [r"matmul", r"etp_mm", r"weight", r"\(in_features, out_features\)", r"\(3,\)"],
    ),
    (
        "matmul-0d-x",
        lambda: etp.matmul(jnp.ones(()), _ones(3, 4)),
        ValueError,
        [r"matmul", r"etp_mv", r"\bx\b", r"\(\.\.\., in_features\)", r"shape \(\)"],
    ),
    (
        "matmul-bias-shape",
        lambda: etp.matmul(_ones(2, 3), _ones(3, 4), bias=_ones(2, 4)),
        ValueError,
        [r"matmul", r"etp_mm", r"bias", r"\(4,\)", r"\(2, 4\)"],
    ),
    (
        "matmul-bias-wrong-length",
        lambda: etp.matmul(_ones(3), _ones(3, 4), bias=_ones(3)),
        ValueError,
        [r"matmul", r"etp_mv", r"bias", r"\(4,\)", r"\(3,\)"],
    ),
    ("matmul-x-string", lambda: etp.matmul("abc", _ones(3, 4)), TypeError, [r"matmul", r"\bx\b", r"str"]),
    ("matmul-x-none", lambda: etp.matmul(None, _ones(3, 4)), TypeError, [r"matmul", r"\bx\b", r"NoneType"]),
    ("matmul-weight-string", lambda: etp.matmul(_ones(2, 3), "abc"), TypeError, [r"matmul", r"weight", r"str"]),
    (
        "matmul-bias-string",
        lambda: etp.matmul(_ones(2, 3), _ones(3, 4), bias="abc"),
        TypeError,
        [r"matmul", r"bias", r"str"],
    ),
    # ------------------------------------------------------------------ conv
    (
        "conv-x-without-batch-axis",
        lambda: etp.conv(_ones(8, 3), _ones(3, 3, 4), dimension_numbers=NWC),
        ValueError,
        [r"conv", r"etp_conv", r"\bx\b", r"batch axis", r"\(8, 3\)", r"\(3, 3, 4\)"],
    ),
    (
        "conv-channel-mismatch",
        lambda: etp.conv(_ones(2, 8, 5), _ones(3, 3, 4), dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"\bx\b", r"5 input channels", r"kernel", r"expects\s+3", r"\(2, 8, 5\)", r"\(3, 3, 4\)"],
    ),
    (
        "conv-kernel-larger-than-input-valid",
        lambda: etp.conv(_ones(2, 2, 3), _ones(5, 3, 4), padding="VALID", dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"kernel", r"larger", r"\b5\b", r"\(2, 2, 3\)", r"\(5, 3, 4\)"],
    ),
    (
        "conv-strides-length",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), strides=(1, 1), dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"strides", r"\(1\)", r"\(1, 1\)"],
    ),
    (
        "conv-strides-zero-int",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), strides=0, dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"strides", r"positive", r"0"],
    ),
    (
        "conv-strides-zero-tuple",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), strides=(0,), dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"strides", r"positive", r"\(0,\)"],
    ),
    (
        "conv-rhs-dilation-zero-int",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), rhs_dilation=0, dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"rhs_dilation", r"positive"],
    ),
    (
        "conv-padding-string",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), padding="FULL", dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"padding", r"'SAME'", r"'VALID'", r"'FULL'"],
    ),
    (
        "conv-padding-pairs-count",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), padding=((1, 1), (1, 1)), dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"padding", r"\(1\)", r"\(\(1, 1\), \(1, 1\)\)"],
    ),
    (
        "conv-dimension-numbers-length",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), dimension_numbers=("NWC", "WIO")),
        ValueError,
        [r"etp_conv", r"dimension_numbers", r"\('NWC', 'WIO'\)"],
    ),
    (
        "conv-dimension-numbers-rank",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), dimension_numbers=("NCHW", "OIHW", "NCHW")),
        ValueError,
        [r"etp_conv", r"dimension_numbers", r"NCHW", r"\(2, 8, 3\)", r"\(3, 3, 4\)"],
    ),
    (
        "conv-dimension-numbers-type",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), dimension_numbers="NWC"),
        ValueError,
        [r"etp_conv", r"dimension_numbers", r"'NWC'"],
    ),
    (
        "conv-feature-group-count",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), feature_group_count=0, dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"feature_group_count", r"positive", r"\b0\b"],
    ),
    (
        "conv-groups-do-not-divide-out-channels",
        lambda: etp.conv(_ones(2, 8, 6), _ones(3, 3, 3), feature_group_count=2, dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"kernel", r"3 output channels", r"divisible"],
    ),
    (
        "conv-bias-shape",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), _ones(3), dimension_numbers=NWC),
        ValueError,
        [r"etp_conv", r"bias", r"\(4,\)", r"\(3,\)"],
    ),
    ("conv-x-string", lambda: etp.conv("abc", _ones(3, 3, 4)), TypeError, [r"conv", r"etp_conv", r"\bx\b", r"str"]),
    ("conv-kernel-string", lambda: etp.conv(_ones(2, 8, 3), "abc"), TypeError, [r"etp_conv", r"kernel", r"str"]),
    (
        "conv-bias-string",
        lambda: etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), "abc", dimension_numbers=NWC),
        TypeError,
        [r"etp_conv", r"bias", r"str"],
    ),
    # --------------------------------------------------------- sparse_matmul
    (
        "sparse-dense-jax-matrix",
        lambda: etp.sparse_matmul(_ones(4, 2), _ones(3), sparse_mat=jnp.asarray(_DENSE)),
        TypeError,
        [r"sparse_matmul", r"etp_sp_mm", r"sparse_mat", r"saiunit", r"CSR", r"ArrayImpl"],
    ),
    (
        "sparse-dense-numpy-matrix",
        lambda: etp.sparse_matmul(_ones(2), _ones(3), sparse_mat=_DENSE),
        TypeError,
        [r"sparse_matmul", r"etp_sp_mv", r"sparse_mat", r"saiunit", r"ndarray"],
    ),
    (
        "sparse-weight-data-length",
        lambda: etp.sparse_matmul(_ones(4, 2), _ones(4), sparse_mat=_csr()),
        ValueError,
        [r"sparse_matmul", r"etp_sp_mm", r"weight_data", r"\(3,\)", r"\(4,\)"],
    ),
    (
        "sparse-weight-data-2d",
        lambda: etp.sparse_matmul(_ones(4, 2), _ones(3, 1), sparse_mat=_csr()),
        ValueError,
        [r"etp_sp_mm", r"weight_data", r"\(3,\)", r"\(3, 1\)"],
    ),
    (
        "sparse-x-features",
        lambda: etp.sparse_matmul(_ones(4, 3), _ones(3), sparse_mat=_csr()),
        ValueError,
        [r"sparse_matmul", r"etp_sp_mm", r"\bx\b", r"3 input features", r"\(4, 3\)", r"\(2, 3\)", r"\(\.\.\., 2\)"],
    ),
    (
        "sparse-x-features-vector",
        lambda: etp.sparse_matmul(_ones(3), _ones(3), sparse_mat=_csr()),
        ValueError,
        [r"etp_sp_mv", r"\bx\b", r"\(3,\)", r"\(\.\.\., 2\)"],
    ),
    (
        "sparse-0d-x",
        lambda: etp.sparse_matmul(jnp.ones(()), _ones(3), sparse_mat=_csr()),
        ValueError,
        [r"etp_sp_mv", r"\bx\b", r"\(\.\.\., in_features\)", r"shape \(\)"],
    ),
    (
        "sparse-bias-shape",
        lambda: etp.sparse_matmul(_ones(4, 2), _ones(3), sparse_mat=_csr(), bias=_ones(2)),
        ValueError,
        [r"etp_sp_mm", r"bias", r"\(3,\)", r"\(2,\)"],
    ),
    (
        "sparse-x-string",
        lambda: etp.sparse_matmul("abc", _ones(3), sparse_mat=_csr()),
        TypeError,
        [r"sparse_matmul", r"\bx\b", r"str"],
    ),
    (
        "sparse-weight-data-string",
        lambda: etp.sparse_matmul(_ones(4, 2), "abc", sparse_mat=_csr()),
        TypeError,
        [r"etp_sp_mm", r"weight_data", r"str"],
    ),
    (
        "sparse-bias-string",
        lambda: etp.sparse_matmul(_ones(4, 2), _ones(3), sparse_mat=_csr(), bias="abc"),
        TypeError,
        [r"etp_sp_mm", r"bias", r"str"],
    ),
    # ----------------------------------------------------------- lora_matmul
    (
        "lora-rank-mismatch",
        lambda: etp.lora_matmul(_ones(2, 3), _ones(3, 2), _ones(3, 4)),
        ValueError,
        [
            r"lora_matmul",
            r"etp_lora_mm",
            r"\bB\b",
            r"\bA\b",
            r"rank 2",
            r"\(3, 2\)",
            r"\(3, 4\)",
            r"\(2, out_features\)",
        ],
    ),
    (
        "lora-rank-mismatch-vector",
        lambda: etp.lora_matmul(_ones(3), _ones(3, 2), _ones(5, 4)),
        ValueError,
        [r"etp_lora_mv", r"rank 2", r"\(5, 4\)", r"\(2, out_features\)"],
    ),
    (
        "lora-in-features",
        lambda: etp.lora_matmul(_ones(2, 3), _ones(4, 2), _ones(2, 4)),
        ValueError,
        [r"etp_lora_mm", r"\bx\b", r"\bB\b", r"\(2, 3\)", r"\(4, 2\)", r"\(3, rank\)"],
    ),
    (
        "lora-3d-A",
        lambda: etp.lora_matmul(_ones(2, 3), _ones(3, 2), _ones(2, 4, 1)),
        ValueError,
        [r"etp_lora_mm", r"\bA\b", r"\(rank, out_features\)", r"\(2, 4, 1\)"],
    ),
    (
        "lora-bias-shape",
        lambda: etp.lora_matmul(_ones(2, 3), _ones(3, 2), _ones(2, 4), bias=_ones(3)),
        ValueError,
        [r"etp_lora_mm", r"bias", r"\(4,\)", r"\(3,\)"],
    ),
    ("lora-traced-alpha", _traced_alpha, TypeError, [r"lora_matmul", r"etp_lora_mm", r"alpha", r"concrete", r"Tracer"]),
    (
        "lora-alpha-none",
        lambda: etp.lora_matmul(_ones(2, 3), _ones(3, 2), _ones(2, 4), alpha=None),
        TypeError,
        [r"etp_lora_mm", r"alpha", r"NoneType"],
    ),
    (
        "lora-alpha-string",
        lambda: etp.lora_matmul(_ones(2, 3), _ones(3, 2), _ones(2, 4), alpha="abc"),
        TypeError,
        [r"etp_lora_mm", r"alpha", r"str"],
    ),
    (
        "lora-x-string",
        lambda: etp.lora_matmul("abc", _ones(3, 2), _ones(2, 4)),
        TypeError,
        [r"lora_matmul", r"\bx\b", r"str"],
    ),
    (
        "lora-B-string",
        lambda: etp.lora_matmul(_ones(2, 3), "abc", _ones(2, 4)),
        TypeError,
        [r"etp_lora_mm", r"\bB\b", r"str"],
    ),
    (
        "lora-bias-string",
        lambda: etp.lora_matmul(_ones(2, 3), _ones(3, 2), _ones(2, 4), bias="abc"),
        TypeError,
        [r"etp_lora_mm", r"bias", r"str"],
    ),
    # ---------------------------------------------------------- element_wise
    (
        "elemwise-fn-not-callable",
        lambda: etp.element_wise(_ones(3), fn=3),
        TypeError,
        [r"element_wise", r"etp_elemwise", r"\bfn\b", r"callable", r"int"],
    ),
    (
        "elemwise-weight-string",
        lambda: etp.element_wise("abc"),
        TypeError,
        [r"element_wise", r"etp_elemwise", r"weight", r"str"],
    ),
    (
        "elemwise-fn-returns-string",
        lambda: etp.element_wise(_ones(3), fn=lambda w: "abc"),
        TypeError,
        [r"element_wise", r"etp_elemwise", r"fn\(weight\)", r"str"],
    ),
]


@pytest.mark.parametrize(("call", "exc_type", "patterns"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_our_error(call, exc_type, patterns):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    err = info.value
    msg = str(err)
    shown = msg if len(msg) < 400 else msg[:400] + "..."
    assert type(err) is exc_type, (
        f"expected exactly {exc_type.__name__}, got {type(err).__module__}.{type(err).__name__}: {shown}"
    )
    missing = [p for p in patterns if not re.search(p, msg)]
    assert not missing, f"message lacks {missing}: {shown!r}"


def test_bad_padding_value_raises_our_error():
    # Neither a string, an int nor a sequence of pairs: the error must still come from conv, naming padding.
    with pytest.raises((ValueError, TypeError)) as info:
        etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), padding=None, dimension_numbers=NWC)
    msg = str(info.value)
    assert type(info.value) in (ValueError, TypeError)
    assert "etp_conv" in msg and "padding" in msg, msg


def test_bad_strides_value_raises_our_error():
    with pytest.raises((ValueError, TypeError)) as info:
        etp.conv(_ones(2, 8, 3), _ones(3, 3, 4), strides="ab", dimension_numbers=NWC)
    msg = str(info.value)
    assert type(info.value) in (ValueError, TypeError)
    assert "etp_conv" in msg and "strides" in msg, msg


def test_errors_raise_before_any_bind():
    """A bad call leaves no equation behind: the check happens in the wrapper, not in JAX."""

    def f(x, w):
        return etp.matmul(x, w)

    with pytest.raises(ValueError, match=r"matmul \(etp_mm\)"):
        jax.make_jaxpr(f)(_ones(2, 5), _ones(3, 4))


def test_checks_run_under_jit():
    with pytest.raises(ValueError, match=r"matmul \(etp_mm\): x has 5 input features"):
        jax.jit(etp.matmul)(_ones(2, 5), _ones(3, 4))
    with pytest.raises(ValueError, match=r"conv \(etp_conv\): x has 5 input channels"):
        jax.jit(lambda x, k: etp.conv(x, k, dimension_numbers=NWC))(_ones(2, 8, 5), _ones(3, 3, 4))
