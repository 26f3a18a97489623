"""Check the built wheels and sdists of the four ETP distributions against their pyproject.toml.

Usage: ``python .ci/check_dists.py DIST_DIR`` (after ``uv build --all-packages --out-dir DIST_DIR``).
Standard library only, so any Python >= 3.11 runs it. Exit status 1 with one line per problem.

For each distribution it reads ``*.dist-info/METADATA`` from the wheel and ``PKG-INFO`` from the
sdist (with ``email.parser``) and checks: name, version, summary, the long description (the
package's README.md), License-Expression Apache-2.0 with the LICENSE file shipped (identical to
the repository's), no deprecated license classifiers, the classifiers and keywords of the
pyproject, Requires-Python, Requires-Dist equal to the declared dependencies, sibling
requirements bounded to the sibling's current minor series, the project URLs, and a ``py.typed``
in every import package of the wheel.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("etp-primitives", "etp-compiler", "etp-algorithms", "etp-nn")
EXPECTED_URLS = {
    "Homepage": "https://github.com/etp-dev/etp",
    "Documentation": "https://etp-dev.github.io/etp",
    "Source": "https://github.com/etp-dev/etp",
    "Issues": "https://github.com/etp-dev/etp/issues",
}
LICENSE_EXPRESSION = "Apache-2.0"


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def split_requirement(req: str) -> tuple[str, frozenset[str]]:
    """``'brainstate>=0.5.4,<0.6'`` -> ``('brainstate', {'>=0.5.4', '<0.6'})`` (no extras or markers here)."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*", req)
    if match is None or "[" in req or ";" in req:
        raise ValueError(f"unsupported requirement {req!r}")
    clauses = frozenset(c.replace(" ", "") for c in match.group(2).split(",") if c.strip())
    return normalize(match.group(1)), clauses


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass
class Project:
    """What one package's pyproject.toml declares."""

    name: str
    directory: Path
    pyproject: dict[str, Any] = field(repr=False)

    @property
    def project(self) -> dict[str, Any]:
        return dict(self.pyproject["project"])

    @property
    def version(self) -> str:
        return str(self.project["version"])

    @property
    def import_packages(self) -> list[str]:
        """Top-level import packages of the wheel (``src/etp_nn`` -> ``etp_nn``)."""
        wheel = self.pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
        return [Path(p).name for p in wheel["packages"]]

    @property
    def dist_stem(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}"


def load_projects(root: Path = ROOT) -> dict[str, Project]:
    projects = {}
    for name in PACKAGES:
        directory = root / "packages" / name
        data = tomllib.loads((directory / "pyproject.toml").read_text())
        projects[name] = Project(name, directory, data)
    return projects


def parse_metadata(text: str) -> Message:
    return email.parser.Parser(policy=email.policy.compat32).parsestr(text)


def check_metadata(meta: Message, proj: Project, projects: dict[str, Project], what: str) -> list[str]:
    """Problems with one METADATA / PKG-INFO file, each prefixed with ``what``."""
    errors: list[str] = []

    def expect(cond: bool, message: str) -> None:
        if not cond:
            errors.append(f"{what}: {message}")

    p = proj.project
    expect(meta["Name"] == proj.name, f"Name {meta['Name']!r} != {proj.name!r}")
    expect(meta["Version"] == proj.version, f"Version {meta['Version']!r} != {proj.version!r}")
    summary = meta["Summary"] or ""
    expect(summary == p.get("description") and len(summary) > 20, f"Summary {summary!r} is not the description")
    expect(meta["License-Expression"] == LICENSE_EXPRESSION, f"License-Expression is {meta['License-Expression']!r}")
    expect(meta.get_all("License-File") == ["LICENSE"], f"License-File is {meta.get_all('License-File')!r}")
    expect(meta["Requires-Python"] == ">=3.11", f"Requires-Python is {meta['Requires-Python']!r}")

    classifiers = meta.get_all("Classifier") or []
    expect(classifiers == p.get("classifiers"), "classifiers differ from the pyproject")
    expect(not any(c.startswith("License ::") for c in classifiers), "license classifier next to License-Expression")
    for needed in ("Typing :: Typed", "Programming Language :: Python :: 3.11", "Development Status :: 3 - Alpha"):
        expect(needed in classifiers, f"classifier {needed!r} missing")
    keywords = set((meta["Keywords"] or "").split(","))
    expect(keywords == set(p.get("keywords", [])) and bool(keywords), f"Keywords {meta['Keywords']!r}")

    urls = {}
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        urls[label.strip()] = url.strip()
    expect(urls == EXPECTED_URLS, f"Project-URL {urls!r} != {EXPECTED_URLS!r}")

    readme = (proj.directory / "README.md").read_text()
    expect(meta["Description-Content-Type"] == "text/markdown", "Description-Content-Type is not text/markdown")
    body = meta.get_payload()
    expect(isinstance(body, str) and body.strip() == readme.strip(), "long description is not the README.md")
    expect(len(readme) > 500 and "pip install " + proj.name in readme, "README.md says too little (no install line)")

    declared = dict(split_requirement(r) for r in p["dependencies"])
    built = dict(split_requirement(r) for r in meta.get_all("Requires-Dist") or [])
    expect(built == declared, f"Requires-Dist {built!r} != dependencies {declared!r}")
    for dep, clauses in built.items():
        if dep in projects:  # a sibling: bounded to its current minor series
            sib = version_tuple(projects[dep].version)
            want = {f">={projects[dep].version}", f"<{sib[0]}.{sib[1] + 1}"}
            expect(clauses == want, f"sibling requirement {dep}{sorted(clauses)} is not {sorted(want)}")
        else:
            expect(any(c.startswith(">=") for c in clauses), f"third-party requirement {dep} has no lower bound")
    return errors


