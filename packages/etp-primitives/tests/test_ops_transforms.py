"""Every built-in ETP op behaves exactly like the plain JAX computation it marks.

Each entry of :data:`CASES` pairs

* ``etp_fn(x, *weights)`` -- the computation written with an ETP op, and
* ``plain_fn(x, *weights)`` -- the same computation written independently in
  plain JAX in this file (``x @ w + b``, ``lax.conv_general_dilated``, a dense
  matmul against the scattered sparse matrix, ``alpha * x @ B @ A + b``).

The tests then check, for every case, that the two agree (float64, tight
tolerances) under the forward pass, ``jit``, ``grad``, ``vmap`` (over ``x``
and over a weight), ``jvp``, ``jacfwd``/``jacrev``, per-sample gradients
(``vmap(grad)``) and ``grad(vmap)``; that dtypes are preserved; that the
marker primitive really appears in the traced program; that the
``xy_to_dw`` rule is the VJP of the plain function with respect to the
trainable inputs; and that ``init_drtrl``/``init_pp`` return zero traces of
the layouts documented in the op modules.

``element_wise`` has no input ``x``: its cases take a dummy ``x`` that they
ignore (gradients with respect to it are zero on both sides).

To stay fast, most comparisons compile the ETP and the plain side together in
one ``jax.jit`` (see :func:`both`); the forward test and ``EAGER_CASES`` also
run the primitives eagerly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit.sparse as ss
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

import etp_primitives as etp

Array = jax.Array

RTOL = 1e-12
ATOL = 1e-12
K = 3  # size of the extra vmapped axis


# ---------------------------------------------------------------------------
# Plain references (written independently of the library)
# ---------------------------------------------------------------------------


def _add_last(y: Array, b: Array) -> Array:
    """``y + b`` along the last axis with explicit broadcasting (rank promotion raises)."""
    return y + jnp.broadcast_to(b, y.shape)


def _plain_dense(x: Array, w: Array, *b: Array) -> Array:
    y = jnp.matmul(x, w)
    return _add_last(y, b[0]) if b else y


def _plain_lora(alpha: float) -> Callable[..., Array]:
    def fn(x: Array, lora_b: Array, lora_a: Array, *b: Array) -> Array:
        y = alpha * jnp.matmul(jnp.matmul(x, lora_b), lora_a)
        return _add_last(y, b[0]) if b else y

    return fn


def _plain_conv(
    dimension_numbers: Any,
    *,
    strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
) -> Callable[..., Array]:
    def fn(x: Array, kernel: Array, *b: Array) -> Array:
        y = lax.conv_general_dilated(
            x,
            kernel,
            window_strides=tuple(strides),
            padding=padding,
            lhs_dilation=None if lhs_dilation is None else tuple(lhs_dilation),
            rhs_dilation=None if rhs_dilation is None else tuple(rhs_dilation),
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
        )
        if not b:
            return y
        if dimension_numbers is None:  # lax default: NC..., bias along axis 1
            bias = jnp.reshape(b[0], (1, -1) + (1,) * (y.ndim - 2))
            return y + jnp.broadcast_to(bias, y.shape)
        return _add_last(y, b[0])  # N...C layouts used here: channels last

    return fn


def _pattern(mat: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of each stored value of a saiunit CSR / CSC / COO matrix, in ``data`` order."""
    if isinstance(mat, ss.CSR):
        rows = np.repeat(np.arange(mat.shape[0]), np.diff(np.asarray(mat.indptr)))
        return rows, np.asarray(mat.indices)
    if isinstance(mat, ss.CSC):
        cols = np.repeat(np.arange(mat.shape[1]), np.diff(np.asarray(mat.indptr)))
        return np.asarray(mat.indices), cols
    if isinstance(mat, ss.COO):
        return np.asarray(mat.row), np.asarray(mat.col)
    raise TypeError(type(mat))


def _plain_sparse(mat: Any) -> Callable[..., Array]:
    rows, cols = _pattern(mat)
    shape = tuple(mat.shape)

    def fn(x: Array, data: Array, *b: Array) -> Array:
        dense = jnp.zeros(shape, dtype=data.dtype).at[rows, cols].add(data)
        y = jnp.matmul(x, dense)
        return _add_last(y, b[0]) if b else y

    return fn


