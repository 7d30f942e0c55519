"""Run configurations as dataclasses that round-trip through JSON and command-line flags.

A config may hold dataclass fields one level deep (e.g. `train: TrainConfig`); their fields
become flat flags (`--lr`), nested objects in JSON. Field types: bool, int, float, str,
optional scalars and lists of scalars.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from extractor.jsonstream import write_text_atomic

T = TypeVar("T")


def _fields(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, True), or (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _flag_specs(cls: type) -> dict[str, tuple[str | None, str, Any]]:
    """flag name -> (nested field or None, field name, type); errors on clashing names."""
    specs: dict[str, tuple[str | None, str, Any]] = {}
    for name, tp in _fields(cls):
        if dataclasses.is_dataclass(tp):
            for sub, sub_tp in _fields(tp):
                if sub in specs:
                    raise TypeError(f"{cls.__name__}: flag --{sub} is defined twice")
                specs[sub] = (name, sub, sub_tp)
        else:
            if name in specs:
                raise TypeError(f"{cls.__name__}: flag --{name} is defined twice")
            specs[name] = (None, name, tp)
    return specs


def _none_or(convert: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else convert(text)
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per config field; unset flags stay absent so a JSON config can fill them."""
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON file with the config; flags given on the command line override it")
    for flag, (_, _, tp) in _flag_specs(cls).items():
        base, optional = unwrap_optional(tp)
        opt = f"--{flag.replace('_', '-')}"
        kwargs: dict[str, Any] = {"dest": flag, "default": argparse.SUPPRESS}
        if base is bool:
            parser.add_argument(opt, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) in (list, tuple):
            item = typing.get_args(base)[0]
            parser.add_argument(opt, nargs="*", type=item, **kwargs)
            continue
        parser.add_argument(opt, type=_none_or(base) if optional else base, **kwargs)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build `cls` from a (possibly partial) nested dict; unknown keys are an error naming them."""
    known = dict(_fields(cls))
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = known[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, f"{where}.{name}")
        elif isinstance(value, list) and typing.get_origin(unwrap_optional(tp)[0]) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (nested dataclasses become objects)."""
    return dataclasses.asdict(config)


def _merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None, base: dict[str, Any] | None = None) -> T:
    """Parse `--config file.json` and flags into `cls`: flags override the file, which overrides
    `base` (a caller's defaults), which overrides the dataclass defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, cls)
    ns = vars(parser.parse_args(argv))
    config_path = ns.pop("config")
    data: dict[str, Any] = dict(base or {})
    if config_path is not None:
        if not config_path.is_file():
            raise FileNotFoundError(f"--config: no file at {config_path}")
        data = _merge(data, json.loads(config_path.read_text()))
    specs = _flag_specs(cls)
    for flag, value in ns.items():
        nested, field, _ = specs[flag]
        if nested is None:
            data[field] = value
        else:
            data.setdefault(nested, {})[field] = value
    return from_dict(cls, data, str(config_path) if config_path else "flags")


def save_json(config: Any, path: str | Path) -> None:
    """Write the config next to a run's outputs so the run can be repeated."""
    write_text_atomic(path, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    """Read a config written by `save_json` (or by hand / by a Luigi task)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no file at {path}")
    return from_dict(cls, json.loads(path.read_text()), str(path))
