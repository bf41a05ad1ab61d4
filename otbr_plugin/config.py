"""Config plumbing shared by all commands: YAML files, ``--set key=value`` overrides, dataclass building."""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

__all__ = ["load_yaml", "parse_yaml", "YamlLoader", "YamlTooLargeError", "parse_overrides", "apply_overrides", "dataclass_from_dict", "declared_values",
           "PACKAGED_CONFIGS", "packaged_configs", "packaged_config", "find_config_file", "ResolvedConfig",
           "resolve_config"]

T = TypeVar("T")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads YAML 1.2 floats: ``1e-4`` and ``5E3`` are numbers, as every user
    expects, not the strings YAML 1.1 makes of them."""


YamlLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


MAX_YAML_BYTES = 1 << 20
"""Largest YAML text read (1 MiB; the biggest shipped config is a few KB)."""
MAX_YAML_NODES = 100_000
"""Most nodes a YAML document may hold with its aliases expanded: an alias bomb (a few hundred bytes whose
nested aliases stand for billions of nodes) is refused before anything walks it."""


class YamlTooLargeError(yaml.YAMLError, ValueError):
    """A YAML text too large, or whose aliases expand to too many nodes."""


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in ``node`` with every alias expanded (each shared node counted once per use), memoized."""
    key = id(node)
    if key not in memo:
        memo[key] = 0  # a recursive alias counts nothing more on its way back
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(_expanded_nodes(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
        else:
            total = 1
        memo[key] = min(total, MAX_YAML_NODES + 1)
    return memo[key]


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (see :class:`YamlLoader`), bounded: at most
    :data:`MAX_YAML_BYTES` of text and :data:`MAX_YAML_NODES` nodes with aliases expanded
    (:class:`YamlTooLargeError` otherwise)."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlTooLargeError(f"the YAML text is {len(text)} characters; at most {MAX_YAML_BYTES} are read")
    loader = YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}) > MAX_YAML_NODES:
            raise YamlTooLargeError(f"the YAML document expands to more than {MAX_YAML_NODES} nodes through its "
                                    "aliases (&anchor/*alias); a config this large is refused")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages (a config value can be huge)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def load_yaml(path: str | Path | Traversable) -> dict[str, Any]:
    """Read a YAML mapping (a file or a packaged resource); an empty file is ``{}``; anything else than a
    mapping is an error."""
    p = path if isinstance(path, Traversable) else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    return _read_yaml(p, str(p))


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["gamma=0.1", "attack.alpha=0.2"]`` -> ``{"gamma": 0.1, "attack": {"alpha": 0.2}}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return out


