"""Repository-wide code rules, checked statically over ``packages/*/src``.

1. **Module size.** No module has more than :data:`MAX_LINES_OF_CODE` lines of code: lines that
   hold a token other than a comment, and that are not part of a docstring. A docstring is any
   statement that is a bare string literal (module, class and function docstrings, and the
   attribute docstrings Sphinx reads). Blank lines do not count.
2. **No private cross-package imports.** A distribution uses another distribution's public
   names only: no ``import etp_compiler._relations``, no ``from etp_compiler._relations import
   x``, no ``from etp_compiler import _helper``, no ``importlib.import_module("etp_nn._rnn")``
   and no ``etp_compiler._relations`` attribute access through an imported sibling module.
   Dunder names (``__version__``) are public. The unit is the distribution: ``etp-nn`` ships
   ``etp_nn`` and the ``braintrace`` shim, which may use each other's private modules.

Which distributions a package may import at all (its declared dependencies) is checked in
``tests/test_import_contracts.py``; JAX and brainstate internals only through ``_compat.py``
are checked there too.

Each checker is also run on small hand-written sources, so a rule that cannot fail would show.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES_OF_CODE = 600

_NON_CODE_TOKENS = frozenset(
    {
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENCODING,
        tokenize.ENDMARKER,
    }
)


# -------------------------------------------------------------------------------- 1. module size


def _docstring_spans(tree: ast.Module) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``((line, col), (end_line, end_col))`` of every statement that is a bare string literal."""
    spans = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            and node.end_lineno is not None
            and node.end_col_offset is not None
        ):
            spans.append(((node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)))
    return spans


def lines_of_code(source: str, filename: str = "<string>") -> int:
    """The number of lines of ``source`` holding code: not blank, not only comments, not docstrings.

    A token spanning several lines (a multi-line string that is not a docstring) counts each of
    its lines.
    """
    spans = _docstring_spans(ast.parse(source, filename))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in _NON_CODE_TOKENS:
            continue
        if any(start <= token.start and token.end <= end for start, end in spans):
            continue
        lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines)


def source_files(root: Path = ROOT) -> list[Path]:
    return sorted(root.glob("packages/*/src/**/*.py"))


def oversized_modules(root: Path = ROOT, limit: int = MAX_LINES_OF_CODE) -> list[str]:
    """``path: N lines of code (limit L)`` for every module under ``packages/*/src`` over ``limit``."""
    problems = []
    for path in source_files(root):
        try:
            count = lines_of_code(path.read_text(encoding="utf-8"), str(path))
        except SyntaxError as err:
            problems.append(f"{path.relative_to(root)}: does not parse ({err.msg}, line {err.lineno})")
            continue
        if count > limit:
            problems.append(f"{path.relative_to(root)}: {count} lines of code (limit {limit})")
    return problems


def test_sources_are_found() -> None:
    files = source_files()
    assert len(files) > 20, files
    for package in ("etp_primitives", "etp_compiler", "etp_algorithms", "etp_nn", "braintrace"):
        assert any(package in path.parts for path in files), package


def test_no_module_has_more_than_600_lines_of_code() -> None:
    problems = oversized_modules()
    assert not problems, "modules over the size limit (docstrings, comments and blank lines aside):\n" + "\n".join(
        problems
    )


_COUNTED = '''"""Module docstring,
over two lines."""

# a comment
import os  # code with a comment


class A:
    """Class docstring."""

    x: int = 1
    """An attribute docstring."""

    def f(self) -> str:
        # comment
        """Function docstring.

        >>> A().f()
        'a'
        """
        text = """not a docstring,
        but a value"""
        return (
            text
        )
'''


def test_lines_of_code_drops_blanks_comments_and_docstrings() -> None:
    # counted: import os; class A:; x: int = 1; def f; text = """ (2 lines); return (; text; )
    assert lines_of_code(_COUNTED) == 9
    assert lines_of_code("") == 0
    assert lines_of_code('"""Only a docstring."""\n\n# and a comment\n') == 0
    assert lines_of_code("x = 1; y = 2\nz = (\n    3\n)\n") == 4
    # a string statement after code on its line drops only itself; an f-string statement is code
    assert lines_of_code("x = 1; 'a string statement'\nf'{x}'\n") == 2


def test_the_size_check_reports_a_module_over_the_limit(tmp_path: Path) -> None:
    src = tmp_path / "packages" / "pkg-a" / "src" / "pkg_a"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text('"""A package."""\n')
    (src / "_small.py").write_text("".join(f"x{i} = {i}\n" for i in range(10)))
    docstring = '"""' + "doc line\n" * 1000 + '"""\n'
    (src / "_documented.py").write_text(docstring + "".join(f"x{i} = {i}\n" for i in range(600)))
    (src / "_big.py").write_text("# header\n\n" + "".join(f"x{i} = {i}\n\n" for i in range(601)))
    assert oversized_modules(tmp_path) == ["packages/pkg-a/src/pkg_a/_big.py: 601 lines of code (limit 600)"]
    (src / "_broken.py").write_text('x = 1\n"""never closed\n')
    broken = oversized_modules(tmp_path)[1:]
    assert len(broken) == 1 and broken[0].startswith("packages/pkg-a/src/pkg_a/_broken.py: does not parse ("), broken
    (src / "_broken.py").unlink()
    assert oversized_modules(tmp_path, limit=5) == [
        "packages/pkg-a/src/pkg_a/_big.py: 601 lines of code (limit 5)",
        "packages/pkg-a/src/pkg_a/_documented.py: 600 lines of code (limit 5)",
        "packages/pkg-a/src/pkg_a/_small.py: 10 lines of code (limit 5)",
    ]


