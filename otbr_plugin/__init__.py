"""otbr-plugin: OTBR and baseline backdoor defenses in a BackdoorBench-style harness.

The Python API, ``otbr_plugin.defend(model, "otbr", ...)`` and ``otbr_plugin.evaluate(model, ...)``, lives in
:mod:`otbr_plugin.api` and is imported on first use, so ``import otbr_plugin`` stays light.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
__all__ = ["defend", "evaluate", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("defend", "evaluate"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'otbr_plugin' has no attribute {name!r}")
