"""The gifjax API pages: one directive that documents a module exactly as it exports itself.

``.. gifjax-module:: gifjax.solvers`` renders, in this order,

1. the module docstring (``automodule`` without members: the overview, tables, example);
2. a summary table of every public name, each linked to the one place it is documented —
   a name re-exported from another documented module (``gifjax.influence`` is
   ``gifjax.estimators.influence``) links there instead of being documented twice;
3. ``autoclass`` / ``autofunction`` / ``autodata`` for the names this module owns.

Public names are ``__all__`` where a module has one (the core: tests/test_api.py
requires it); otherwise the non-underscore functions, classes and UPPER_CASE
constants the module itself defines (``gifjax.experiments``). ``:summary-only:``
renders 1–2 (the top-level ``gifjax`` page: everything there is documented in
its own module).

At ``builder-inited`` the configured page list (``gifjax_api_modules``) is
compared with the package: a public module without a page, or a private one
with a page, is a warning (so ``-W`` fails the build).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re

from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

_FIELD_ALIAS = re.compile(r"^Alias for field number \d+$")


# ----------------------------------------------------------------------------- what a module exports


def _is_private(modname: str) -> bool:
    return any(part.startswith("_") for part in modname.split("."))


def _is_function(obj) -> bool:
    # jax.jit-wrapped functions (PjitFunction) are routines by behaviour, not by type
    return inspect.isroutine(obj) or (callable(obj) and not inspect.isclass(obj)
                                      and hasattr(obj, "__wrapped__"))


def _kind(obj) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if _is_function(obj):
        return "function"
    return "data"


def _assigned_names(modname: str) -> list[str]:
    """Top-level ``NAME = ...`` assignments in a module's source, in order."""
    mod = importlib.import_module(modname)
    try:
        tree = ast.parse(inspect.getsource(mod))
    except (OSError, TypeError):
        return []
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        for t in targets:
            if isinstance(t, ast.Name):
                names.append(t.id)
    return names


def public_names(modname: str) -> list[str]:
    mod = importlib.import_module(modname)
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    names = []
    constants = set(_assigned_names(modname))
    for name, obj in vars(mod).items():
        if name.startswith("_"):
            continue
        if (inspect.isclass(obj) or _is_function(obj)) and getattr(obj, "__module__", None) == modname:
            names.append(name)
        elif name in constants and name.isupper():
            names.append(name)
    return names


def canonical(modname: str, name: str, documented: list[str]) -> str:
    """The full name under which ``modname.name`` is documented."""
    obj = getattr(importlib.import_module(modname), name)
    if inspect.ismodule(obj):
        return obj.__name__
    if inspect.isclass(obj) or _is_function(obj):
        home = getattr(obj, "__module__", None)
        if (home in documented and home != modname and name in public_names(home)
                and getattr(importlib.import_module(home), name) is obj):
            return f"{home}.{name}"
        return f"{modname}.{name}"
    # data: the documented module whose source assigns it (e.g. METHODS → gifjax.operators)
    for home in documented:
        if home == modname or name not in public_names(home):
            continue
        if name in _assigned_names(home) and getattr(importlib.import_module(home), name) is obj:
            return f"{home}.{name}"
    return f"{modname}.{name}"


def _first_paragraph(text: str | None) -> str:
    if not text:
        return ""
    para = []
    for line in inspect.cleandoc(text).splitlines():
        if not line.strip():
            break
        para.append(line.strip())
    return " ".join(para)


def summary(full: str) -> str:
    modname, _, name = full.rpartition(".")
    obj = getattr(importlib.import_module(modname), name)  # a submodule too: a package attribute
    kind = _kind(obj)
    if kind == "data":
        docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        text = _first_paragraph("\n".join(docs.get(("", name), [])))
        if not text and _short_value(obj, 80):  # an undocumented constant: show its value
            text = f"``{obj!r}``"
        return text
    return _first_paragraph(inspect.getdoc(obj))


