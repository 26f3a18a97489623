"""The four distributions build, and their wheels and sdists carry the declared metadata.

``uv build --all-packages`` into a temporary directory, then ``.ci/check_dists.py`` reads each
wheel's ``METADATA`` and each sdist's ``PKG-INFO`` with ``email.parser``. The checker is also
run on tampered copies of the built wheels, so a check that cannot fail would show here.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_dists", ROOT / ".ci" / "check_dists.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check_dists = _load_checker()


def _rewrite_wheel(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Copy a wheel, passing each member through ``edit`` (``None`` drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = edit(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item, data)


def _metadata_edit(old: str, new: str) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name.endswith(".dist-info/METADATA"):
            text = data.decode()
            assert old in text, old
            return text.replace(old, new, 1).encode()
        return data

    return edit


def _drop(suffix: str) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: None if name.endswith(suffix) else data


TAMPERINGS: dict[str, tuple[str, Callable[[str, bytes], bytes | None], str]] = {
    "no py.typed": ("etp_compiler", _drop("etp_compiler/py.typed"), "py.typed missing"),
    "no LICENSE": ("etp_nn", _drop("licenses/LICENSE"), "LICENSE missing"),
    "wrong license": ("etp_primitives", _metadata_edit("License-Expression: Apache-2.0", "License-Expression: MIT"), "License-Expression"),
    "unbounded sibling": ("etp_nn", _metadata_edit("etp-algorithms<0.2,>=0.1.0", "etp-algorithms>=0.1.0"), "sibling requirement"),
    "undeclared dependency": ("etp_compiler", _metadata_edit("Requires-Dist: numpy>=1.26", "Requires-Dist: numpy>=1.26\nRequires-Dist: torch>=2"), "Requires-Dist"),
    "no docs url": ("etp_algorithms", _metadata_edit("Project-URL: Documentation, https://etp-dev.github.io/etp\n", ""), "Project-URL"),
    "license classifier": ("etp_primitives", _metadata_edit("Classifier: Typing :: Typed", "Classifier: Typing :: Typed\nClassifier: License :: OSI Approved :: Apache Software License"), "license classifier"),
    "stale readme": ("etp_nn", _metadata_edit("# etp-nn\n", "# etp-nn (old)\n"), "README"),
    "python floor": ("etp_algorithms", _metadata_edit("Requires-Python: >=3.11", "Requires-Python: >=3.8"), "Requires-Python"),
}  # fmt: skip


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [uv, "build", "--all-packages", "--out-dir", str(out)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return out


def test_built_wheels_and_sdists_carry_the_declared_metadata(dist: Path) -> None:
    assert sorted(p.name for p in dist.iterdir() if p.suffix in (".whl", ".gz")) == sorted(
        f"{n.replace('-', '_')}-0.1.0{s}" for n in check_dists.PACKAGES for s in ("-py3-none-any.whl", ".tar.gz")
    )
    assert check_dists.check_dist_dir(dist) == []


@pytest.mark.parametrize("case", TAMPERINGS)
def test_checker_catches_a_tampered_wheel(dist: Path, tmp_path: Path, case: str) -> None:
    stem, edit, expected = TAMPERINGS[case]
    bad = tmp_path / "dist"
    bad.mkdir()
    for path in dist.iterdir():
        if path.name.startswith(f"{stem}-") and path.suffix == ".whl":
            _rewrite_wheel(path, bad / path.name, edit)
        else:
            shutil.copy(path, bad / path.name)
    errors = check_dists.check_dist_dir(bad)
    assert errors, case
    assert all(e.startswith(f"{stem}-") for e in errors), errors
    assert any(expected in e for e in errors), errors


def test_every_package_ships_the_root_license() -> None:
    license_text = (ROOT / "LICENSE").read_bytes()
    assert b"Apache License" in license_text and b"Version 2.0, January 2004" in license_text
    for name in check_dists.PACKAGES:
        assert (ROOT / "packages" / name / "LICENSE").read_bytes() == license_text, name
