"""Import contracts: no package imports a distribution it does not declare.

Every module under ``packages/*/src`` is parsed with :mod:`ast`; each absolute import
(``import x``, ``from x import y``, ``importlib.import_module('x')``, anywhere in the module,
``TYPE_CHECKING`` blocks included) is mapped to the distribution that provides its top-level
name and must be the package itself, the standard library, or one of the package's declared
``[project] dependencies``. A sibling that is only a transitive dependency (``saiunit`` through
``etp-primitives``) does not count: it has to be declared where it is imported.

The package tests get the same check with a short, explicit list of test-only additions.
``.ci/isolation.sh`` runs each package's tests with exactly its declared dependencies installed.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Test-only imports of each package's tests beyond its declared dependencies (kept in step with
#: .ci/isolation.sh, which installs the etp-nn named here without its dependencies).
#: The compiler and learner tests use etp-nn's layers as subjects, and write units with saiunit.
TEST_ONLY_DEPENDENCIES: dict[str, frozenset[str]] = {
    "etp-primitives": frozenset(),
    "etp-compiler": frozenset({"etp-nn", "saiunit"}),
    "etp-algorithms": frozenset({"etp-nn", "saiunit"}),
    "etp-nn": frozenset(),
}
TEST_TOOLS = frozenset({"pytest", "pytest-xdist", "hypothesis"})


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Package:
    name: str
    directory: Path
    dependencies: frozenset[str]
    import_names: frozenset[str]


def load_packages(root: Path = ROOT) -> dict[str, Package]:
    """Each ``packages/*/pyproject.toml``: its name, declared dependency names and wheel import names."""
    packages = {}
    for pyproject in sorted((root / "packages").glob("*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text())
        deps = frozenset(
            normalize(re.match(r"[A-Za-z0-9._-]+", req).group(0))  # type: ignore[union-attr]
            for req in data["project"].get("dependencies", [])
        )
        wheel_packages = data["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
        name = normalize(data["project"]["name"])
        imports = frozenset(Path(p).name for p in wheel_packages)
        packages[name] = Package(name, pyproject.parent, deps, imports)
    return packages


def imported_top_names(source: str, filename: str = "<string>") -> list[tuple[str, int]]:
    """``(top-level module name, line)`` of every absolute import in ``source``."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            arg = node.args[0]
            if (
                fname in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                if not arg.value.startswith("."):
                    found.append((arg.value.split(".")[0], node.lineno))
    return found


@functools.cache
def _installed_import_names() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution_of(top: str, packages: dict[str, Package]) -> str | None:
    """The distribution providing import name ``top``; ``None`` for the standard library.

    Raises ``LookupError`` for a name no installed distribution provides.
    """
    if top in sys.stdlib_module_names or top == "__future__":
        return None
    for pkg in packages.values():
        if top in pkg.import_names:
            return pkg.name
    dists = _installed_import_names().get(top)
    if not dists:
        raise LookupError(f"no installed distribution provides the import name {top!r}")
    return normalize(dists[0])


def violations(
    pkg: Package,
    packages: dict[str, Package],
    files: list[Path],
    allowed_extra: frozenset[str] = frozenset(),
    local_modules: frozenset[str] = frozenset(),
) -> list[str]:
    """``file:line: imports X (distribution D), not declared by P`` for every offending import."""
    allowed = pkg.dependencies | allowed_extra | {pkg.name}
    problems = []
    for path in files:
        for top, line in imported_top_names(path.read_text(), str(path)):
            if top in local_modules:
                continue
            where = f"{path.relative_to(pkg.directory.parent.parent)}:{line}"
            try:
                dist = distribution_of(top, packages)
            except LookupError as err:
                problems.append(f"{where}: {err}")
                continue
            if dist is not None and dist not in allowed:
                problems.append(f"{where}: imports {top} (distribution {dist}), not declared by {pkg.name}")
    return problems


def source_violations(pkg: Package, packages: dict[str, Package]) -> list[str]:
    return violations(pkg, packages, sorted((pkg.directory / "src").rglob("*.py")))


def package_test_violations(pkg: Package, packages: dict[str, Package]) -> list[str]:
    files = sorted((pkg.directory / "tests").rglob("*.py"))
    helpers = frozenset(p.stem for p in files)  # conftest puts tests/ on sys.path for its helper modules
    extra = TEST_ONLY_DEPENDENCIES[pkg.name] | TEST_TOOLS
    return violations(pkg, packages, files, extra, helpers)


PACKAGES = load_packages()


def test_the_four_packages_are_found() -> None:
    assert set(PACKAGES) == {"etp-primitives", "etp-compiler", "etp-algorithms", "etp-nn"}
    assert PACKAGES["etp-nn"].import_names == {"etp_nn", "braintrace"}
    assert set(TEST_ONLY_DEPENDENCIES) == set(PACKAGES)


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_sources_import_only_declared_distributions(name: str) -> None:
    pkg = PACKAGES[name]
    assert list((pkg.directory / "src").rglob("*.py")), "no sources found"
    assert source_violations(pkg, PACKAGES) == []


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_tests_import_only_declared_and_listed_test_distributions(name: str) -> None:
    assert package_test_violations(PACKAGES[name], PACKAGES) == []


def test_dependencies_point_down_only() -> None:
    order = ["etp-primitives", "etp-compiler", "etp-algorithms", "etp-nn"]
    for i, name in enumerate(order):
        siblings = PACKAGES[name].dependencies & set(order)
        assert siblings <= set(order[:i]), (name, siblings)


# ---------------------------------------------------------------------------- the checker itself


def _write_package(root: Path, name: str, deps: list[str], modules: dict[str, str]) -> None:
    pkg_dir = root / "packages" / name
    mod = name.replace("-", "_")
    (pkg_dir / "src" / mod).mkdir(parents=True)
    dep_list = ", ".join(f'"{d}"' for d in deps)
    (pkg_dir / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "0.1.0"\ndependencies = [{dep_list}]\n\n'
        f'[tool.hatch.build.targets.wheel]\npackages = ["src/{mod}"]\n'
    )
    for filename, source in modules.items():
        (pkg_dir / "src" / mod / filename).write_text(source)


def test_checker_reports_undeclared_siblings_and_third_party(tmp_path: Path) -> None:
    _write_package(tmp_path, "low-pkg", ["jax>=0.8"], {"__init__.py": "import jax\n"})
    _write_package(
        tmp_path,
        "high-pkg",
        ["low-pkg>=0.1,<0.2", "numpy"],
        {
            "__init__.py": "from __future__ import annotations\nimport os, json\nimport numpy as np\nfrom . import _a\n",
            "_a.py": (
                "from typing import TYPE_CHECKING\n"
                "import low_pkg\n"
                "from high_pkg import _b\n"
                "import brainstate.nn\n"  # line 4: installed, not declared
                "if TYPE_CHECKING:\n"
                "    from saiunit import Quantity\n"  # line 6: declared nowhere here
                "def f():\n"
                "    import importlib\n"
                "    return importlib.import_module('jax.numpy')\n"  # line 9: jax is only low-pkg's
            ),
            "_b.py": "import not_a_real_module_anywhere\n",
        },
    )
    packages = load_packages(tmp_path)
    assert source_violations(packages["low-pkg"], packages) == []
    problems = source_violations(packages["high-pkg"], packages)
    assert any(
        p.endswith("_a.py:4: imports brainstate (distribution brainstate), not declared by high-pkg") for p in problems
    )
    assert any("_a.py:6: imports saiunit" in p for p in problems)
    assert any("_a.py:9: imports jax (distribution jax)" in p for p in problems)
    assert any(
        "_b.py:1: no installed distribution provides the import name 'not_a_real_module_anywhere'" in p
        for p in problems
    )
    assert len(problems) == 4, problems
    assert not any("__init__.py" in p or "low_pkg" in p for p in problems)


def test_checker_reports_an_upward_import_among_the_real_packages(tmp_path: Path) -> None:
    pkg = PACKAGES["etp-compiler"]
    bad = tmp_path / "packages" / "etp-compiler" / "src" / "etp_compiler" / "_bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("import etp_algorithms\nfrom braintrace import nn\n")
    fake = Package(pkg.name, tmp_path / "packages" / "etp-compiler", pkg.dependencies, pkg.import_names)
    problems = violations(fake, PACKAGES, [bad])
    assert problems == [
        "packages/etp-compiler/src/etp_compiler/_bad.py:1: imports etp_algorithms (distribution etp-algorithms), "
        "not declared by etp-compiler",
        "packages/etp-compiler/src/etp_compiler/_bad.py:2: imports braintrace (distribution etp-nn), "
        "not declared by etp-compiler",
    ]


def test_isolation_script_adds_the_same_test_only_siblings() -> None:
    script = (ROOT / ".ci" / "isolation.sh").read_text()
    match = re.search(r"^declare -A test_only=\((.*)\)$", script, re.M)
    assert match is not None, "isolation.sh lost its test_only table"
    in_script = dict(re.findall(r"\[([\w-]+)\]=([\w-]+)", match.group(1)))
    siblings = {name: deps & set(PACKAGES) for name, deps in TEST_ONLY_DEPENDENCIES.items()}
    assert in_script == {name: next(iter(deps)) for name, deps in siblings.items() if deps}
    assert all(len(deps) <= 1 for deps in siblings.values())


_INTERNAL_MODULES = ("jax.extend", "jax._src", "jax.interpreters", "jax.core", "brainstate._")


def test_jax_and_brainstate_internals_only_through_compat() -> None:
    """Outside each package's ``_compat.py``: no import of JAX/brainstate internals, no StatefulFunction."""
    import ast

    offenders = []
    for path in sorted(ROOT.glob("packages/*/src/**/*.py")):
        if path.name == "_compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Attribute) and node.attr == "StatefulFunction":
                names = ["brainstate.transform.StatefulFunction"]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} {name}"
                for name in names
                if name.startswith(_INTERNAL_MODULES) or name.endswith("StatefulFunction")
            ]
    assert not offenders, offenders
