"""Names a package imports on first use (PEP 562), so the daemon can import
a light part of a package before it greets and load the rest afterwards."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, namespace: dict[str, Any], table: Mapping[str, str]) -> Callable[[str], Any]:
    """:return: a module ``__getattr__`` for ``package`` that imports
    ``name`` from ``table[name]`` on first use and keeps it in
    ``namespace`` (the package's globals), so later lookups cost nothing.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