def _short_value(obj, limit: int) -> bool:
    """Whether a constant's repr is worth showing: short, and no ``<object at …>`` / private paths."""
    text = repr(obj)
    return len(text) <= limit and "<" not in text


_ROLE = {"module": "mod", "class": "class", "function": "func", "data": "data"}


class GifjaxModule(SphinxDirective):
    required_arguments = 1
    option_spec = {"summary-only": directives.flag}

    def run(self):
        modname = self.arguments[0]
        documented = list(self.config.gifjax_api_modules)
        mod = importlib.import_module(modname)
        if getattr(mod, "__file__", None):
            self.env.note_dependency(mod.__file__)
        lines = [f".. automodule:: {modname}", ""]
        rows, owned = [], []
        for name in public_names(modname):
            target = canonical(modname, name, documented)
            obj = getattr(mod, name)
            kind = _kind(obj)
            # a re-exported name (and a module) shows where it lives; an owned one its short name
            tilde = "" if target != f"{modname}.{name}" or kind == "module" else "~"
            rows.append((f":{_ROLE[kind]}:`{tilde}{target}`", summary(target)))
            if target == f"{modname}.{name}":
                owned.append((kind, name, obj))
        if rows:
            lines += [".. rubric:: Summary", "",
                      ".. list-table::", "   :widths: 30 70", "   :class: gifjax-summary", ""]
            for ref, text in rows:
                lines += [f"   * - {ref}", f"     - {text}" if text else "     -"]
            lines.append("")
        if "summary-only" not in self.options and owned:
            lines += [f".. currentmodule:: {modname}", ""]
            for kind, name, obj in owned:
                if kind == "class":
                    lines += [f".. autoclass:: {name}", "   :members:", ""]
                elif kind == "function":
                    lines += [f".. autofunction:: {name}", ""]
                elif kind == "data":
                    lines += [f".. autodata:: {name}"]
                    if not _short_value(obj, 160):
                        lines += ["   :no-value:"]
                    lines.append("")
        return self.parse_text_to_nodes("\n".join(lines))


# ----------------------------------------------------------------------------- autodoc hooks


def _skip_field_aliases(app, what, name, obj, skip, options):
    """NamedTuple fields ("Alias for field number 0") are described in the class docstring."""
    doc = getattr(obj, "__doc__", None)
    if what == "class" and isinstance(doc, str) and _FIELD_ALIAS.match(doc.strip()):
        return True
    return None


def _drop_type_docstrings(app, what, name, obj, options, lines):
    """A constant without a ``#:`` comment must not show its type's docstring (tuple, dict, …)."""
    if what == "data" and lines:
        type_doc = inspect.cleandoc(type(obj).__doc__ or "")
        if type_doc and "\n".join(lines).strip() == type_doc.strip():
            lines[:] = []


def _check_coverage(app: Sphinx):
    documented = set(app.config.gifjax_api_modules)
    skip = set(app.config.gifjax_api_skip)
    package = importlib.import_module("gifjax")
    found = {"gifjax"} | {m.name for m in pkgutil.walk_packages(package.__path__, "gifjax.")}
    public = {m for m in found if not _is_private(m)} - skip
    for m in sorted(public - documented):
        logger.warning(f"gifjax_api: public module {m} has no API page (add it to gifjax_api_modules)")
    for m in sorted(documented - public):
        logger.warning(f"gifjax_api: {m} is listed in gifjax_api_modules but is not a public module")


def setup(app: Sphinx):
    app.add_config_value("gifjax_api_modules", [], "env")
    app.add_config_value("gifjax_api_skip", [], "env")
    app.add_directive("gifjax-module", GifjaxModule)
    app.connect("autodoc-skip-member", _skip_field_aliases)
    app.connect("autodoc-process-docstring", _drop_type_docstrings)
    app.connect("builder-inited", _check_coverage)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