# ---------------------------------------------------------------------------
# The case table
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    prim: str  # name of the marker primitive etp_fn binds
    family: str  # dense | elemwise | conv | sparse | lora  (trace layout of init_drtrl)
    etp_fn: Callable[..., Array]
    plain_fn: Callable[..., Array]
    x_shape: tuple[int, ...]
    weight_shapes: tuple[tuple[int, ...], ...]
    keys: tuple[str, ...]  # trainable key of each weight, in argument order
    # plain function of the primitive's invars (default: plain_fn, the invars being (x, *weights))
    marker_plain: Callable[..., Array] | None = None
    uses_x: bool = True

    def make(self, rng: np.random.Generator, dtype: Any = np.float64) -> tuple[Array, tuple[Array, ...]]:
        x = jnp.asarray(rng.normal(size=self.x_shape), dtype=dtype)
        ws = tuple(jnp.asarray(rng.normal(size=s), dtype=dtype) for s in self.weight_shapes)
        return x, ws

    def make_like(self, rng: np.random.Generator, arrays: Sequence[Array]) -> tuple[Array, ...]:
        return tuple(jnp.asarray(rng.normal(size=a.shape), dtype=a.dtype) for a in arrays)


def _dense_cases() -> list[Case]:
    I, O = 5, 3
    out = []
    for tag, x_shape, prim in (("2d", (4, I), "etp_mm"), ("3d", (2, 3, I), "etp_mm"), ("1d", (I,), "etp_mv")):
        out.append(
            Case(
                f"matmul-{tag}-bias",
                prim,
                "dense",
                lambda x, w, b: etp.matmul(x, w, b),
                _plain_dense,
                x_shape,
                ((I, O), (O,)),
                ("weight", "bias"),
            )
        )
        out.append(
            Case(
                f"matmul-{tag}",
                prim,
                "dense",
                lambda x, w: etp.matmul(x, w),
                _plain_dense,
                x_shape,
                ((I, O),),
                ("weight",),
            )
        )
    return out


def _elemwise_cases() -> list[Case]:
    out = []
    for tag, fn in (("identity", None), ("sigmoid", jax.nn.sigmoid), ("abs", jnp.abs)):
        if fn is None:
            etp_fn = lambda x, w: etp.element_wise(w)  # noqa: E731
            plain = lambda x, w: w  # noqa: E731
        else:
            etp_fn = (lambda f: lambda x, w: etp.element_wise(w, fn=f))(fn)
            plain = (lambda f: lambda x, w: f(w))(fn)
        out.append(
            Case(
                f"elemwise-{tag}",
                "etp_elemwise",
                "elemwise",
                etp_fn,
                plain,
                (3,),
                ((2, 4),),
                ("weight",),
                marker_plain=lambda w_processed: w_processed,
                uses_x=False,
            )
        )
    return out


def _conv_case(
    cid: str,
    x_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    *,
    bias: bool,
    dimension_numbers: Any,
    strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
) -> Case:
    kw = dict(
        strides=strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
    )
    plain = _plain_conv(dimension_numbers, **kw)
    n_out = k_shape[0] if dimension_numbers is None else k_shape[-1]
    if bias:
        etp_fn = lambda x, k, b: etp.conv(x, k, b, dimension_numbers=dimension_numbers, **kw)  # noqa: E731
        return Case(cid + "-bias", "etp_conv", "conv", etp_fn, plain, x_shape, (k_shape, (n_out,)), ("weight", "bias"))
    etp_fn = lambda x, k: etp.conv(x, k, dimension_numbers=dimension_numbers, **kw)  # noqa: E731
    return Case(cid, "etp_conv", "conv", etp_fn, plain, x_shape, (k_shape,), ("weight",))


NWC = ("NWC", "WIO", "NWC")
NHWC = ("NHWC", "HWIO", "NHWC")
NDHWC = ("NDHWC", "DHWIO", "NDHWC")


