"""Dataclass configs that are also the command line and YAML files.

A command's settings are one dataclass. Each field becomes a flag
(`max_new_tokens` -> `--max-new-tokens`, booleans get `--x/--no-x`) and a YAML
key; `--config run.yaml` loads keys first, flags given on the command line win.
Help text comes from `field(metadata={"help": ...})`; a field with
`metadata={"positional": True}` is a positional argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from cutegpt.errors import CuteGPTError

C = TypeVar("C")


def arg(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False, **kw: Any) -> Any:
    """A dataclass field with help text (shorthand used by every config)."""
    meta = {"help": help, "positional": positional}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any, name: str):
    """A function turning one string (or YAML scalar) into a value of type `tp`."""
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)

        def literal(value: Any) -> Any:
            for choice in choices:
                if str(value) == str(choice):
                    return choice
            raise CuteGPTError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, not {value!r}.")

        return literal
    if tp is bool:

        def boolean(value: Any) -> bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise CuteGPTError(f"--{name.replace('_', '-')} must be true or false, not {value!r}.")

        return boolean
    if tp in (int, float, str):

        def scalar(value: Any) -> Any:
            if value is None and optional:
                return None
            try:
                return tp(value)
            except (TypeError, ValueError):
                raise CuteGPTError(
                    f"--{name.replace('_', '-')} must be {'an integer' if tp is int else 'a number' if tp is float else 'text'}, not {value!r}."
                ) from None

        return scalar
    raise TypeError(f"unsupported config type {tp!r} for field {name}")


def _is_list(tp: Any) -> tuple[bool, Any]:
    tp, _ = _unwrap_optional(tp)
    if typing.get_origin(tp) is list:
        return True, typing.get_args(tp)[0]
    return False, None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        helptext = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        if f.metadata.get("positional"):
            is_list, item = _is_list(tp)
            parser.add_argument(
                f.name,
                type=_converter(item if is_list else tp, f.name),
                nargs="*" if is_list else ("?" if f.default is not dataclasses.MISSING else None),
                default=argparse.SUPPRESS,
                help=helptext,
            )
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [flag] if "_" not in f.name else [flag, "--" + f.name]
        base, _ = _unwrap_optional(tp)
        is_list, item = _is_list(tp)
        if base is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{helptext} (default: {default})")
        elif is_list:
            parser.add_argument(*names, type=_converter(item, f.name), nargs="+", default=argparse.SUPPRESS,
                                help=f"{helptext} (default: {default})")
        else:
            choices = typing.get_args(base) if typing.get_origin(base) is Literal else None
            parser.add_argument(*names, type=_converter(tp, f.name), default=argparse.SUPPRESS,
                                metavar="{" + ",".join(map(str, choices)) + "}" if choices else None,
                                help=f"{helptext} (default: {default})")


def load_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML config file and check its keys against `cls`'s fields."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CuteGPTError(f"{path}: config file does not exist.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CuteGPTError(f"{path}: not a valid YAML file ({str(e).splitlines()[0]}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CuteGPTError(f"{path}: a config file must be a mapping of setting: value.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise CuteGPTError(f"{path}: unknown setting '{key}'; known settings: {', '.join(sorted(known))}.")
        is_list, item = _is_list(hints[name])
        if is_list:
            if value is None:
                out[name] = None
                continue
            values = value if isinstance(value, list) else [value]
            conv = _converter(item, name)
            out[name] = [conv(v) for v in values]
        elif value is None:
            out[name] = None
        else:
            out[name] = _converter(hints[name], name)(value)
    return out


def parse_config(cls: type[C], argv: list[str], prog: str, description: str = "") -> C:
    """Parse `argv` into an instance of the dataclass `cls` (flags override `--config` YAML)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE.yaml", help="read settings from a YAML file (flags win)")
    add_dataclass_arguments(parser, cls)
    ns = vars(parser.parse_args(argv))
    config_file = ns.pop("config", None)
    values = load_yaml(config_file, cls) if config_file else {}
    values.update(ns)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        parser.error(f"missing required argument(s): {', '.join(missing)}")
    return cls(**values)
