"""Typed config from layered sources: defaults < TOML file < env (X402_PROXY_*) < CLI flags.

Each section is a dataclass owned by the module that uses it; this module only knows how to fill
dataclasses from plain values and to say *where* a bad value came from.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

ENV_PREFIX = "X402_PROXY_"

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is invalid; names the key, its source and what is allowed."""

    def __init__(self, key: str, source: str, problem: str) -> None:
        super().__init__(f"config {key}: {problem} (from {source})")
        self.key = key
        self.source = source
        self.problem = problem


@dataclasses.dataclass
class Layer:
    """One source of values: a nested dict plus a function naming where a key came from."""

    values: dict[str, Any]
    describe: Any  # Callable[[str], str], kept loose for dataclass simplicity


def _toml_locator(path: Path, text: str) -> Any:
    lines = text.splitlines()

    def describe(dotted: str) -> str:
        *tables, leaf = dotted.split(".")
        section = ".".join(tables)
        current = ""
        key_re = re.compile(rf"^\s*\"?{re.escape(leaf)}\"?\s*=")
        for number, line in enumerate(lines, 1):
            header = re.match(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?", line)
            if header:
                current = header.group(1)
                continue
            if current == section and key_re.match(line):
                return f"{path}:{number}"
        return str(path)

    return describe


def file_layer(path: Path) -> Layer:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", str(path), f"cannot read file: {exc.strerror}") from exc
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"not valid TOML: {exc}") from exc
    return Layer(values, _toml_locator(path, text))


def env_layer(env: Mapping[str, str], known_top: set[str]) -> Layer:
    """`X402_PROXY_POLICY__MAX_PER_PAYMENT=0.05` -> policy.max_per_payment; values are TOML if they parse."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if parts[0] not in known_top:
            continue
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_env_value(raw)
        origin[".".join(parts)] = f"env {name}"
    return Layer(values, lambda dotted: origin.get(dotted, "environment"))


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def merge_layers(layers: list[Layer]) -> tuple[dict[str, Any], dict[str, str]]:
    """Deep-merge; later layers win. Returns values and the source of every leaf."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def walk(dst: dict[str, Any], src: dict[str, Any], prefix: str, layer: Layer) -> None:
        for key, value in src.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                walk(dst[key], value, f"{dotted}.", layer)
            else:
                dst[key] = value
                _record(value, dotted, layer)

    def _record(value: Any, dotted: str, layer: Layer) -> None:
        sources[dotted] = layer.describe(dotted)
        if isinstance(value, dict):
            for k, v in value.items():
                _record(v, f"{dotted}.{k}", layer)

    for layer in layers:
        walk(merged, layer.values, "", layer)
    return merged, sources


def build(cls: type[T], values: Mapping[str, Any], sources: Mapping[str, str], prefix: str = "") -> T:
    """Instantiate dataclass `cls` from `values`, converting and validating each field."""
    if not isinstance(values, Mapping):
        raise ConfigError(
            prefix.rstrip(".") or "(root)", sources.get(prefix.rstrip("."), "?"), "must be a table"
        )
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key not in fields:
            dotted = f"{prefix}{key}"
            allowed = ", ".join(sorted(fields))
            raise ConfigError(dotted, sources.get(dotted, "?"), f"unknown key; allowed here: {allowed}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        dotted = f"{prefix}{name}"
        kwargs[name] = convert(hints[name], value, dotted, sources)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        where = next((sources[k] for k in sources if k.startswith(prefix)), "?") if prefix else "?"
        raise ConfigError(prefix.rstrip(".") or "(root)", where, str(exc)) from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            field = getattr(exc, "field", None)
            dotted = f"{prefix}{field}" if field else prefix.rstrip(".")
            raise ConfigError(dotted, sources.get(dotted, "defaults"), str(exc)) from exc
    return obj


def convert(hint: Any, value: Any, dotted: str, sources: Mapping[str, str]) -> Any:
    source = sources.get(dotted, "?")
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None or (value == "" and type(None) in get_args(hint) and str not in options):
            return None
        errors = []
        for option in options:
            try:
                return convert(option, value, dotted, sources)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(dotted, source, "; ".join(errors))
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return build(hint, value, sources, f"{dotted}.")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(dotted, source, f"must be a list, got {type(value).__name__}")
        (item,) = get_args(hint)[:1]
        items = [convert(item, v, f"{dotted}", sources) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(dotted, source, "must be a table")
        _, vtype = get_args(hint)
        return {str(k): convert(vtype, v, f"{dotted}.{k}", sources) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(dotted, source, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(dotted, source, f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(dotted, source, f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            # Amounts are decimal strings; accept a bare TOML number but keep its text form.
            return str(value)
        raise ConfigError(dotted, source, f"must be a string, got {value!r}")
    if hint is Path:
        if isinstance(value, str):
            return Path(value).expanduser()
        raise ConfigError(dotted, source, f"must be a path string, got {value!r}")
    if get_origin(hint) is typing.Literal:
        if value in get_args(hint):
            return value
        allowed = ", ".join(repr(a) for a in get_args(hint))
        raise ConfigError(dotted, source, f"must be one of {allowed}, got {value!r}")
    return value


def to_plain(obj: Any) -> Any:
    """Dataclass tree -> TOML-ish plain values (for `config check`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
