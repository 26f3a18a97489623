"""Local Sphinx extension of the ETP docs.

* ``autodoc-process-docstring``: module-level *data* (registries, built-in
  primitives, type aliases) is re-exported by each package's ``__init__`` but
  commented (``#:``) where it is defined; autodoc only looks at the importing
  module and would show the docstring of ``set``/``dict``/``ETPPrimitive``
  instead. The hook finds the defining comment, and for built-in primitives
  adds their registration facts read from the live registries.
* ``autodoc-process-signature``: brainstate modules show their constructor's
  signature instead of the metaclass's ``(*args, **kwargs)``.
* ``autodoc-skip-member``: the generated ``Alias for field number N``
  properties of NamedTuples are skipped (the class docstring describes the
  fields).
* ``braintrace-reexports`` directive: the table of what ``import braintrace``
  re-exports, generated from ``braintrace.__all__``, each name linked to the
  page of the object it is.
* Parallel notebook execution: with ``nb_execution_mode = "cache"``, the
  notebooks are executed afresh at the start of every build, several at a
  time, into an emptied jupyter-cache that myst-nb then reads.
* A completeness check: every name in the ``__all__`` of the documented
  packages must have an object description; a missing one is a warning (so the
  ``-W`` build fails).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import types
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.ext.autodoc.preserve_defaults import update_defvalue
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.inspect import stringify_signature

logger = logging.getLogger(__name__)

_PACKAGES = ("etp_primitives", "etp_compiler", "etp_algorithms", "etp_nn")

# The user-facing function that binds each built-in primitive.
_BOUND_BY = {
    "etp_mm": "matmul",
    "etp_mv": "matmul",
    "etp_elemwise": "element_wise",
    "etp_conv": "conv",
    "etp_sp_mm": "sparse_matmul",
    "etp_sp_mv": "sparse_matmul",
    "etp_lora_mm": "lora_matmul",
    "etp_lora_mv": "lora_matmul",
}


def _defining_comment(package: str, name: str) -> list[str] | None:
    """The ``#:`` comment of ``name`` in the package's own modules (loaded ones), if any."""
    for modname in sorted(sys.modules):
        if modname != package and not modname.startswith(package + "."):
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except Exception:  # noqa: BLE001 - modules without source (compiled, namespace) have no comments
            continue
        comment = docs.get(("", name))
        if comment:
            return [line for line in comment]
    return None


def _primitive_facts(obj: Any) -> list[str]:
    import etp_primitives as etp

    layout_plain = etp.trainable_invars(obj, {})
    layout_bias = etp.trainable_invars(obj, {"has_bias": True})
    lines = [
        "",
        f"Registered facts (read from the registries when these docs were built) of ``{obj.name}``:",
        "",
        f"* batched (``x`` carries leading batch axes): {'yes' if etp.is_batched_primitive(obj) else 'no'}",
        f"* gradient-enabled (walked through on ``y -> h``): {'yes' if etp.is_gradient_enabled_primitive(obj) else 'no'}",
        f"* position of ``x`` in the invars: ``{etp.ETP_X_INVAR_INDICES[obj]!r}``",
        f"* trainable invars: ``{layout_plain!r}``"
        + (f", with ``has_bias=True``: ``{layout_bias!r}``" if layout_bias != layout_plain else ""),
        f"* registered from an :class:`~etp_primitives.ETPPrimitiveSpec`: "
        f"{'yes' if etp.get_primitive_spec(obj) is not None else 'no'}",
    ]
    bound_by = _BOUND_BY.get(obj.name)
    if bound_by:
        lines.append(f"* bound by :func:`etp_primitives.{bound_by}`")
    return lines


def _process_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    package = name.split(".")[0]
    if package not in _PACKAGES:
        return
    short = name.rsplit(".", 1)[-1]
    if what == "data":
        if short == "__version__":
            lines[:] = [f"Version of the ``{package}`` distribution (``{obj}``)."]
            return
        comment = _defining_comment(package, short)
        if comment is not None:
            lines[:] = comment
        elif lines and type(obj).__doc__ and "\n".join(lines).strip() == (type(obj).__doc__ or "").strip():
            lines[:] = []
        import etp_primitives as etp

        if isinstance(obj, etp.ETPPrimitive) and etp.is_etp_primitive(obj):
            lines[:] = [f"The built-in ETP primitive ``{obj.name}``.", "", *lines, *_primitive_facts(obj)]


