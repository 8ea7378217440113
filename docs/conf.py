"""Sphinx configuration: the API reference from the docstrings, guides in MyST, and the notebooks executed.

``make docs`` builds it with ``-W --keep-going`` (every warning is an error) and needs no
network: MathJax is served from ``sphinx-mathjax-offline``'s copy, the theme's assets ship
with it, and the notebooks run on scikit-learn's bundled data.
"""

import os
import pathlib
import shutil
import sys


DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import rmsprop_jax  # noqa: E402


# `rmsprop_jax.presets` is an attribute (the private module `_presets`), not an importable
# submodule; autodoc imports modules by name, so give it that name for the build.
sys.modules.setdefault("rmsprop_jax.presets", rmsprop_jax.presets)


project = "rmsprop_jax"
author = "rmsprop_jax developers"
copyright = "the rmsprop_jax developers"
release = rmsprop_jax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static: math renders without a network
    "myst_nb",
]

# The notebooks live in notebooks/ (committed without outputs); the build copies them here
# and executes every one. A failing cell (each notebook asserts its claims) fails the build.
NOTEBOOKS_SRC = ROOT / "notebooks"
NOTEBOOKS_DST = DOCS / "notebooks"
if NOTEBOOKS_DST.exists():
    shutil.rmtree(NOTEBOOKS_DST)
NOTEBOOKS_DST.mkdir()
for path in sorted(NOTEBOOKS_SRC.glob("*.ipynb")):
    shutil.copy2(path, NOTEBOOKS_DST / path.name)

nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_execution_show_tb = True
# A warning printed by a notebook (the kernel inherits PYTHONWARNINGS) fails the build.
nb_output_stderr = "warn"
os.environ["PYTHONWARNINGS"] = "default"
# The kernels import this source tree, also where the environment has another copy installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
nb_merge_streams = True

# textmacros: \_ and friends inside \text{} and \texttt{}, as the docstrings write them.
mathjax3_config = {"loader": {"load": ["[tex]/textmacros"]}, "tex": {"packages": {"[+]": ["textmacros"]}}}

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# ".rst" first: autosummary writes its generated API pages with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_typehints_description_target = "documented"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False

html_theme = "sphinx_book_theme"
html_title = "rmsprop_jax"
templates_path = ["_templates"]
html_static_path: list[str] = []
html_theme_options = {
    "repository_url": "https://github.com/rmsprop-jax/rmsprop_jax",
    "use_repository_button": True,
    "show_toc_level": 2,
}
html_last_updated_fmt = None
html_show_sourcelink = False