def _conv_cases() -> list[Case]:
    # every spatial rank / layout / option; the bias-free path on three of them
    return [
        _conv_case(
            "conv1d-stride2-same", (2, 7, 4), (3, 4, 6), bias=True, dimension_numbers=NWC, strides=(2,), padding="SAME"
        ),
        _conv_case(
            "conv1d-valid", (2, 7, 4), (3, 4, 6), bias=False, dimension_numbers=NWC, strides=(1,), padding="VALID"
        ),
        _conv_case(
            "conv1d-pairs-dilated",
            (2, 5, 3),
            (3, 3, 4),
            bias=True,
            dimension_numbers=NWC,
            strides=(1,),
            padding=((1, 2),),
            lhs_dilation=(2,),
            rhs_dilation=(2,),
        ),
        _conv_case(
            "conv2d-fgc2",
            (2, 5, 5, 4),
            (3, 3, 2, 6),
            bias=True,
            dimension_numbers=NHWC,
            strides=(1, 2),
            padding="SAME",
            feature_group_count=2,
        ),
        _conv_case(
            "conv2d-bgc2",
            (4, 4, 4, 3),
            (2, 2, 3, 4),
            bias=True,
            dimension_numbers=NHWC,
            strides=(1, 1),
            padding="VALID",
            batch_group_count=2,
        ),
        _conv_case(
            "conv2d-bgc2",
            (4, 4, 4, 3),
            (2, 2, 3, 4),
            bias=False,
            dimension_numbers=NHWC,
            strides=(1, 1),
            padding="VALID",
            batch_group_count=2,
        ),
        _conv_case(
            "conv2d-pairs-rhs-dilated",
            (2, 6, 5, 2),
            (2, 2, 2, 3),
            bias=True,
            dimension_numbers=NHWC,
            strides=(2, 1),
            padding=((1, 0), (0, 1)),
            rhs_dilation=(2, 1),
        ),
        _conv_case(
            "conv3d",
            (2, 4, 4, 3, 2),
            (2, 2, 2, 2, 3),
            bias=True,
            dimension_numbers=NDHWC,
            strides=(1, 2, 1),
            padding="VALID",
        ),
        _conv_case(
            "conv1d-default-layout",
            (2, 3, 6),
            (4, 3, 3),
            bias=True,
            dimension_numbers=None,
            strides=(1,),
            padding="SAME",
        ),
        _conv_case(
            "conv1d-default-layout-stride2-pairs-dilated",
            (2, 3, 6),
            (4, 3, 3),
            bias=False,
            dimension_numbers=None,
            strides=(2,),
            padding=((2, 1),),
            rhs_dilation=(2,),
        ),
    ]


def _random_sparse_dense(seed: int, shape: tuple[int, int]) -> np.ndarray:
    r = np.random.default_rng(seed)
    dense = np.where(r.uniform(size=shape) < 0.3, r.normal(size=shape), 0.0)
    dense[0, 0] = 1.5  # at least one stored value whatever the draw
    return dense


SPARSE_DENSE = _random_sparse_dense(7, (5, 4))
SPARSE_MATS = {
    "csr": ss.CSR.fromdense(jnp.asarray(SPARSE_DENSE)),
    "coo": ss.COO.fromdense(jnp.asarray(SPARSE_DENSE)),
    "csc": ss.CSC.fromdense(jnp.asarray(SPARSE_DENSE)),
}


def _sparse_cases() -> list[Case]:
    I, O = SPARSE_DENSE.shape
    combos = [
        # (format, batched, bias): each format batched and unbatched, bias on and off across them
        ("csr", True, True),
        ("csr", False, False),
        ("coo", True, False),
        ("coo", False, True),
        ("csc", True, True),
        ("csc", False, False),
    ]
    out = []
    for fmt, batched, bias in combos:
        mat = SPARSE_MATS[fmt]
        nse = int(np.asarray(mat.data).shape[0])
        x_shape = (3, I) if batched else (I,)
        prim = "etp_sp_mm" if batched else "etp_sp_mv"
        cid = f"sparse-{fmt}-{'batched' if batched else 'unbatched'}{'-bias' if bias else ''}"
        if bias:
            etp_fn = (lambda m: lambda x, d, b: etp.sparse_matmul(x, d, sparse_mat=m, bias=b))(mat)
            out.append(
                Case(cid, prim, "sparse", etp_fn, _plain_sparse(mat), x_shape, ((nse,), (O,)), ("weight", "bias"))
            )
        else:
            etp_fn = (lambda m: lambda x, d: etp.sparse_matmul(x, d, sparse_mat=m))(mat)
            out.append(Case(cid, prim, "sparse", etp_fn, _plain_sparse(mat), x_shape, ((nse,),), ("weight",)))
    return out


def _lora_cases() -> list[Case]:
    I, R, O, alpha = 5, 2, 4, 0.5
    out = []
    for tag, x_shape, prim in (("batched", (3, I), "etp_lora_mm"), ("unbatched", (I,), "etp_lora_mv")):
        out.append(
            Case(
                f"lora-{tag}-bias",
                prim,
                "lora",
                lambda x, B, A, b: etp.lora_matmul(x, B, A, alpha=alpha, bias=b),
                _plain_lora(alpha),
                x_shape,
                ((I, R), (R, O), (O,)),
                ("lora_b", "lora_a", "bias"),
            )
        )
        out.append(
            Case(
                f"lora-{tag}",
                prim,
                "lora",
                lambda x, B, A: etp.lora_matmul(x, B, A, alpha=alpha),
                _plain_lora(alpha),
                x_shape,
                ((I, R), (R, O)),
                ("lora_b", "lora_a"),
            )
        )
    return out


