"""Conv1d/2d/3d: the documented formula (lax.conv_general_dilated), batching, transformations, dtype, marker, errors."""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from nn_testing import param_leaves_reaching_etp

import etp_nn

LAYERS = {1: etp_nn.Conv1d, 2: etp_nn.Conv2d, 3: etp_nn.Conv3d}
DIMENSION_NUMBERS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}
IN_SIZE = {1: (9, 4), 2: (6, 5, 4), 3: (4, 5, 3, 4)}
KERNEL = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}

# (keyword arguments of the layer) for each case; the reference below receives the same values
OPTIONS: dict[str, dict[str, Any]] = {
    "same": {},
    "valid_stride": {"padding": "VALID", "stride": 2},
    "pairs_dilated_groups": {"padding": "pairs", "rhs_dilation": 2, "groups": 2},
    "int_pad_lhs_dilation": {"padding": 1, "lhs_dilation": 2, "stride": (1, 2, 1)},
}


ZEROS = brainstate.nn.init.ZeroInit()  # cheap weights where the values do not matter


def _options(n: int, name: str) -> dict[str, Any]:
    opts = dict(OPTIONS[name])
    if opts.get("padding") == "pairs":
        opts["padding"] = [(1, 0), (0, 2), (1, 1)][:n]
    if isinstance(opts.get("stride"), tuple):
        opts["stride"] = opts["stride"][:n]
    return opts


def _reference(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, n: int, opts: dict[str, Any]) -> jax.Array:
    """The documented formula: ``lax.conv_general_dilated`` (channels last) plus the bias on the channel axis."""
    padding = opts.get("padding", "SAME")
    if isinstance(padding, int):
        padding = [(padding, padding)] * n

    def per_dim(key: str) -> tuple[int, ...]:
        value = opts.get(key, 1)
        return (value,) * n if isinstance(value, int) else tuple(value)

    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=per_dim("stride"),
        padding=padding,
        lhs_dilation=per_dim("lhs_dilation"),
        rhs_dilation=per_dim("rhs_dilation"),
        dimension_numbers=DIMENSION_NUMBERS[n],
        feature_group_count=opts.get("groups", 1),
    )
    return y if bias is None else y + bias


