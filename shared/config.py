"""Typed configuration: YAML files in ``configs/`` loaded into dataclasses, with ``key.sub=value`` overrides.

Every component gets its own dataclass section; this module only knows how to turn a nested mapping into those
dataclasses and back, and how to say precisely what is wrong when it does not fit:

    cfg = load_config(TrainConfig, "configs/train/demo.yaml", ["optim.lr=3e-4", "model.depth=4"])
    save_config(cfg, run_dir / "config.yaml")       # the resolved config, next to every output

Composition: a mapping may carry ``base: other.yaml`` (or a list of files), merged first and then overridden by the
mapping's own keys; a section whose type is a dataclass may be given as a YAML path instead of a mapping. Relative
paths are looked up next to the file that names them, then in the current directory, then in the repository's
``configs/`` folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

CONFIGS_ROOT = Path(__file__).resolve().parents[1] / "configs"
BASE_KEY = "base"


class ConfigError(ValueError):
    """A user mistake in a config file or override: the message names the dotted key."""


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def _resolve_path(name: str, search: Sequence[Path]) -> Path:
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        if candidate.is_file():
            return candidate
        raise ConfigError(f"config file not found: {candidate}")
    tried = []
    for folder in [*search, Path.cwd(), CONFIGS_ROOT]:
        path = folder / candidate
        tried.append(str(path))
        if path.is_file():
            return path
    raise ConfigError(f"config file {name!r} not found; looked in: {', '.join(tried)}")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _expand_bases(data: dict, search: Sequence[Path], seen: tuple[Path, ...] = ()) -> dict:
    """Merge ``base:`` files (recursively) under ``data``; nested mappings are expanded too."""
    data = dict(data)
    bases = data.pop(BASE_KEY, None)
    merged: dict = {}
    if bases is not None:
        for name in [bases] if isinstance(bases, str) else list(bases):
            path = _resolve_path(str(name), search)
            if path in seen:
                raise ConfigError(
                    f"config files include each other in a cycle: {' -> '.join(map(str, seen + (path,)))}"
                )
            merged = _deep_merge(merged, _expand_bases(_read_yaml(path), [path.parent], seen + (path,)))
    for key, value in data.items():
        if isinstance(value, dict):
            data[key] = _expand_bases(value, search, seen)
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, so ``1e-4``, ``true``, ``[1, 2]`` and ``null`` work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for _i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and child.endswith((".yaml", ".yml")):
            child = {BASE_KEY: child}  # a section given as a file: keep the file, override on top of it
        elif not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), data: dict | None = None
) -> T:
    """Build ``cls`` from a YAML file (or ``data``) plus ``key.sub=value`` overrides, validating every key."""
    search: list[Path] = []
    raw: dict = {}
    if path is not None:
        file = _resolve_path(str(path), [])
        search = [file.parent]
        raw = _read_yaml(file)
    if data is not None:
        raw = _deep_merge(raw, data)
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(raw, parts, value)
    raw = _expand_bases(raw, search)
    return from_dict(cls, raw, search=search)


# ----------------------------------------------------------------------------------------------------------------------
# Dict -> dataclass with validation


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, search: Sequence[Path]) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key, search)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} fits none of {' | '.join(_type_name(o) for o in options)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            value = {BASE_KEY: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        value = _expand_bases(value, search)
        return from_dict(tp, value, prefix=f"{key}.", search=search)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}: {value!r}")
            return tuple(_convert(a, v, f"{key}[{i}]", search) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]", search) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        args = get_args(tp)
        if not args:
            return dict(value)
        return {k: _convert(args[1], v, f"{key}.{k}", search) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot read {value!r} as {_type_name(tp)}")


def from_dict(cls: type[T], data: dict, prefix: str = "", search: Sequence[Path] = ()) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and ill-typed values raise ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; allowed keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(hints[name], value, f"{prefix}{name}", search) for name, value in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key {prefix}{missing[0]}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a __post_init__ check: say which section it came from
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Saving and the command line


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-safe data (dataclasses -> dicts, tuples -> lists, paths -> str)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config atomically (tmp + rename), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


def add_config_args(
    parser: argparse.ArgumentParser, default: str | None = None, example: str = "optim.lr=3e-4 data.num_workers=0"
) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config",
        default=default,
        required=default is None,
        help="YAML config file (a preset under configs/ or your own); its sections are validated on load",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"override any config key with a dotted path, e.g. {example} (values are parsed as YAML)",
    )
    return parser
