"""A config from YAML plus dotted `key=value` overrides, typed like the schema: an unknown key is refused with the
closest valid one, a bad value names the override (or the file) that set it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_train.config.quote import clip, quote
from dist_train.config.schema import Config, ConfigError
from dist_train.config.validation import validate
from dist_train.config.yaml_reader import YamlRefused, parse_yaml


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {quote(value)} matches none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {quote(value)} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {quote(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {quote(value)}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {quote(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {quote(value)}")
        if not -2**63 <= value < 2**63:  # no size, step or seed is larger, and later messages quote the value
            raise ConfigError(f"{key}: {quote(value)} does not fit in a 64-bit integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {quote(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {quote(value)}")
        return value
    raise TypeError(f"unsupported config annotation {tp} at {key}")


def _unknown_key_error(prefix: str, name: str, valid: list[str]) -> ConfigError:
    full = f"{prefix}.{name}" if prefix else name
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key {quote(full)}{hint} (valid keys here: {', '.join(valid)})", (full,))


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            raise _unknown_key_error(prefix, str(name), names)
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}: missing required key '{missing[0]}'")
    return cls(**kwargs)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one dotted `key=value` override in place; the value is parsed as YAML (`4`, `true`, `[a, b]`)."""
    if "=" not in override:
        raise ConfigError(f"override {quote(override)} is not of the form key=value (e.g. train.max_steps=100)")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {quote(override)}: {quote(part)} is not a section")
    try:
        node[parts[-1]] = parse_yaml(raw) if raw.strip() else None
    except YamlRefused as e:
        raise ConfigError(f"override {clip(override)}: {e.problem}") from None
    except yaml.YAMLError as e:
        key = clip(dotted)
        raise ConfigError(f"override {clip(override)}: the value is not valid YAML ({_yaml_problem(e)}); e.g. "
                          f"{key}=4, {key}=true, {key}='[a, b]' (quoted for the shell)") from None


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """The one override syntax of every command that takes a config: positional `key=value` pairs (as
    `launch/train.py` always took them) and, equally, `--set key=value` (repeatable)."""
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.max_steps=100 model.n_layers=24")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_overrides",
                        help="the same as a positional key=value (repeatable); applied after the positional ones")


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, but `key=value` overrides may also come after options (`--resume none
    train.max_steps=10`), which argparse alone refuses once a positional list has been read."""
    args, extra = parser.parse_known_args(argv)
    stray = [word for word in extra if word.startswith("-") or "=" not in word]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def overrides_from(args: argparse.Namespace) -> list[str]:
    """The overrides of a command line parsed with `add_override_arguments`, in the order they apply."""
    return [*args.overrides, *args.set_overrides]


def config_from_dict(tree: dict[str, Any]) -> Config:
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None), apply overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        tree = _parse_file(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    for override in overrides:
        apply_override(tree, override)
    run = tree.setdefault("run", {})
    if isinstance(run, dict) and run.get("out_dir") is None:
        run["out_dir"] = default_out_dir(path)
    try:
        return config_from_dict(tree)
    except ConfigError as e:
        raise ConfigError(f"{_error_source(e, path, overrides)}{e}", e.keys) from None


def _parse_file(path: Path) -> Any:
    """The YAML document in `path`; every way it can fail is a ConfigError naming the file (and the line)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"config file {path}, line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}): "
                          f"save it as UTF-8") from None
    try:
        return parse_yaml(text)
    except YamlRefused as e:
        raise ConfigError(f"config file {path}{_yaml_place(e)}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}{_yaml_place(e)} is not valid YAML: {_yaml_problem(e)}") from None


def default_out_dir(path: Path | None) -> str:
    """`runs/<config file name>`: each config trains into its own folder (`runs/run` without a file)."""
    return f"runs/{path.stem if path is not None else 'run'}"


def _yaml_place(error: yaml.YAMLError) -> str:
    """`, line L, column C` of a YAML error (PyYAML's own text names "<unicode string>" instead of the file)."""
    mark = getattr(error, "problem_mark", None)
    return f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None)
    context = getattr(error, "context", None)
    return "; ".join(p for p in (context, problem) if p) or str(error).splitlines()[0]


def _error_source(error: ConfigError, path: Path | None, overrides: list[str] | tuple[str, ...]) -> str:
    """Where the offending key was written: the command-line override that set it (the last one wins), else
    the YAML file. The error lists its keys (`ConfigError.keys`), or its message starts with one or quotes it;
    an override of a whole section or list (`data.sources=[...]`) sets every key below it."""
    message = str(error)
    for override in reversed(overrides):
        key = override.split("=", 1)[0].strip()
        if (message.startswith(f"{key}:") or f"'{key}'" in message
                or any(k == key or k.startswith((f"{key}.", f"{key}[")) for k in error.keys)):
            return f"override {clip(override)}: "
    return f"{path}: " if path is not None else ""
