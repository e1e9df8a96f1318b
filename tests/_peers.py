"""Import a peer's submodules (verl, OpenRLHF) without running its package ``__init__``.

verl's ``__init__`` imports Ray; OpenRLHF's ``models/__init__`` pulls DeepSpeed-dependent trainers; the
tests need only their pure-PyTorch functions.  ``import_peer`` registers empty package objects pointing at
the installed directories (so only the named submodules and their own imports run) and stubs modules that
are missing here, in ``sys.modules`` during the import only: left there, a stub ``deepspeed`` would make
transformers' ``find_spec("deepspeed")`` fail in later tests.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest


def _stub_module(name: str) -> types.ModuleType:
    """An empty module whose every public attribute is ``object`` (enough for ``from x import y``)."""
    stub = types.ModuleType(name)

    def any_attribute(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return object

    stub.__getattr__ = any_attribute
    return stub


def import_peer(package: str, stubs, importer, subpackages=()):
    """Run ``importer()`` (imports of ``package``'s submodules) without the ``__init__`` of ``package`` and
    of ``subpackages``, with the missing modules ``stubs`` (dotted names allowed) stubbed during the import.
    Skips when the peer is not installed or its own dependencies are missing (``pytest.importorskip``
    would run the ``__init__``, so availability is checked by spec)."""
    if getattr(sys.modules.get(package), "__path__", None) is None and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (optional peer)")
    added = []
    for name in stubs:
        top = name.split(".")[0]
        if name not in sys.modules and (top in added or importlib.util.find_spec(top) is None):
            sys.modules[name] = _stub_module(name)
            added.append(name)
    for name in (package, *subpackages):
        if not getattr(sys.modules.get(name), "__path__", None):
            spec = importlib.util.find_spec(name)
            pkg = types.ModuleType(name)
            pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
            sys.modules[name] = pkg
    try:
        return importer()
    except ImportError as e:  # the peer's own dependencies (tensordict, codetiming, ...) missing
        pytest.skip(f"{package} not importable here: {e}")
    finally:
        for name in added:
            del sys.modules[name]