def check_wheel(path: Path, proj: Project, projects: dict[str, Project]) -> list[str]:
    what = path.name
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        info = f"{proj.dist_stem}.dist-info"
        if f"{info}/METADATA" not in names:
            return [f"{what}: no {info}/METADATA"]
        errors = check_metadata(parse_metadata(zf.read(f"{info}/METADATA").decode()), proj, projects, what)
        license_path = f"{info}/licenses/LICENSE"
        if license_path not in names:
            errors.append(f"{what}: {license_path} missing")
        elif zf.read(license_path) != (ROOT / "LICENSE").read_bytes():
            errors.append(f"{what}: shipped LICENSE differs from the repository's")
        top = {n.split("/", 1)[0] for n in names if not n.startswith(info)}
        if top != set(proj.import_packages):
            errors.append(f"{what}: top-level entries {sorted(top)} != {proj.import_packages}")
        for pkg in proj.import_packages:
            for needed in ("__init__.py", "py.typed"):
                if f"{pkg}/{needed}" not in names:
                    errors.append(f"{what}: {pkg}/{needed} missing")
    return errors


def check_sdist(path: Path, proj: Project, projects: dict[str, Project]) -> list[str]:
    what = path.name
    with tarfile.open(path) as tf:
        names = set(tf.getnames())
        stem = proj.dist_stem

        def read(member: str) -> bytes:
            fh = tf.extractfile(f"{stem}/{member}")
            assert fh is not None
            return fh.read()

        missing = [m for m in ("PKG-INFO", "pyproject.toml", "README.md", "LICENSE") if f"{stem}/{m}" not in names]
        if missing:
            return [f"{what}: {missing} missing"]
        errors = check_metadata(parse_metadata(read("PKG-INFO").decode()), proj, projects, what)
        if read("LICENSE") != (ROOT / "LICENSE").read_bytes():
            errors.append(f"{what}: LICENSE differs from the repository's")
        for pkg in proj.import_packages:
            if f"{stem}/src/{pkg}/py.typed" not in names:
                errors.append(f"{what}: src/{pkg}/py.typed missing")
    return errors


def check_dist_dir(dist: Path, *, sdists: bool = True, root: Path = ROOT) -> list[str]:
    """Every problem found in ``dist`` (empty: all good)."""
    projects = load_projects(root)
    errors: list[str] = []
    for proj in projects.values():
        kinds = [("-py3-none-any.whl", check_wheel)] + ([(".tar.gz", check_sdist)] if sdists else [])
        for suffix, check in kinds:
            path = dist / f"{proj.dist_stem}{suffix}"
            if not path.is_file():
                errors.append(f"{path.name}: not built")
                continue
            errors.extend(check(path, proj, projects))
    expected = len(projects) * (2 if sdists else 1)
    found = [p.name for p in dist.iterdir() if p.name.endswith((".whl", ".tar.gz"))]
    if len(found) != expected:
        errors.append(f"{dist}: {len(found)} distribution files {sorted(found)}, expected {expected}")
    return errors


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "--wheels-only"):
        print("usage: check_dists.py DIST_DIR [--wheels-only]", file=sys.stderr)
        return 2
    errors = check_dist_dir(Path(argv[1]), sdists=len(argv) == 2)
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        return 1
    print(f"distribution metadata ok: {', '.join(PACKAGES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