# ------------------------------------------------------------------- 2. private cross-package imports


@dataclass(frozen=True)
class Distribution:
    name: str
    directory: Path
    import_names: frozenset[str]


def load_distributions(root: Path = ROOT) -> list[Distribution]:
    """Each ``packages/*/pyproject.toml``: its name, folder and the import packages its wheel ships."""
    found = []
    for pyproject in sorted(root.glob("packages/*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        wheel_packages = data["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
        imports = frozenset(Path(p).name for p in wheel_packages)
        found.append(Distribution(data["project"]["name"], pyproject.parent, imports))
    return found


def is_private(name: str) -> bool:
    """``_x`` is private; ``__x__`` (``__version__``, ``__all__``) is not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_part(dotted: str) -> str | None:
    """The first private component after the top-level package of ``dotted``, if any."""
    return next((part for part in dotted.split(".")[1:] if is_private(part)), None)


def _attribute_chain(node: ast.Attribute) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]`` when the chain starts at a plain name, else ``None``."""
    parts: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        parts.append(current.attr)
        current = current.value
    if not isinstance(current, ast.Name):
        return None
    parts.append(current.id)
    return parts[::-1]


def private_imports(source: str, foreign: frozenset[str], filename: str = "<string>") -> list[tuple[int, str]]:
    """``(line, what)`` for each use of a private name of the import packages ``foreign``.

    Covers ``import``, ``from ... import`` (absolute), ``importlib.import_module`` /
    ``__import__`` with a constant name, and attribute access (``mod._x``, ``pkg.sub._x``)
    through a name bound by an import of a ``foreign`` package.
    """
    tree = ast.parse(source, filename)
    found: list[tuple[int, str]] = []
    bound: dict[str, str] = {}  # local name -> the foreign dotted name it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top not in foreign:
                    continue
                if _private_part(alias.name):
                    found.append((node.lineno, f"import {alias.name}"))
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in foreign:
                continue
            for alias in node.names:
                if _private_part(node.module) or is_private(alias.name):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            arg = node.args[0]
            if (
                fname in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                if arg.value.split(".")[0] in foreign and _private_part(arg.value):
                    found.append((node.lineno, f"{fname}({arg.value!r})"))
    for node in ast.walk(tree):
        # a nested chain (``a._b.c`` holds ``a._b``) reports the same (line, name) once
        if isinstance(node, ast.Attribute):
            chain = _attribute_chain(node)
            if chain is None or chain[0] not in bound:
                continue
            private = next((part for part in chain[1:] if is_private(part)), None)
            if private is not None:
                index = chain.index(private, 1)
                found.append((node.lineno, f"{'.'.join(chain[: index + 1])} (through {bound[chain[0]]})"))
    return sorted(set(found))


def private_import_violations(root: Path = ROOT) -> list[str]:
    """``path:line: DIST uses a private name of another distribution: WHAT`` over ``packages/*/src``."""
    distributions = load_distributions(root)
    problems = []
    for dist in distributions:
        foreign = frozenset().union(*(d.import_names for d in distributions if d.name != dist.name))
        for path in sorted((dist.directory / "src").rglob("*.py")):
            try:
                found = private_imports(path.read_text(encoding="utf-8"), foreign, str(path))
            except SyntaxError as err:
                problems.append(f"{path.relative_to(root)}: does not parse ({err.msg}, line {err.lineno})")
                continue
            for line, what in found:
                problems.append(
                    f"{path.relative_to(root)}:{line}: {dist.name} uses a private name of another package: {what}"
                )
    return problems


def test_the_four_distributions_and_their_import_packages() -> None:
    names = {d.name: d.import_names for d in load_distributions()}
    assert names == {
        "etp-primitives": {"etp_primitives"},
        "etp-compiler": {"etp_compiler"},
        "etp-algorithms": {"etp_algorithms"},
        "etp-nn": {"etp_nn", "braintrace"},
    }


def test_no_package_uses_another_packages_private_names() -> None:
    problems = private_import_violations()
    assert not problems, "private names used across packages (make them public, or move the code):\n" + "\n".join(
        problems
    )


_FOREIGN = frozenset({"low_pkg", "other"})


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import low_pkg._impl\n", [(1, "import low_pkg._impl")]),
        ("import low_pkg.sub._impl as impl\n", [(1, "import low_pkg.sub._impl")]),
        ("from low_pkg._impl import helper\n", [(1, "from low_pkg._impl import helper")]),
        ("from low_pkg import _helper\n", [(1, "from low_pkg import _helper")]),
        ("from low_pkg.sub import public, _private as p\n", [(1, "from low_pkg.sub import _private")]),
        ("import importlib\nm = importlib.import_module('other._x')\n", [(2, "import_module('other._x')")]),
        ("m = __import__('low_pkg._x')\n", [(1, "__import__('low_pkg._x')")]),
        ("import low_pkg\nf = low_pkg._impl.helper\n", [(2, "low_pkg._impl (through low_pkg)")]),
        ("import low_pkg as lp\nf = lp.sub._helper\n", [(2, "lp.sub._helper (through low_pkg)")]),
        ("from low_pkg import sub\nsub._helper()\n", [(2, "sub._helper (through low_pkg.sub)")]),
        # public names, dunders, private aliases of public names, own and third-party privates: fine
        ("import low_pkg\nfrom low_pkg import __version__, public as _public\nv = low_pkg.__version__\n", []),
        ("from low_pkg.versions import check as _check\n", []),
        ("from own_pkg._impl import helper\nfrom . import _local\nfrom ._x import _y\n", []),
        ("import jax\nfrom jax._src import core\nx = jax._src\n", []),
        ("import other\nx = obj._private\n", []),
    ],
)
def test_private_import_checker(source: str, expected: list[tuple[int, str]]) -> None:
    assert private_imports(source, _FOREIGN) == expected


def test_private_import_checker_on_a_workspace(tmp_path: Path) -> None:
    def package(name: str, modules: dict[str, str], imports: tuple[str, ...] | None = None) -> None:
        imports = imports or (name.replace("-", "_"),)
        directory = tmp_path / "packages" / name
        for mod in imports:
            (directory / "src" / mod).mkdir(parents=True)
        listed = ", ".join(f'"src/{mod}"' for mod in imports)
        (directory / "pyproject.toml").write_text(
            f'[project]\nname = "{name}"\nversion = "0.1.0"\n\n[tool.hatch.build.targets.wheel]\npackages = [{listed}]\n'
        )
        for relative, source in modules.items():
            (directory / "src" / relative).write_text(source)

    package("low-pkg", {"low_pkg/__init__.py": "from low_pkg._impl import helper\n", "low_pkg/_impl.py": ""})
    package(
        "high-pkg",
        {
            "high_pkg/__init__.py": "import low_pkg\nfrom shim import _glue\n",
            "high_pkg/_a.py": "x = 1\nfrom low_pkg._impl import helper\n",
            "shim/__init__.py": "from high_pkg._a import x\n",
            "shim/_glue.py": "",
        },
        imports=("high_pkg", "shim"),
    )
    assert private_import_violations(tmp_path) == [
        "packages/high-pkg/src/high_pkg/_a.py:2: high-pkg uses a private name of another package: "
        "from low_pkg._impl import helper"
    ]


# ------------------------------------------------------------------- 3. the rules run where they should

PACKAGE_SOURCES = [
    "packages/etp-primitives/src",
    "packages/etp-compiler/src",
    "packages/etp-algorithms/src",
    "packages/etp-nn/src",
]


def _ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]


