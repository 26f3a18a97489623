"""Local Sphinx extension of the ETP docs.

* ``autodoc-process-docstring``: module-level *data* (registries, built-in
  primitives, type aliases) is re-exported by each package's ``__init__`` but
  commented (``#:``) where it is defined; autodoc only looks at the importing
  module and would show the docstring of ``set``/``dict``/``ETPPrimitive``
  instead. The hook finds the defining comment, and for built-in primitives
  adds their registration facts read from the live registries.
* ``autodoc-skip-member``: the generated ``Alias for field number N``
  properties of NamedTuples are skipped (the class docstring describes the
  fields).
* ``braintrace-reexports`` directive: the table of what ``import braintrace``
  re-exports, generated from ``braintrace.__all__``, each name linked to the
  page of the object it is.
* A completeness check: every name in the ``__all__`` of the documented
  packages must have an object description; a missing one is a warning (so the
  ``-W`` build fails).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

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


def _skip_member(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any) -> bool | None:
    doc = getattr(obj, "__doc__", None) or ""
    if doc.startswith("Alias for field number"):
        return True
    return None


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
                home = next((m for m in homes if m.__name__ == obj.__name__ or obj is getattr(m, "__name__", None)), None)
                target = f":mod:`{obj.__name__}`" if home is None else f":mod:`{home.__name__}`"
                if obj.__name__ == "braintrace.nn":
                    target = ":mod:`etp_nn` (every name of ``etp_nn.__all__``)"
                kind = "module"
            else:
                home = next((m for m in homes if name in m.__all__ and getattr(m, name) is obj), None)
                if home is None:
                    logger.warning(f"braintrace.{name} is not a public object of any ETP package", location=self.get_location())
                    continue
                role = "class" if isinstance(obj, type) else "func" if callable(obj) and not hasattr(obj, "bind") else "data"
                target = f":{role}:`{home.__name__}.{name}`"
                kind = {"class": "class", "func": "function", "data": "object"}[role]
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


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("etp_documented_packages", [], "env")
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("env-check-consistency", _check_complete)
    app.add_directive("braintrace-reexports", BraintraceReexports)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
