"""Sphinx configuration: the API reference from the docstrings, guides in MyST, and the notebooks executed.

``make docs`` builds it with ``-W --keep-going`` (every warning is an error, every cross-reference
must resolve) and needs no network: MathJax is served from ``sphinx-mathjax-offline``'s copy,
the theme's assets ship with it, the notebooks run on scikit-learn's bundled data, and the
inventories that link optax, JAX, NumPy and Python objects to their documentation are in
``docs/_inventories/`` (``tools/make_inventories.py`` writes them).
"""

import os
import pathlib
import re
import shutil
import sys

from jupyter_client.manager import KernelManager


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
    "sphinx.ext.intersphinx",
    "sphinx_copybutton",
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
# The kernels' channels are local TCP sockets; encrypt them with CurveZMQ (the ipykernel
# kernelspec declares support), which also keeps each kernel from logging a plain-text warning
# into the build's output. nbclient builds its kernel manager with no configuration, hence the
# default set on the class.
KernelManager.transport_encryption.default_value = "auto"

# textmacros: \_ and friends inside \text{} and \texttt{}, as the docstrings write them.
mathjax3_config = {"loader": {"load": ["[tex]/textmacros"]}, "tex": {"packages": {"[+]": ["textmacros"]}}}

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# ".rst" first: autosummary writes its generated API pages with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

autosummary_generate = True
autodoc_member_order = "bysource"
# Signatures as optax's read: the types in the signature, one parameter a line when it is long,
# and the names of type aliases (the public modules annotate with ``from __future__ import
# annotations``, so autodoc sees ``optax.ScalarOrSchedule``, not the union it stands for).
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
python_use_unqualified_type_names = True
maximum_signature_line_length = 88
_ALIASES = {
    "ScalarOrSchedule": "optax.ScalarOrSchedule",
    "Schedule": "optax.Schedule",
    "Params": "optax.Params",
    "Updates": "optax.Updates",
    "OptState": "optax.OptState",
    "GradientTransformation": "optax.GradientTransformation",
    "GradientTransformationExtraArgs": "optax.GradientTransformationExtraArgs",
}
autodoc_type_aliases = {
    "jax.typing.ArrayLike": "jax.typing.ArrayLike",
    "jax.typing.DTypeLike": "jax.typing.DTypeLike",
    **{f"optax.{name}": target for name, target in _ALIASES.items()},
    # rmsprop_jax.presets imports optax as _optax (its function `optax` takes the name)
    **{f"_optax.{name}": target for name, target in _ALIASES.items()},
}
# Every cross-reference must resolve (with -W, one that does not fails the build): ours to
# this site, optax's, JAX's, NumPy's and Python's to their documentation, from the inventories
# kept in docs/_inventories/ (the build reads no network).
nitpicky = True
INVENTORIES = DOCS / "_inventories"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", str(INVENTORIES / "python.inv")),
    "numpy": ("https://numpy.org/doc/stable/", str(INVENTORIES / "numpy.inv")),
    "jax": ("https://docs.jax.dev/en/latest/", str(INVENTORIES / "jax.inv")),
    "optax": ("https://optax.readthedocs.io/en/latest/", str(INVENTORIES / "optax.inv")),
}
# A docstring that names a private helper (no page of its own) as a function.
nitpick_ignore = [("py:func", "landing_update")]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False

html_theme = "sphinx_book_theme"
# The version is in every page's title and above the navigation.
html_title = f"rmsprop_jax {release}"
templates_path = ["_templates"]
html_static_path = ["_static"]
# Wide tables and long code lines stay inside the page (no sideways scrolling at 1280 px).
html_css_files = ["custom.css"]
html_theme_options = {
    "repository_url": "https://github.com/rmsprop-jax/rmsprop_jax",
    "use_repository_button": True,
    "show_toc_level": 2,
    # The book theme has no top bar (search is in the sidebar); pydata-sphinx-theme 0.20 adds one
    # with a second search box unless this is set explicitly.
    "navbar_persistent": [],
}
html_last_updated_fmt = None
html_show_sourcelink = False

# A copy button on every code block, which copies the code without the ">>> " and "... " prompts
# and without the doctest's output; none on a notebook's outputs.
copybutton_selector = ":not(.output) > div.highlight > pre"
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


# An alias inside a union (``ArrayLike | None``) reaches the signature as the repr of Sphinx's
# placeholder for it; the signature shows the alias's name, as it does outside a union.
_ALIAS_REPR = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")
_PRIVATE_NAME = re.compile(r"\b_[A-Za-z]")


def _signature(app, what, name, obj, options, signature, return_annotation):
    # A class whose constructor takes a private type (FlatState) is made by a public function
    # (flat_init), which its docstring names: its page shows no constructor arguments.
    if what == "class" and signature and _PRIVATE_NAME.search(signature):
        return "", None
    return tuple(text if text is None else _ALIAS_REPR.sub(r"\1", text) for text in (signature, return_annotation))


# Public JAX classes whose runtime path is private (jax.Array's __qualname__ is
# jaxlib._jax.Array; jax.sharding.Mesh lives in jax._src.mesh): a type hint evaluated at
# import time names them so. Link them to their public name's documentation.
_PUBLIC_NAMES = {"jax.jaxlib._jax.Array": "jax.Array", "jax._src.mesh.Mesh": "jax.sharding.Mesh"}


def _link_public_names(app, env, node, contnode):
    from sphinx.ext import intersphinx

    public = _PUBLIC_NAMES.get(node.get("reftarget"))
    if node.get("refdomain") != "py" or public is None:
        return None
    node["reftarget"] = public
    return intersphinx.missing_reference(app, env, node, contnode)


def setup(app):
    app.connect("autodoc-process-signature", _signature)
    app.connect("missing-reference", _link_public_names, priority=400)