def test_package_sources_are_the_four_src_folders() -> None:
    assert sorted(str(d.directory.relative_to(ROOT) / "src") for d in load_distributions()) == sorted(PACKAGE_SOURCES)


def test_ci_runs_the_doctests_of_every_package_on_both_stacks() -> None:
    doctests = [line for line in _ci_lines() if "--doctest-modules" in line]
    assert [line.split()[0] for line in doctests] == ["uv", "new"], doctests  # 3.11 block, then 3.12
    for line in doctests:
        assert line.split()[-len(PACKAGE_SOURCES) :] == PACKAGE_SOURCES, line


def test_ci_still_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "uv run pytest -n auto\n" in readme
    assert "uv run pytest -n auto" in _ci_lines()


def test_pre_commit_runs_what_ci_runs() -> None:
    config = (ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8")
    entries = re.findall(r"^\s+entry:\s*(.+)$", config, re.M)
    assert entries == [
        "uv run --locked ruff check --force-exclude",
        "uv run --locked ruff format --force-exclude",
        "uv run --locked mypy --strict " + " ".join(PACKAGE_SOURCES),
    ]
    mypy_in_ci = [line for line in _ci_lines() if "mypy --strict" in line]
    assert len(mypy_in_ci) == 2, mypy_in_ci  # both stacks
    for line in mypy_in_ci:
        assert line.split("mypy --strict", 1)[1].split() == PACKAGE_SOURCES, line
    ruff_dirs = re.findall(r"^\s+files:\s*\^\((.+)\)/$", config, re.M)
    ci_ruff = [line for line in _ci_lines() if line.startswith("uv run ruff")]
    assert len(ruff_dirs) == 2 and len(ci_ruff) == 2, (ruff_dirs, ci_ruff)
    for dirs, line in zip(ruff_dirs, ci_ruff, strict=True):
        assert dirs.split("|") == line.split()[-4:], (dirs, line)