CASES: list[Case] = _dense_cases() + _elemwise_cases() + _conv_cases() + _sparse_cases() + _lora_cases()
case_param = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def assert_trees_close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    a_leaves, a_def = jax.tree_util.tree_flatten(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten(expected)
    assert a_def == e_def, (a_def, e_def)
    for a, e in zip(a_leaves, e_leaves):
        assert jnp.shape(a) == jnp.shape(e), (jnp.shape(a), jnp.shape(e))
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def loss_of(fn: Callable[..., Array]) -> Callable[..., Array]:
    return lambda *args: jnp.sum(jnp.sin(fn(*args)))


def all_argnums(ws: Sequence[Any]) -> tuple[int, ...]:
    return tuple(range(1 + len(ws)))


def iter_eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of ``jaxpr`` and, recursively, of the jaxprs in its equations' params."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, (Jaxpr, ClosedJaxpr)):
                    yield from iter_eqns(v)


def etp_names(jaxpr: Any) -> list[str]:
    return [e.primitive.name for e in iter_eqns(jaxpr) if e.primitive.name.startswith("etp_")]


def etp_eqn_and_invals(fn: Callable[..., Array], *args: Array) -> tuple[Any, list[Any]]:
    """The single top-level ``etp_*`` equation of ``fn``'s jaxpr and the concrete values of its invars."""
    closed = jax.make_jaxpr(fn)(*args)
    marked = [e for e in closed.jaxpr.eqns if e.primitive.name.startswith("etp_")]
    assert len(marked) == 1, [e.primitive.name for e in closed.jaxpr.eqns]
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, args))
    for eqn in closed.jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn is marked[0]:
            return eqn, invals
        outs = eqn.primitive.bind(*invals, **eqn.params)
        env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
    raise AssertionError("unreachable")


def stacked(rng: np.random.Generator, a: Array, axis: int = 0) -> Array:
    """``K`` random arrays shaped like ``a``, stacked along ``axis``."""
    shape = list(a.shape)
    shape.insert(axis, K)
    return jnp.asarray(rng.normal(size=shape), dtype=a.dtype)


# Most comparisons evaluate the ETP and the plain computation under one ``jax.jit``
# (one compilation per test keeps the suite fast); ``EAGER_CASES`` repeats the
# main transformations op by op, where the primitive's ``impl`` runs eagerly.
# What is under test is the JAX-level program (the transformation rules); XLA's
# backend optimisations would only cost compile time here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def both(transform: Callable[[Callable[..., Array]], Callable[..., Any]], case: Case, *args: Any) -> tuple[Any, Any]:
    """``transform(etp_fn)(*args)`` and ``transform(plain_fn)(*args)``, compiled together."""
    fn = lambda *a: (transform(case.etp_fn)(*a), transform(case.plain_fn)(*a))  # noqa: E731
    return jax.jit(fn, compiler_options=FAST_COMPILE)(*args)


# ---------------------------------------------------------------------------
# 1-2. forward (eager), the marker is bound, jit
# ---------------------------------------------------------------------------


@case_param
def test_forward_and_jit_match_plain(case: Case, rng: np.random.Generator) -> None:
    x, ws = case.make(rng)
    want = case.plain_fn(x, *ws)
    y = case.etp_fn(x, *ws)
    assert_trees_close(y, want)  # eager: the primitive's impl
    assert y.dtype == jnp.float64
    assert_trees_close(jax.jit(case.etp_fn)(x, *ws), want)  # compiled: the primitive's lowering

    jaxpr = jax.make_jaxpr(case.etp_fn)(x, *ws)
    assert etp_names(jaxpr) == [case.prim]
    eqn = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("etp_"))
    assert etp.is_etp_primitive(eqn.primitive)
    assert set(etp.trainable_invars(eqn.primitive, eqn.params)) == set(case.keys)
    assert etp_names(jax.make_jaxpr(jax.jit(case.etp_fn))(x, *ws)) == [case.prim]


# ---------------------------------------------------------------------------
# 3, 5, 6. grad, jvp, jacfwd / jacrev (one compilation per case)
# ---------------------------------------------------------------------------


