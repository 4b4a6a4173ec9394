"""User code as datasets and backbones: ``"package.module:Name"`` in a spec, or a kind an installed package
registers under the entry-point groups ``alloclab.backbones`` / ``alloclab.datasets``.

Nothing is imported until a spec uses the kind. What comes back is checked at the boundary: a backbone must be a
class with ``Options`` (a pydantic model), ``pretrain`` and ``embed``; a dataset an object (module or class) with
``Options`` and ``load``. Anything else is a clear error naming the reference, never a traceback from deep inside.
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import Any

REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
GROUPS = {"backbone": "alloclab.backbones", "dataset": "alloclab.datasets"}


def is_ref(kind: str) -> bool:
    """True for a 'package.module:Name' reference."""
    return bool(REF.match(kind))


def registered(what: str) -> dict[str, Any]:
    """Entry points of installed packages for ``what`` ('backbone' or 'dataset'): name -> EntryPoint."""
    return {ep.name: ep for ep in entry_points(group=GROUPS[what])}


def load(kind: str, what: str, error: type[Exception]) -> Any:
    """The object ``kind`` names: an entry point's target or a 'package.module:Name' reference.

    Raises:
        error: the module cannot be imported, has no such name, or the object does not fit the contract.
    """
    eps = registered(what)
    source = f"entry point '{kind}' ({eps[kind].value})" if kind in eps else f"'{kind}'"
    try:
        if kind in eps:
            obj = eps[kind].load()
        else:
            module_name, _, name = kind.partition(":")
            module = importlib.import_module(module_name)
            if not hasattr(module, name):
                raise error(f"{what} {source}: module {module_name} has no '{name}'; fix: check the name after ':'")
            obj = getattr(module, name)
    except error:
        raise
    except ImportError as e:
        raise error(f"{what} {source}: cannot import it ({e}); fix: install "
                    "the package or put its folder on PYTHONPATH (Ray workers need it too)") from e
    check(obj, what, source, error)
    return obj


def check(obj: Any, what: str, source: str, error: type[Exception]) -> None:
    """The contract a plugin must meet (see backends/base.py)."""
    needs = ("Options", "pretrain", "embed") if what == "backbone" else ("Options", "load")
    lacking = [n for n in needs if not hasattr(obj, n)]
    if what == "backbone" and not isinstance(obj, type):
        lacking.insert(0, "(be a class)")
    if lacking:
        raise error(f"{what} {source} does not fit the {what} contract: it lacks {', '.join(lacking)}; fix: see "
                    "backends/base.py (README: Plugins)")
