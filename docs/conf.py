"""Sphinx configuration of the ETP documentation.

Build (warnings are errors)::

    uv run --group docs sphinx-build -W --keep-going -b html docs docs/_build/html

The tutorials are MyST notebooks executed on every build (in parallel, see
``etp_parallel_notebooks`` below); a cell that raises fails the build.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The notebooks' kernels inherit this environment: CPU only, so that outputs
# (and timings) do not depend on which accelerator the build machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import etp_nn  # noqa: E402
import etp_primitives  # noqa: E402

# ``etp_nn.surrogate`` is an attribute of etp_nn (the module ``etp_nn._surrogate``),
# not an importable submodule; autodoc imports objects by module path, so the
# docs process registers the alias (nothing else sees it).
sys.modules.setdefault("etp_nn.surrogate", etp_nn.surrogate)

# -- project ----------------------------------------------------------------
project = "ETP"
author = "The ETP developers"
copyright = "2026, the ETP developers"
release = etp_primitives.__version__
version = release

# -- extensions -------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
    "etp_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", ".jupyter_cache", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
root_doc = "index"

# -- autodoc / autosummary / napoleon -----------------------------------------
autosummary_generate = True
autosummary_generate_overwrite = True
autosummary_imported_members = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_preserve_defaults = True
autoclass_content = "class"

napoleon_google_docstring = False
napoleon_numpy_docstring = True
# Parameters and Attributes as one field each with a bullet per entry, so that
# grouped names (``in_size, out_size : int``, a NumPy convention used throughout)
# stay together; Attributes then create no attribute objects, so the fields of
# NamedTuples and dataclasses are not described twice.
napoleon_use_param = False
napoleon_custom_sections = [("Attributes", "params_style")]
napoleon_use_rtype = False
napoleon_preprocess_types = False

# The NumPy docstrings carry the types in words; the annotations stay in the
# signatures, shortened (``Array`` rather than ``jax.Array``).
autodoc_typehints = "signature"
autodoc_typehints_format = "short"

# -- MyST / myst-nb -------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# "cache" with a cache that the etp_docs extension empties and refills at the
# start of every build, executing the notebooks in parallel: every build runs
# every notebook (as "force" would), on all cores. A failing notebook is run
# again by myst-nb, which then fails the build with the traceback.
nb_execution_mode = "cache"
nb_execution_cache_path = str(Path(__file__).parent / "_build" / ".jupyter_cache")
etp_parallel_notebooks = True
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_execution_show_tb = True
nb_merge_streams = True

# -- HTML -------------------------------------------------------------------
html_theme = "furo"
html_title = f"ETP {release}"
html_static_path: list[str] = []
html_theme_options = {"navigation_with_keys": True}

# Every public name of the four packages must be documented (checked by the
# etp_docs extension at the end of reading; a missing one is a warning, so the
# -W build fails).
etp_documented_packages = ["etp_primitives", "etp_compiler", "etp_algorithms", "etp_nn"]