def apply_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``; ``None`` values in overrides are ignored."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = apply_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError(f"{where}: {_short(value)} fits none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, args))}, got {_short(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {_short(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, where) for v in value]
        return tuple(seq) if origin is tuple else seq
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {_short(value)}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where} must be an integer, got {_short(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {_short(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {_short(value)}")
        return value
    return value


def declared_values(cls: type, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The init fields of dataclass ``cls`` as declared (defaults, not values derived in ``__post_init__``), with
    ``overrides`` on top: e.g. to write out a complete, editable config."""
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            values[f.name] = f.default_factory()  # type: ignore[misc]
    return values


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any], what: str | None = None) -> T:
    """Build dataclass ``cls`` from a mapping: unknown keys are an error listing the valid ones, values are
    checked against the field types (ints are accepted for floats), missing keys take the defaults."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    what = what or cls.__name__
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(v, hints[k], f"{what}.{k}") for k, v in data.items()}
    return cls(**kwargs)  # type: ignore[call-arg]


PACKAGED_CONFIGS = "otbr_plugin.configs"  # the top-level configs/ folder, shipped inside the package


def packaged_configs() -> Traversable:
    """The packaged ``configs/`` folder, read through :mod:`importlib.resources` (works from a wheel, an editable
    install or a zip). A source checkout that is not installed falls back to the ``configs/`` beside the
    package; never to the current folder."""
    try:
        return importlib.resources.files(PACKAGED_CONFIGS)
    except ModuleNotFoundError:
        source = Path(__file__).resolve().parents[1] / "configs"
        if source.is_dir():
            return source
        raise FileNotFoundError(f"the packaged configs ({PACKAGED_CONFIGS}) are missing: reinstall otbr-plugin")


def packaged_config(kind: str, name: str, dataset: str) -> Traversable | None:
    """``configs/<kind>/<name>/<dataset>.yaml`` of the package, if it exists (kind: defense, attack)."""
    res = packaged_configs().joinpath(kind, name, f"{dataset}.yaml")
    return res if res.is_file() else None


def find_config_file(path: str | Path, *relative_to: Path) -> Path | Traversable:
    """A config file named by a user: as given, relative to each of ``relative_to``, or, for a path that starts
    with ``configs/`` (as the grids and docs write them), the packaged copy."""
    p = Path(path)
    for cand in (p, *(base / p for base in relative_to)):
        if cand.is_file():
            return cand
    parts = p.parts
    if len(parts) > 1 and parts[0] == "configs":
        res = packaged_configs().joinpath(*parts[1:])
        if res.is_file():
            return res
    where = ", ".join(str(b) for b in relative_to)
    raise FileNotFoundError(f"config file {str(path)!r} does not exist (looked relative to the current folder"
                            f"{', ' + where if where else ''} and in the packaged configs/)")


@dataclass(frozen=True)
class ResolvedConfig:
    """A config mapping and where each layer came from (``source``, written to run records)."""

    values: dict[str, Any]
    source: str


def resolve_config(kind: str, name: str, dataset: str | None, user_yaml: str | Path | Mapping[str, Any] | None = None,
                   overrides: Mapping[str, Any] | list[str] | None = None, *, user_label: str | None = None
                   ) -> ResolvedConfig:
    """The one config resolution of every entry point (CLI, grid, BackdoorBench face, installer).

    Layers, later wins: the built-in defaults of the config dataclass (applied when the class is built from
    ``values``) < the packaged ``configs/<kind>/<name>/<dataset>.yaml`` < ``user_yaml`` (a file, or a mapping
    such as a grid's inline config; ``user_label`` names it in ``source``) < ``overrides`` (``--set k=v``
    strings or a mapping; ``None`` values are ignored)."""
    values: dict[str, Any] = {}
    layers = ["built-in defaults"]
    packaged = packaged_config(kind, name, dataset) if dataset else None
    if packaged is not None:
        values = _merge(values, _read_yaml(packaged, f"packaged configs/{kind}/{name}/{dataset}.yaml"))
        layers.append(f"packaged configs/{kind}/{name}/{dataset}.yaml")
    if user_yaml is not None:
        if isinstance(user_yaml, Mapping):
            user, label = dict(user_yaml), user_label or "inline"
        else:
            user, label = load_yaml(user_yaml), user_label or str(user_yaml)
        values = _merge(values, user)
        layers.append(f"user {label}")
    if overrides:
        more = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        more = {k: v for k, v in more.items() if v is not None}
        if more:
            values = apply_overrides(values, more)
            layers.append("--set " + ",".join(sorted(more)))
    return ResolvedConfig(values, " < ".join(layers))


def _merge(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge a YAML layer: unlike ``apply_overrides`` an explicit ``null`` in the layer is kept."""
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(res: Traversable, label: str) -> dict[str, Any]:
    try:
        with res.open("rb") as fh:  # bounded: never more than the limit is read into memory
            raw = fh.read(MAX_YAML_BYTES + 1)
        data = parse_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{label}: not UTF-8 text ({err})") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{label}: not valid YAML ({err})") from err
    except RecursionError as err:
        raise ValueError(f"{label}: nested too deeply to be a config file") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{label}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data