def _class_signature(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, signature: str | None, return_annotation: str | None
) -> tuple[str, str | None] | None:
    """brainstate modules hide their constructor behind a metaclass ``__call__(*args, **kwargs)``."""
    if what != "class" or signature != "(*args, **kwargs)" or not isinstance(obj, type):
        return None
    if name.split(".")[0] not in _PACKAGES:
        return None
    init = obj.__init__
    update_defvalue(app, init, False)
    sig = inspect.signature(init)
    params = list(sig.parameters.values())[1:]
    sig = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
    return stringify_signature(sig, show_annotation=True, unqualified_typehints=True), return_annotation


def _skip_member(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any) -> bool | None:
    doc = getattr(obj, "__doc__", None) or ""
    if doc.startswith("Alias for field number"):
        return True
    return None


def _kind_and_role(obj: Any) -> tuple[str, str]:
    """How to name and cross-reference ``obj``: a class, a function, or another object."""
    if isinstance(obj, type):
        return "class", "class"
    if callable(obj) and not hasattr(obj, "bind"):  # primitives are callable objects, not functions
        return "function", "func"
    return "object", "data"


class BraintraceReexports(SphinxDirective):
    """A table: each name of ``braintrace.__all__`` and the object it is."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        braintrace = importlib.import_module("braintrace")
        homes = [importlib.import_module(p) for p in _PACKAGES]
        rows = []
        for name in braintrace.__all__:
            obj = getattr(braintrace, name)
            if name == "__version__":
                target = f"``{obj}``"
                kind = "version string"
            elif isinstance(obj, types.ModuleType):
                kind = "module"
                target = f":mod:`{obj.__name__}`"
                if obj.__name__ == "braintrace.nn":
                    target = ":mod:`etp_nn` (every name of ``etp_nn.__all__``)"
            else:
                home = next((m for m in homes if name in m.__all__ and getattr(m, name) is obj), None)
                if home is None:
                    where = self.get_location()
                    logger.warning(f"braintrace.{name} is not a public object of any ETP package", location=where)
                    continue
                kind, role = _kind_and_role(obj)
                target = f":{role}:`{home.__name__}.{name}`"
            rows.append((f"``braintrace.{name}``", kind, target))
        text = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 35 15 50",
            "",
            "   * - name",
            "     - kind",
            "     - is",
        ]
        for name, kind, target in rows:
            text += [f"   * - {name}", f"     - {kind}", f"     - {target}"]
        container = nodes.container()
        self.state.nested_parse(StringList(text, source="braintrace-reexports"), self.content_offset, container)
        return container.children


def _check_complete(app: Sphinx, env: Any) -> None:
    domain = env.get_domain("py")
    documented = set(domain.objects) | set(domain.modules)
    for package_name in app.config.etp_documented_packages:
        package = importlib.import_module(package_name)
        missing = [n for n in package.__all__ if f"{package.__name__}.{n}" not in documented]
        if missing:
            logger.warning(
                f"{package.__name__}: public name(s) without documentation: {', '.join(missing)} "
                f"(add them to docs/api/{package.__name__}.rst)"
            )


# Executes one notebook (JSON in argv[1]) in its own kernel, writes the executed JSON to argv[2].
_EXECUTE_ONE = """
import sys, nbformat
from jupyter_cache.executors.utils import single_nb_execution
source, target, cwd, timeout = sys.argv[1:5]
nb = nbformat.read(source, as_version=4)
result = single_nb_execution(nb, cwd=cwd, timeout=int(timeout) if timeout else None, allow_errors=False)
if result.err is not None:
    sys.exit(result.exc_string or repr(result.err))
