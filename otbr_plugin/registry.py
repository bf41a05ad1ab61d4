"""One generic registry (timm-style ``register`` / ``create`` / ``list``) behind the model zoo, the attacks, the
defenses and the checkpoint readers.

Built-in entries that live in modules with optional dependencies are declared up front (name -> module) and
imported on first use. When such a module cannot be imported because a third-party package is missing, the
entry stays listed and asking for it fails loudly, naming the package to install; it never vanishes. A
missing module of this project itself is a bug and is raised as it is.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar, overload

__all__ = ["Registry", "MissingDependencyError", "PACKAGE_NAMES"]

T = TypeVar("T")

# import name -> the name to `pip install`, where they differ
PACKAGE_NAMES = {"ot": "POT", "sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow", "submitit": "submitit"}
_OWN_PACKAGES = ("otbr_plugin", "benchmark_adapters")


class MissingDependencyError(ImportError, ValueError):
    """A registered entry needs a Python package that is not installed (also a ``ValueError``, so callers that
    report bad names report this too)."""


def _package(import_name: str) -> str:
    top = import_name.split(".")[0]
    return PACKAGE_NAMES.get(top, top)


class Registry(Generic[T]):
    """Named entries of one kind (``"model"``, ``"attack"``, ``"defense"``, ``"checkpoint reader"``).

    ``builtins`` maps entry names to the modules that register them when imported (loaded lazily, once).
    ``case_insensitive`` lower-cases names on lookup.
    """

    def __init__(self, kind: str, builtins: Mapping[str, str] | None = None, case_insensitive: bool = False) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._builtins = dict(builtins or {})
        self._unavailable: dict[str, str] = {}
        self._case_insensitive = case_insensitive
        self._loaded = False

    # -- registration ------------------------------------------------------------------------------------
    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: T) -> T: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: Any = None, obj: Any = None) -> Any:
        """``@reg.register`` (a class with a ``name`` attribute), ``@reg.register("name")`` or
        ``reg.register("name", obj)``. Registering another object under a taken name is an error."""
        if not isinstance(name, str):  # used bare as a class decorator
            cls = name
            key = getattr(cls, "name", None)
            if not key:
                raise ValueError(f"{getattr(cls, '__name__', cls)!r} has no 'name' to register it under")
            return self.register(str(key), cls)
        if obj is None:
            return lambda o: self.register(name, o)
        key = self._key(name)
        existing = self._entries.get(key)
        if existing is not None and existing is not obj and existing != obj:
            raise ValueError(f"{self.kind} {key!r} is already registered")
        self._entries[key] = obj
        self._unavailable.pop(key, None)
        return obj

    # -- lookup ----------------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return str(name).lower() if self._case_insensitive else str(name)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for entry, module in self._builtins.items():
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                missing = err.name or ""
                if not missing or missing.split(".")[0] in _OWN_PACKAGES:  # our own code is broken: say so
                    raise
                self._unavailable[self._key(entry)] = (
                    f"{self.kind} {entry!r} needs the Python package {_package(missing)} (import name "
                    f"{missing.split('.')[0]!r}), which is not installed: pip install {_package(missing)}")

    def list(self) -> list[str]:
        """Every known name, sorted, including entries whose optional dependency is missing
        (see :meth:`unavailable`)."""
        self._load()
        return sorted(set(self._entries) | set(self._unavailable))

    def unavailable(self) -> dict[str, str]:
        """Known entries that cannot be used here, with the reason (the package to install)."""
        self._load()
        return dict(self._unavailable)

    def get(self, name: str) -> T:
        """The entry registered under ``name``; an unknown name is a ``ValueError`` listing the known ones, an
        entry with a missing dependency a :class:`MissingDependencyError` naming the package."""
        self._load()
        key = self._key(name)
        if key in self._entries:
            return self._entries[key]
        if key in self._unavailable:
            raise MissingDependencyError(self._unavailable[key])
        raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.list()) or '(none)'}")

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def items(self) -> Iterator[tuple[str, T]]:
        """(name, entry) in registration order (only usable entries)."""
        self._load()
        return iter(list(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and self._key(name) in self._entries