@case_param
def test_grad_jvp_and_jacobians_match_plain(case: Case, rng: np.random.Generator) -> None:
    x, ws = case.make(rng)
    primals = (x, *ws)
    tangents = case.make_like(rng, primals)
    argnums = all_argnums(ws)
    weights = argnums[1:]

    def autodiff(f: Callable[..., Array]) -> Callable[..., Any]:
        def run(p: tuple[Array, ...], t: tuple[Array, ...]) -> dict[str, Any]:
            return {
                "grad": jax.grad(loss_of(f), argnums=argnums)(*p),  # w.r.t. x and every weight
                "jvp": jax.jvp(f, p, t),  # random tangents for every argument
                "jacfwd_w": jax.jacfwd(f, argnums=weights)(*p),
                "jacrev_w": jax.jacrev(f, argnums=weights)(*p),
                "jacfwd_x": jax.jacfwd(f, argnums=0)(*p),
                "jacrev_x": jax.jacrev(f, argnums=0)(*p),
            }

        return run

    got, want = both(autodiff, case, primals, tangents)
    assert_trees_close(got, want)
    # float64 in, float64 out: primal, tangent and every gradient
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(got)} == {jnp.dtype(jnp.float64)}
    if not case.uses_x:
        assert not np.any(np.asarray(got["grad"][0]))
    # the marker survives differentiation (the primal is still a bind of the primitive)
    assert case.prim in etp_names(jax.make_jaxpr(jax.grad(loss_of(case.etp_fn), argnums=argnums))(x, *ws))


# ---------------------------------------------------------------------------
# 4. vmap: over x (first or last axis), over each weight, over everything
# ---------------------------------------------------------------------------


@case_param
def test_vmap_matches_plain(case: Case, rng: np.random.Generator) -> None:
    x, ws = case.make(rng)
    n = len(ws)
    calls: list[tuple[tuple[int | None, ...], tuple[Array, ...]]] = []
    for axis in (0, x.ndim):  # an extra axis of x, weights unbatched
        calls.append(((axis,) + (None,) * n, (stacked(rng, x, axis), *ws)))
    for j in range(n):  # one batched weight at a time (per-example parameters)
        batched = list(ws)
        batched[j] = stacked(rng, ws[j])
        calls.append((tuple(0 if i == j + 1 else None for i in range(1 + n)), (x, *batched)))
    calls.append(((0,) * (1 + n), (stacked(rng, x), *(stacked(rng, w) for w in ws))))  # everything batched

    def all_vmaps(f: Callable[..., Array]) -> Callable[..., Any]:
        return lambda *arg_sets: [jax.vmap(f, in_axes=axes)(*args) for (axes, _), args in zip(calls, arg_sets)]

    got, want = both(all_vmaps, case, *(args for _, args in calls))
    assert_trees_close(got, want)


# ---------------------------------------------------------------------------
# 7. per-sample gradients (vmap of grad) and the gradient of a vmapped loss
# ---------------------------------------------------------------------------


@case_param
def test_vmap_of_grad_and_grad_of_vmap_match_plain(case: Case, rng: np.random.Generator) -> None:
    x, ws = case.make(rng)
    xs = stacked(rng, x)
    argnums = all_argnums(ws)
    in_axes = (0,) + (None,) * len(ws)

    def per_sample_and_batch_grads(f: Callable[..., Array]) -> Callable[..., Any]:
        batched_loss = lambda *a: jnp.sum(jnp.sin(jax.vmap(f, in_axes=in_axes)(*a)))  # noqa: E731
        return lambda *a: (
            jax.vmap(jax.grad(loss_of(f), argnums=argnums), in_axes=in_axes)(*a),
            jax.grad(batched_loss, argnums=argnums)(*a),
        )

    got, want = both(per_sample_and_batch_grads, case, xs, *ws)
    assert_trees_close(got, want)


# ---------------------------------------------------------------------------
# The same transformations op by op (the primitive's impl and rules run eagerly)
# ---------------------------------------------------------------------------

EAGER_CASES = [
    c
    for c in CASES
    if c.id
    in ("matmul-1d", "elemwise-sigmoid", "conv1d-default-layout-bias", "sparse-csr-unbatched", "lora-unbatched-bias")
]


