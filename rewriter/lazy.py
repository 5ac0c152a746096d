"""Modules imported on first use (ONNX for runs that never read it)."""

from __future__ import annotations

import importlib
from types import ModuleType


class lazy_module:
    """``name`` imported at the first attribute read (``also``: submodules imported with it)."""

    def __init__(self, name: str, *also: str):
        self._names = (name, *also)
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str):
        if self._module is None:
            for name in reversed(self._names):
                importlib.import_module(name)
            self.__dict__["_module"] = importlib.import_module(self._names[0])
        return getattr(self._module, attribute)