nbformat.write(nb, target)
print(f"{result.time:.1f}")
"""


def _execute_notebooks_in_parallel(app: Sphinx) -> None:
    """Execute every MyST notebook, several at a time, into a fresh jupyter-cache.

    With ``nb_execution_mode = "cache"`` myst-nb then finds each notebook's
    outputs in the cache instead of executing the notebooks one after the
    other. The cache is emptied first (also with ``etp_parallel_notebooks =
    False``, when myst-nb executes them itself), so every build executes every
    notebook, as ``"force"`` would. A notebook that fails here is left out of
    the cache: myst-nb executes it again while reading it and fails the build
    with its traceback (``nb_execution_raise_on_error``).
    """
    nb_config = getattr(app.env, "mystnb_config", None)
    if nb_config is None or nb_config.execution_mode != "cache":
        return
    import shutil
    import subprocess
    import tempfile
    import time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from myst_nb.core.read import is_myst_markdown_notebook, read_myst_markdown_notebook

    cache_path = Path(nb_config.execution_cache_path)
    shutil.rmtree(cache_path, ignore_errors=True)  # always: no build reuses outputs of an earlier one
    if not app.config.etp_parallel_notebooks:
        return
    cache = get_cache(str(cache_path))
    srcdir = Path(app.srcdir)
    notebooks = {}
    for path in sorted(srcdir.rglob("*.md")):
        relative = path.relative_to(srcdir).as_posix()
        if any(part.startswith(("_", ".")) for part in Path(relative).parts[:-1]):
            continue
        text = path.read_text("utf8")
        if is_myst_markdown_notebook(text):
            notebooks[path] = read_myst_markdown_notebook(
                text, config=app.env.myst_config, add_source_map=True, path=str(path)
            )
    if not notebooks:
        return
    app.env.etp_notebook_docnames = sorted(  # type: ignore[attr-defined]
        str(path.relative_to(srcdir).with_suffix("").as_posix()) for path in notebooks
    )
    # longest first (by source size, a fair proxy here), so that the pool finishes together
    notebooks = dict(sorted(notebooks.items(), key=lambda item: -item[0].stat().st_size))
    workers = max(1, min(len(notebooks), os.cpu_count() or 1, 4))
    logger.info(f"etp_docs: executing {len(notebooks)} notebooks, {workers} at a time")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:

        def run(item: tuple[int, tuple[Path, Any]]) -> tuple[Path, Any, str]:
            index, (path, nb) = item
            source = Path(scratch, f"{index}.in.ipynb")
            target = Path(scratch, f"{index}.out.ipynb")
            nbformat.write(nb, source)
            timeout = str(nb_config.execution_timeout or "")
            done = subprocess.run(
                [sys.executable, "-c", _EXECUTE_ONE, str(source), str(target), str(path.parent), timeout],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
                return path, None, re.sub(r"\x1b\[[0-9;]*m", "", last)  # without terminal colours
            seconds = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "0"
            return path, nbformat.read(target, as_version=4), seconds

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for path, executed, note in pool.map(run, enumerate(notebooks.items())):
                name = path.relative_to(srcdir).as_posix()
                if executed is None:
                    # a warning, so that -W fails even when Sphinx would not re-read the page
                    logger.warning(
                        f"etp_docs: notebook {name} failed: {note} (myst-nb runs it again for the traceback)"
                    )
                    continue
                bundle = CacheBundleIn(executed, str(path), data={"execution_seconds": float(note)})
                cache.cache_notebook_bundle(bundle, check_validity=False, overwrite=True)
                logger.info(f"etp_docs: executed {name} in {note} s")
    logger.info(f"etp_docs: notebooks executed in {time.perf_counter() - start:.1f} s")


def _notebooks_outdated(app: Sphinx, env: Any, added: set[str], changed: set[str], removed: set[str]) -> list[str]:
    """Re-read every notebook page on every build, so its freshly executed outputs are used."""
    return [d for d in getattr(env, "etp_notebook_docnames", []) if d in env.found_docs and d not in added | changed]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("etp_documented_packages", [], "env")
    app.add_config_value("etp_parallel_notebooks", True, "env")
    app.connect("builder-inited", _execute_notebooks_in_parallel, priority=900)  # after myst-nb's setup
    app.connect("env-get-outdated", _notebooks_outdated)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-process-signature", _class_signature)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("env-check-consistency", _check_complete)
    app.add_directive("braintrace-reexports", BraintraceReexports)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