def _layer(rng: np.random.Generator, n: int, opts: dict[str, Any], bias: bool = True, mask: bool = False) -> Any:
    c_in, c_out = IN_SIZE[n][-1], 6
    kernel = jnp.asarray(rng.normal(size=(*KERNEL[n], c_in // opts.get("groups", 1), c_out)))
    b = jnp.asarray(rng.normal(size=(c_out,))) if bias else None
    w_mask = jnp.asarray(rng.uniform(size=kernel.shape) > 0.4, dtype=kernel.dtype) if mask else None
    layer = LAYERS[n](
        IN_SIZE[n], c_out, KERNEL[n] if n > 1 else KERNEL[n][0], w_init=kernel, b_init=b, w_mask=w_mask, **opts
    )
    return layer, (kernel if w_mask is None else kernel * w_mask), b


# every option appears for at least one rank; every rank runs at least two options
CASES = [
    (1, "same"),
    (1, "pairs_dilated_groups"),
    (1, "int_pad_lhs_dilation"),
    (2, "valid_stride"),
    (2, "int_pad_lhs_dilation"),
    (3, "same"),
    (3, "pairs_dilated_groups"),
]


@pytest.mark.parametrize(("n", "option"), CASES)
def test_conv_formula(rng: np.random.Generator, n: int, option: str) -> None:
    opts = _options(n, option)
    layer, kernel, b = _layer(rng, n, opts, bias=option != "valid_stride")
    x = jnp.asarray(rng.normal(size=(2, *IN_SIZE[n])))
    want = _reference(x, kernel, b, n, opts)
    assert want.shape[1:] == layer.out_size
    y = layer(x)
    np.testing.assert_allclose(y, want, rtol=1e-11, atol=1e-11)
    assert y.dtype == jnp.float64
    assert set(layer.weight.value) == ({"weight", "bias"} if b is not None else {"weight"})
    assert layer.weight.value["weight"].shape == (*KERNEL[n], IN_SIZE[n][-1] // opts.get("groups", 1), 6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_conv_batching_transforms_mask_and_marker(rng: np.random.Generator, n: int) -> None:
    opts = _options(n, "same")
    layer, kernel, b = _layer(rng, n, opts, mask=True)
    x = jnp.asarray(rng.normal(size=(4, *IN_SIZE[n])))
    want = _reference(x, kernel, b, n, opts)
    np.testing.assert_allclose(layer(x), want, rtol=1e-11, atol=1e-11)
    # unbatched: the layer adds and removes the batch axis
    np.testing.assert_allclose(layer(x[0]), want[0], rtol=1e-11, atol=1e-11)
    # extra leading batch axes are flattened and restored
    y = layer(x.reshape(2, 2, *IN_SIZE[n]))
    assert y.shape == (2, 2, *layer.out_size)
    np.testing.assert_allclose(y, want.reshape(2, 2, *want.shape[1:]), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(jax.jit(lambda v: layer(v))(x), want, rtol=1e-11, atol=1e-11)
    y = jax.vmap(layer)(x)
    np.testing.assert_allclose(y, want, rtol=1e-11, atol=1e-11)
    assert y.dtype == jnp.float64
    expected = {("weight", "weight"): {"etp_conv"}, ("weight", "bias"): {"etp_conv"}}
    assert param_leaves_reaching_etp(layer, x) == expected
    assert param_leaves_reaching_etp(layer, x[0]) == expected


def test_conv_default_initialisation() -> None:
    layer = etp_nn.Conv1d((5, 2), 3, 2)  # Kaiming-normal kernel, zero bias
    assert {k: v.shape for k, v in layer.weight.value.items()} == {"weight": (2, 2, 3), "bias": (3,)}
    assert layer.weight.value["weight"].dtype == jnp.float64
    assert layer.out_size == (5, 3)
    no_bias = etp_nn.Conv2d((5, 5, 3), 4, 3, b_init=None, w_init=ZEROS)
    assert set(no_bias.weight.value) == {"weight"} and no_bias.out_size == (5, 5, 4)
    assert etp_nn.Conv1d((8, 2), 3, 4, padding="VALID", stride=2, w_init=ZEROS).out_size == (3, 3)


def test_conv_input_errors() -> None:
    layer = etp_nn.Conv2d((6, 5, 4), 2, 3, w_init=ZEROS)
    with pytest.raises(
        ValueError, match=r"Conv2d: x must have 4 input channels .* shape \(\.\.\., 6, 5, 4\); got shape \(2, 6, 5, 3\)"
    ):
        layer(jnp.ones((2, 6, 5, 3)))
    # a 1-d batch (B, L, C) given to Conv2d: wrong number of spatial axes
    with pytest.raises(
        ValueError, match=r"Conv2d: x must have spatial shape \(6, 5\) .* \(\.\.\., 6, 5, 4\); got shape \(2, 5, 4\)"
    ):
        layer(jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=r"Conv2d: x must have shape .*\(\.\.\., 6, 5, 4\) .* got shape \(4,\)"):
        layer(jnp.ones((4,)))
    conv1 = etp_nn.Conv1d((9, 4), 2, 3, w_init=ZEROS)
    with pytest.raises(
        ValueError, match=r"Conv1d: x must have spatial shape \(9,\) .* \(\.\.\., 9, 4\); got shape \(2, 8, 4\)"
    ):
        conv1(jnp.ones((2, 8, 4)))


def test_conv_construction_errors() -> None:
    with pytest.raises(
        ValueError, match=r"Conv1d: kernel_size \(5,\) .* larger than the padded input .* in_size \(4, 2\)"
    ):
        etp_nn.Conv1d((4, 2), 3, 5, padding="VALID")
    with pytest.raises(ValueError, match=r"Conv2d: kernel_size \(3, 7\) .* spatial axis 1, W\) is larger than"):
        etp_nn.Conv2d((8, 5, 2), 3, (3, 7), padding=((0, 0), (1, 0)))
    with pytest.raises(ValueError, match=r"Conv1d: kernel_size \(3,\) \(dilated size 7 .*\) is larger"):
        etp_nn.Conv1d((6, 2), 3, 3, rhs_dilation=3, padding="VALID")
    with pytest.raises(ValueError, match=r"Conv2d: in_size must be \(H, W, C_in\), i.e. 3 positive ints"):
        etp_nn.Conv2d((8, 3), 3, 3)
    with pytest.raises(ValueError, match=r"Conv3d: in_size must be \(D, H, W, C_in\)"):
        etp_nn.Conv3d(8, 3, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Conv2d: kernel_size must be a positive int or 2 positive ints"):
        etp_nn.Conv2d((8, 8, 3), 3, (3, 3, 3))
    with pytest.raises(ValueError, match=r"Conv2d: groups=2 must divide both the input channels \(in_size\[-1\] = 3\)"):
        etp_nn.Conv2d((8, 8, 3), 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"Conv2d: padding must be 'SAME', 'VALID'"):
        etp_nn.Conv2d((8, 8, 3), 4, 3, padding="FULL")
    with pytest.raises(ValueError, match=r"Conv1d: w_init must give an array of shape \(3, 2, 4\)"):
        etp_nn.Conv1d((8, 2), 4, 3, w_init=jnp.ones((3, 4, 2)))
    with pytest.raises(ValueError, match=r"Conv1d: out_channels must be a positive int, got 0"):
        etp_nn.Conv1d((8, 2), 0, 3)
