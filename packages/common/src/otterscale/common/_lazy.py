"""Package attributes imported on first use (PEP 562), so a command loads only what it touches.

``otterscale server`` and ``otterscale agent`` import their package (and this one) before they
start Envoy, where the service itself runs: every module they do not need there is start-up
time lost.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose public names live in ``exports``
    (name -> relative module, such as ``"._config"``, or ``"._discovery:DEFAULT_TTL"`` for a name
    that the module calls otherwise)."""

    def __getattr__(name: str) -> Any:
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = where.partition(":")
        value = getattr(importlib.import_module(module, package), attribute or name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