@pytest.mark.parametrize("case", EAGER_CASES, ids=[c.id for c in EAGER_CASES])
def test_eager_grad_and_vmap_match_plain(case: Case, rng: np.random.Generator) -> None:
    x, ws = case.make(rng)
    argnums = all_argnums(ws)
    assert_trees_close(
        jax.grad(loss_of(case.etp_fn), argnums=argnums)(x, *ws),
        jax.grad(loss_of(case.plain_fn), argnums=argnums)(x, *ws),
    )
    xs = stacked(rng, x)
    in_axes = (0,) + (None,) * len(ws)
    assert_trees_close(
        jax.vmap(case.etp_fn, in_axes=in_axes)(xs, *ws), jax.vmap(case.plain_fn, in_axes=in_axes)(xs, *ws)
    )


# ---------------------------------------------------------------------------
# 8. dtypes
# ---------------------------------------------------------------------------


@case_param
def test_float32_stays_float32(case: Case, rng: np.random.Generator) -> None:
    """float32 in, float32 out (float64 in, float64 out is asserted by the forward and autodiff tests)."""
    x, ws = case.make(rng, np.float32)
    y = case.etp_fn(x, *ws)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(case.plain_fn(x, *ws)), rtol=1e-5, atol=1e-5)
    # what jit / make_jaxpr see, for the output and every gradient
    assert jax.eval_shape(case.etp_fn, x, *ws).dtype == jnp.float32
    grads = jax.eval_shape(jax.grad(loss_of(case.etp_fn), argnums=all_argnums(ws)), x, *ws)
    assert [g.dtype for g in grads] == [jnp.float32] * len(grads)


# ---------------------------------------------------------------------------
# 9. xy_to_dw is the VJP of the plain function w.r.t. the trainable inputs
# ---------------------------------------------------------------------------


@case_param
def test_xy_to_dw_is_vjp_of_plain(case: Case, rng: np.random.Generator) -> None:
    x, ws = case.make(rng)
    eqn, invals = etp_eqn_and_invals(case.etp_fn, x, *ws)
    prim = eqn.primitive
    assert prim.name == case.prim
    if case.marker_plain is None:
        # the marker sees exactly (x, *weights)
        assert_trees_close(tuple(invals), (x, *ws), rtol=0, atol=0)
    layout = etp.trainable_invars(prim, eqn.params)
    assert layout == {key: (i if case.marker_plain is not None else i + 1) for i, key in enumerate(case.keys)}
    x_index = etp.ETP_X_INVAR_INDICES[prim]
    x_val = None if x_index is None else invals[x_index]
    weights = {key: invals[i] for key, i in layout.items()}
    y_aval = eqn.outvars[etp.ETP_Y_OUTVAR_INDICES[prim]].aval
    cotangent = jnp.asarray(rng.normal(size=y_aval.shape), dtype=y_aval.dtype)
    marker_plain = case.marker_plain or case.plain_fn

    def rule_and_reference(x_: Any, ct: Array, trainables: dict[str, Array]) -> tuple[Any, Any]:
        got = etp.ETP_RULES_XY_TO_DW[prim](x_, ct, dict(trainables), **eqn.params)

        def plain_of_weights(tr: dict[str, Array]) -> Array:
            args = list(invals)
            if x_index is not None:
                args[x_index] = x_
            for key, i in layout.items():
                args[i] = tr[key]
            return marker_plain(*args)

        _, pullback = jax.vjp(plain_of_weights, trainables)
        (want,) = pullback(ct)
        return dict(got), dict(want)

    got, want = jax.jit(rule_and_reference)(x_val, cotangent, weights)
    assert set(got) == set(want) == set(case.keys)
    assert_trees_close(got, want)
    for key in got:
        assert got[key].dtype == weights[key].dtype


@pytest.mark.parametrize("case", [c for c in CASES if c.family == "elemwise"], ids=lambda c: c.id)
def test_elemwise_xy_to_dw_chains_to_raw_weight_grad(case: Case, rng: np.random.Generator) -> None:
    """For element_wise, xy_to_dw is w.r.t. fn(w); pulling it back through fn gives the raw-weight VJP."""
    x, (w,) = case.make(rng)
    eqn, (processed,) = etp_eqn_and_invals(case.etp_fn, x, w)
    assert_trees_close(processed, case.plain_fn(x, w))
    cotangent = jnp.asarray(rng.normal(size=w.shape))
    dw_processed = etp.ETP_RULES_XY_TO_DW[eqn.primitive](None, cotangent, {"weight": processed}, **eqn.params)["weight"]
    fn_of_w = lambda w_: case.plain_fn(x, w_)  # noqa: E731
    (through_fn,) = jax.vjp(fn_of_w, w)[1](dw_processed)
    (want,) = jax.vjp(lambda w_: case.etp_fn(x, w_), w)[1](cotangent)
    assert_trees_close(through_fn, want)


