"""Packages whose names are imported on first use (PEP 562): `penult CMD --help` imports one
light module of extract/ or classify/ without the package pulling in torch and scikit-learn
through its other modules."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_package"]


def lazy_package(
    name: str, where: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package ``name``'s ``__getattr__`` and ``__dir__``: each exported name is imported
    from the module ``where`` says on first use. Importing a submodule sets it as an attribute of
    its package; where a function of the same name is exported (``train`` of ``train``), the
    function keeps the name, as it did when the package imported everything."""
    package = sys.modules[name]

    def getattr_(attr: str) -> Any:
        module = where.get(attr)
        if module is None:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(module), attr)
        setattr(package, attr, value)
        return value

    def dir_() -> list[str]:
        return sorted([*vars(package), *where])

    class Package(types.ModuleType):
        def __setattr__(self, attr: str, value: Any) -> None:
            if isinstance(value, types.ModuleType) and where.get(attr) == f"{name}.{attr}":
                return
            super().__setattr__(attr, value)

    package.__class__ = Package
    return getattr_, dir_
