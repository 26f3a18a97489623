"""``sparse_matmul`` takes any saiunit ``SparseMatrix`` in CSR, CSC or COO layout, subclasses and foreign classes too.

Foreign classes are written here the way brainevent writes its ``CSR``: a
direct ``saiunit.sparse.SparseMatrix`` subclass named ``CSR`` (not a subclass
of ``saiunit.sparse.CSR``). Oracle: ``x @ dense``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit.sparse as ss

import etp_primitives as etp


class EventCSR(ss.CSR):
    """A saiunit CSR subclass, as another library would define one."""


class EventCSC(ss.CSC):
    """A saiunit CSC subclass."""


class EventCOO(ss.COO):
    """A saiunit COO subclass."""


def _subclass_from(cls: type, dense: np.ndarray) -> Any:
    """An instance of a saiunit CSR/CSC/COO subclass holding ``dense`` (``fromdense`` returns the base class)."""
    base = next(b for b in (ss.CSR, ss.CSC, ss.COO) if issubclass(cls, b))
    m = base.fromdense(jnp.asarray(dense))
    if base is ss.COO:
        return cls((m.data, m.row, m.col), shape=dense.shape)
    return cls((m.data, m.indices, m.indptr), shape=dense.shape)


def _foreign(name: str, fields: tuple[str, ...], **extra: Any) -> type:
    """A direct ``SparseMatrix`` subclass called ``name`` holding ``(data, *fields)``."""

    def __init__(self: Any, args: tuple[Any, ...], *, shape: tuple[int, int]) -> None:
        ss.SparseMatrix.__init__(self, args, shape=shape)
        self.data = args[0]
        for field, value in zip(fields, args[1:], strict=True):
            setattr(self, field, value)

    return type(name, (ss.SparseMatrix,), {"__init__": __init__, **extra})


ForeignCSR = _foreign("CSR", ("indices", "indptr"))
ForeignCSC = _foreign("CSC", ("indices", "indptr"))
ForeignCOO = _foreign("COO", ("row", "col"))
Scipyish = _foreign("PatternMatrix", ("row", "col"), format="coo")
Unsupported = _foreign("FixedPostNumConn", ("indices",))
CSRWithoutIndptr = _foreign("CSR", ("indices",))


@pytest.fixture
def dense(rng: np.random.Generator) -> np.ndarray:
    return np.where(rng.random((5, 4)) < 0.5, rng.normal(size=(5, 4)), 0.0)


def _foreign_from(cls: type, dense: np.ndarray) -> Any:
    """A foreign matrix with the layout of ``cls``'s name (or its ``format``), built from ``dense``."""
    layout = getattr(cls, "format", cls.__name__.lower())
    if layout == "csr":
        m = ss.CSR.fromdense(jnp.asarray(dense))
        return cls((m.data, m.indices, m.indptr), shape=dense.shape)
    if layout == "csc":
        m = ss.CSC.fromdense(jnp.asarray(dense))
        return cls((m.data, m.indices, m.indptr), shape=dense.shape)
    rows, cols = np.nonzero(dense)
    return cls((jnp.asarray(dense[rows, cols]), jnp.asarray(rows), jnp.asarray(cols)), shape=dense.shape)


@pytest.mark.parametrize(
    ("make", "layout"),
    [
        (lambda d: _subclass_from(EventCSR, d), "csr"),
        (lambda d: _subclass_from(EventCSC, d), "csc"),
        (lambda d: _subclass_from(EventCOO, d), "coo"),
        (lambda d: _foreign_from(ForeignCSR, d), "csr"),
        (lambda d: _foreign_from(ForeignCSC, d), "csc"),
        (lambda d: _foreign_from(ForeignCOO, d), "coo"),
        (lambda d: _foreign_from(Scipyish, d), "coo"),
    ],
    ids=["saiunit-CSR-subclass", "saiunit-CSC-subclass", "saiunit-COO-subclass", "foreign-CSR", "foreign-CSC", "foreign-COO", "format-attribute"],
)  # fmt: skip
def test_layouts_of_subclasses_and_foreign_classes(
    make: Any, layout: str, dense: np.ndarray, rng: np.random.Generator
) -> None:
    mat = make(dense)
    assert type(mat) not in (ss.CSR, ss.CSC, ss.COO)
    pattern = etp.SparseStructure.from_sparse(mat)
    assert pattern.format == layout and pattern.shape == dense.shape and pattern.nse == int(np.count_nonzero(dense))
    np.testing.assert_allclose(pattern.todense(jnp.asarray(mat.data)), dense, rtol=1e-15)
    x = jnp.asarray(rng.normal(size=(3, 5)))
    y = etp.sparse_matmul(x, mat.data, sparse_mat=mat)
    np.testing.assert_allclose(y, x @ dense, rtol=1e-12, atol=1e-12)
    y1 = jax.jit(lambda x, w: etp.sparse_matmul(x, w, sparse_mat=mat))(x[0], mat.data)
    np.testing.assert_allclose(y1, x[0] @ dense, rtol=1e-12, atol=1e-12)
    # the gradient w.r.t. the stored values: d(sum y)/d w_k = sum_b x_{b, row_k}
    g = jax.grad(lambda w: jnp.sum(etp.sparse_matmul(x, w, sparse_mat=mat)))(jnp.asarray(mat.data))
    np.testing.assert_allclose(g, jnp.sum(x, axis=0)[pattern.rows], rtol=1e-12)


@pytest.mark.parametrize("cls", [Unsupported, ss.SparseMatrix], ids=["foreign", "base-class"])
def test_other_layouts_raise_naming_the_class(cls: type) -> None:
    mat = (
        cls((jnp.ones(2), jnp.zeros(2, dtype=jnp.int32)), shape=(2, 2)) if cls is Unsupported else cls((), shape=(2, 2))
    )
    with pytest.raises(TypeError) as info:
        etp.sparse_matmul(jnp.ones((1, 2)), jnp.ones(2), sparse_mat=mat)
    msg = str(info.value)
    assert msg.startswith("sparse_matmul (etp_sp_mm): sparse_mat is a "), msg
    assert f"{cls.__module__}.{cls.__qualname__}" in msg, msg
    assert "layout is not CSR, CSC or COO" in msg and "saiunit.sparse.CSR, CSC, COO" in msg, msg
    assert "unsupported sparse format CSR" not in msg


def test_layout_without_its_index_arrays_raises() -> None:
    mat = CSRWithoutIndptr((jnp.ones(2), jnp.zeros(2, dtype=jnp.int32)), shape=(2, 2))
    with pytest.raises(TypeError, match=r"sparse_mat is a .*CSR in CSR layout but has no indptr attribute"):
        etp.sparse_matmul(jnp.ones(2), jnp.ones(2), sparse_mat=mat)


def test_layout_detection() -> None:
    eye = jnp.eye(2)
    assert etp.SparseStructure.from_sparse(ss.CSR.fromdense(eye)).format == "csr"
    assert etp.SparseStructure.from_sparse(ss.CSC.fromdense(eye)).format == "csc"
    assert etp.SparseStructure.from_sparse(ss.COO.fromdense(eye)).format == "coo"
    with pytest.raises(TypeError, match=r"saiunit sparse matrix.*ndarray"):
        etp.SparseStructure.from_sparse(np.eye(2))