# ---------------------------------------------------------------------------
# 10. init_drtrl / init_pp
# ---------------------------------------------------------------------------


def expected_drtrl_shapes(
    family: str, x: tuple[int, ...] | None, y: tuple[int, ...], w: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """The D-RTRL trace layouts documented in the op modules (without the trailing state axis).

    * dense (``_dense``): weight ``(*x.shape[:-1], I, O)``, bias ``(*x.shape[:-1], O) == y.shape``;
    * elemwise (``_elemwise``): weight shaped like the processed weight ``fn(w)``;
    * conv (``_conv``): weight = the filtered input, ``x.shape``; bias ``y.shape``;
    * sparse (``_sparse``): weight ``(*x.shape[:-1], nse)``, bias ``y.shape``;
    * lora (``_lora``): lora_b = the filtered input, ``x.shape``; lora_a ``(*x.shape[:-1], R, O)``;
      bias ``y.shape``.

    ``init_pp`` of every op: ``(*y.shape, num_hidden_state)`` in ``y``'s dtype.
    """
    if family == "elemwise":
        return {"weight": w["weight"]}
    assert x is not None
    lead = x[:-1]
    if family == "dense":
        out = {"weight": (*lead, *w["weight"])}
    elif family == "conv":
        out = {"weight": x}
    elif family == "sparse":
        out = {"weight": (*lead, *w["weight"])}
    elif family == "lora":
        out = {"lora_b": x, "lora_a": (*lead, *w["lora_a"])}
    else:
        raise AssertionError(family)
    if "bias" in w:
        out["bias"] = y
    return out


@case_param
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_init_rules(case: Case, dtype: Any, rng: np.random.Generator) -> None:
    x, ws = case.make(rng, dtype)
    jaxpr = jax.make_jaxpr(case.etp_fn)(x, *ws)
    eqn = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("etp_"))
    prim = eqn.primitive
    layout = etp.trainable_invars(prim, eqn.params)
    x_index = etp.ETP_X_INVAR_INDICES[prim]
    x_var = None if x_index is None else eqn.invars[x_index]
    y_var = eqn.outvars[etp.ETP_Y_OUTVAR_INDICES[prim]]
    weight_vars = {key: eqn.invars[i] for key, i in layout.items()}
    if case.uses_x:
        assert x_var.aval.shape == x.shape
    assert y_var.aval.shape == jax.eval_shape(case.plain_fn, x, *ws).shape
    expected = expected_drtrl_shapes(
        case.family,
        None if x_var is None else tuple(x_var.aval.shape),
        tuple(y_var.aval.shape),
        {key: tuple(v.aval.shape) for key, v in weight_vars.items()},
    )

    for num_hidden_state in (1, 3):
        trace = etp.ETP_RULES_INIT_DRTRL[prim](x_var, y_var, weight_vars, num_hidden_state)
        assert set(trace) == set(expected) == set(layout)
        for key, leaf in trace.items():
            assert leaf.shape == (*expected[key], num_hidden_state), key
            assert leaf.dtype == weight_vars[key].aval.dtype == dtype, key
            assert not np.any(np.asarray(leaf)), key

        pp = etp.ETP_RULES_INIT_PP[prim](x_var, y_var, weight_vars, num_hidden_state)
        leaves = jax.tree_util.tree_leaves(pp)
        assert leaves
        for leaf in leaves:
            assert leaf.shape == (*y_var.aval.shape, num_hidden_state)
            assert leaf.dtype == y_var.aval.dtype == dtype
            assert not np.any(np.asarray(leaf))


# ---------------------------------------------------------------------------
# The marker under vmap
# ---------------------------------------------------------------------------

_BATCHED_NAME = {"etp_mv": "etp_mm", "etp_sp_mv": "etp_sp_mm", "etp_lora_mv": "etp_lora_mm"}
# batch_group_count > 1 convolutions fall back to vmap of the implementation (documented in _conv)
_MARKER_CASES = [c for c in CASES if c.uses_x and "bgc2" not in c.id]


@pytest.mark.parametrize("case", _MARKER_CASES, ids=[c.id for c in _MARKER_CASES])
def test_vmap_over_x_keeps_the_marker(case: Case, rng: np.random.Generator) -> None:
    """A vmap over x alone becomes one more leading axis of the batched primitive (etp_mv -> etp_mm, ...)."""
    x, ws = case.make(rng)
    in_axes = (0,) + (None,) * len(ws)
    jaxpr = jax.make_jaxpr(jax.vmap(case.etp_fn, in_axes=in_axes))(stacked(rng, x), *ws)
    assert etp_names(jaxpr) == [_BATCHED_NAME.get(case.prim, case.prim)]


