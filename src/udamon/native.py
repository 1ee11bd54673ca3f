"""udamon's optional C extensions: loaded here, one rule for all of them.

An extension is used unless it is not built (the install had no C compiler or
Python headers) or ``UDAMON_PURE_PYTHON=1`` asks for the Python version of the
same code (for comparison, and to run as such an install would).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

PURE_PYTHON_ENV = "UDAMON_PURE_PYTHON"


def pure_python_asked() -> bool:
    return os.environ.get(PURE_PYTHON_ENV) == "1"


def load(name: str) -> ModuleType | None:
    """The extension module ``name`` (e.g. ``udamon.core._regions``), or None."""
    if pure_python_asked():
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