def test_vmap_of_unbatched_matmul_binds_etp_mm(rng: np.random.Generator) -> None:
    x, w, b = (jnp.asarray(rng.normal(size=s)) for s in ((K, 5), (5, 3), (3,)))
    f = lambda x_, w_, b_: etp.matmul(x_, w_, b_)  # noqa: E731
    assert etp_names(jax.make_jaxpr(f)(x[0], w, b)) == ["etp_mv"]
    vf = jax.vmap(f, in_axes=(0, None, None))
    jaxpr = jax.make_jaxpr(vf)(x, w, b)
    assert etp_names(jaxpr) == ["etp_mm"]
    eqn = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "etp_mm")
    assert [v.aval.shape for v in eqn.invars] == [(K, 5), (5, 3), (3,)]
    assert_trees_close(vf(x, w, b), _plain_dense(x, w, b))


def test_vmap_of_element_wise_over_weight_keeps_the_marker(rng: np.random.Generator) -> None:
    ws = jnp.asarray(rng.normal(size=(K, 2, 4)))
    f = jax.vmap(lambda w: etp.element_wise(w, fn=jax.nn.sigmoid))
    assert etp_names(jax.make_jaxpr(f)(ws)) == ["etp_elemwise"]
    assert_trees_close(f(ws), jax.nn.sigmoid(ws))


# ---------------------------------------------------------------------------
# Sparse: the pattern, and jit with the matrix as an argument or closed over
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(SPARSE_MATS))
def test_sparse_reference_matches_saiunit(fmt: str, rng: np.random.Generator) -> None:
    """Sanity of the plain reference: it scatters data where saiunit's todense puts it."""
    mat = SPARSE_MATS[fmt]
    nse = int(np.asarray(mat.data).shape[0])
    assert 0 < nse < SPARSE_DENSE.size
    x = jnp.asarray(rng.normal(size=(3, SPARSE_DENSE.shape[0])))
    # with the matrix's own values the op is x @ dense
    assert_trees_close(etp.sparse_matmul(x, mat.data, sparse_mat=mat), x @ jnp.asarray(SPARSE_DENSE, mat.data.dtype))
    data = jnp.asarray(rng.normal(size=(nse,)), dtype=mat.data.dtype)
    want = x @ mat.with_data(data).todense()
    assert_trees_close(_plain_sparse(mat)(x, data), want)
    assert_trees_close(etp.sparse_matmul(x, data, sparse_mat=mat), want)


@pytest.mark.parametrize("fmt", sorted(SPARSE_MATS))
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_sparse_jit_with_matrix_as_argument_or_closed_over(fmt: str, batched: bool, rng: np.random.Generator) -> None:
    mat = SPARSE_MATS[fmt]
    nse = int(np.asarray(mat.data).shape[0])
    I, O = SPARSE_DENSE.shape
    x = jnp.asarray(rng.normal(size=(3, I) if batched else (I,)))
    data = jnp.asarray(rng.normal(size=(nse,)))
    b = jnp.asarray(rng.normal(size=(O,)))
    want = _plain_sparse(mat)(x, data, b)

    as_argument = jax.jit(lambda x_, d_, m_, b_: etp.sparse_matmul(x_, d_, sparse_mat=m_, bias=b_))
    assert_trees_close(as_argument(x, data, mat, b), want)
    # the matrix's values are a traced leaf and its indices static aux data: another matrix with
    # the same pattern but other values reuses the trace; only weight_data enters the product
    assert_trees_close(as_argument(x, data, mat.with_data(mat.data * 2.0), b), want)
    prim = "etp_sp_mm" if batched else "etp_sp_mv"
    assert etp_names(jax.make_jaxpr(as_argument)(x, data, mat, b)) == [prim]

    closed_over = jax.jit(lambda x_, d_, b_: etp.sparse_matmul(x_, d_, sparse_mat=mat, bias=b_))
    assert_trees_close(closed_over(x, data, b), want)

    grad_fn = jax.jit(jax.grad(lambda d_, m_: jnp.sum(jnp.sin(etp.sparse_matmul(x, d_, sparse_mat=m_)))))
    g_ref = jax.grad(lambda d_: jnp.sum(jnp.sin(_plain_sparse(mat)(x, d_))))(data)
    assert_trees_close(grad_fn(data, mat), g_ref)
