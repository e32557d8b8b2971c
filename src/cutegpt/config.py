"""Dataclass configs that are also the command line and YAML files.

A command's settings are one dataclass. Each field becomes a flag
(`max_new_tokens` -> `--max-new-tokens`, booleans get `--x/--no-x`) and a YAML
key; `--config run.yaml` loads keys first, flags given on the command line win.

A field is declared once, with everything the CLI needs to know about it:

    lr: float | None = arg(None, "peak learning rate", gt=0, aliases=("--learning_rate",),
                           absent="3e-4 for LoRA, 5e-5 for full")

- `ge/gt/le/lt` bound numbers; they are checked for flags and YAML alike, before
  any model loads, and the error names the flag.
- `aliases` are extra spellings accepted but not shown (old names, the
  transformers/LLaMA-Factory names users type out of habit). The underscore
  spelling of every flag (`--max_new_tokens`) is always accepted.
- `absent` says in `--help` what happens when an optional flag is not given.
- `positional=True` makes the field a positional argument.

A config class may also define `check(self)` for rules that involve several
fields (raise `CuteGPTError`), and `dropped_flags`, inherited fields the command
does not honour: they are neither shown nor accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from cutegpt.errors import CuteGPTError

C = TypeVar("C")
_BOUNDS = {"ge": (lambda v, b: v >= b, "at least"), "gt": (lambda v, b: v > b, "greater than"),
           "le": (lambda v, b: v <= b, "at most"), "lt": (lambda v, b: v < b, "less than")}


def arg(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False, *,
        ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
        aliases: tuple[str, ...] = (), absent: str | None = None, repeatable: bool = False, **kw: Any) -> Any:
    """A dataclass field with its help text, bounds and extra spellings (used by every config).

    repeatable: a list flag that may also be given several times (`--model A --model B` = `--model A B`)."""
    meta = {"help": help, "positional": positional, "aliases": tuple(aliases), "absent": absent, "repeatable": repeatable,
            "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def flag_name(name: str, positional: bool = False) -> str:
    return name.upper() if positional else "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any, label: str):
    """A function turning one string (or YAML scalar) into a value of type `tp`; `label` names the flag."""
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)

        def literal(value: Any) -> Any:
            for choice in choices:
                if str(value) == str(choice):
                    return choice
            raise CuteGPTError(f"{label} must be one of {', '.join(map(str, choices))}, not {value!r}.")

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
            raise CuteGPTError(f"{label} must be true or false, not {value!r}.")

        return boolean
    if tp in (int, float, str):
        kind = {int: "an integer", float: "a number", str: "text"}[tp]

        def scalar(value: Any) -> Any:
            if value is None and optional:
                return None
            if tp is not str and (isinstance(value, bool) or value is None):
                raise CuteGPTError(f"{label} must be {kind}, not {value!r}.")
            if tp is int and isinstance(value, float):  # YAML 64.7 must not silently become 64
                if not value.is_integer():
                    raise CuteGPTError(f"{label} must be an integer, not {value!r}.")
                return int(value)
            if tp is str and isinstance(value, (dict, list)):
                raise CuteGPTError(f"{label} must be text, not {value!r}.")
            try:
                out = tp(value)
            except (TypeError, ValueError, OverflowError):
                raise CuteGPTError(f"{label} must be {kind}, not {str(value)[:80]!r}.") from None
            if tp is float and not math.isfinite(out):
                raise CuteGPTError(f"{label} must be a finite number, not {value!r}.")
            return out

        return scalar
    raise TypeError(f"unsupported config type {tp!r} for {label}")


def _is_list(tp: Any) -> tuple[bool, Any]:
    tp, _ = _unwrap_optional(tp)
    if typing.get_origin(tp) is list:
        return True, typing.get_args(tp)[0]
    return False, None


def visible_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are flags of its command (all but `dropped_flags`)."""
    dropped = set(getattr(cls, "dropped_flags", ()))
    return [f for f in dataclasses.fields(cls) if f.name not in dropped]


def _default_text(f: dataclasses.Field, default: Any, is_bool: bool) -> str:
    absent = f.metadata.get("absent")
    if absent:
        return f" (default: {absent})"
    if default is None or default == "" or default == []:
        return ""
    if is_bool:
        return " (default: on)" if default else ""
    if isinstance(default, list):
        return f" (default: {' '.join(map(str, default))})"
    return f" (default: {default})"


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in visible_fields(cls):
        tp = hints[f.name]
        helptext = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        if f.metadata.get("positional"):
            is_list, item = _is_list(tp)
            parser.add_argument(
                f.name,
                type=_converter(item if is_list else tp, f.name.upper()),
                nargs="*" if is_list else ("?" if f.default is not dataclasses.MISSING else None),
                # argparse runs `type` on a string default, so pass the real one, never SUPPRESS
                default=default if f.default is not dataclasses.MISSING else argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=helptext + _default_text(f, default, False).replace("%", "%%"),
            )
            continue
        flag = flag_name(f.name)
        hidden = [a for a in ("--" + f.name, *f.metadata.get("aliases", ())) if a != flag]
        base, _ = _unwrap_optional(tp)
        is_list, item = _is_list(tp)
        shown = helptext + _default_text(f, default, base is bool).replace("%", "%%")
        if base is bool:
            if f.name.startswith("no_"):  # `--no-cache-reuse`: one switch, never `--no-no-cache-reuse`
                parser.add_argument(flag, action="store_true", dest=f.name, default=argparse.SUPPRESS, help=shown)
                for alias in hidden:
                    parser.add_argument(alias, action="store_true", dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                continue
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag, action="store_true", dest=f.name, default=argparse.SUPPRESS, help=shown)
            group.add_argument("--no-" + flag[2:], action="store_false", dest=f.name, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
            for alias in hidden:
                parser.add_argument(alias, action="store_true", dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            _mark_negatable(parser, flag)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        choices = typing.get_args(base) if typing.get_origin(base) is Literal else None
        if is_list:
            kwargs.update(type=_converter(item, flag), nargs="+")
            if f.metadata.get("repeatable"):
                kwargs["action"] = "extend"
        else:
            kwargs.update(type=_converter(tp, flag))
            if choices:
                kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        parser.add_argument(flag, help=shown, **kwargs)
        for alias in hidden:
            parser.add_argument(alias, help=argparse.SUPPRESS, **kwargs)


def _mark_negatable(parser: argparse.ArgumentParser, flag: str) -> None:
    # show `--x, --no-x` as one entry: rename the visible action's option list for help only
    for action in parser._actions:
        if flag in action.option_strings and action.help is not argparse.SUPPRESS:
            action.option_strings = [flag + ", --no-" + flag[2:]]
            return


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"  # 67108864, not 6.71089e+07


def check_values(cls: type, values: dict[str, Any], source: str | None = None) -> None:
    """Apply each field's declared bounds; the message names the flag (or the YAML key)."""
    for f in dataclasses.fields(cls):
        bounds = f.metadata.get("bounds") or {}
        if f.name not in values or not bounds:
            continue
        items = values[f.name] if isinstance(values[f.name], list) else [values[f.name]]
        label = f"{source}: {f.name}" if source else flag_name(f.name, f.metadata.get("positional", False))
        for value in items:
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            for key, bound in bounds.items():
                ok, words = _BOUNDS[key]
                if not ok(value, bound):
                    raise CuteGPTError(f"{label} must be {words} {_number(bound)}, not {_number(value)}.")


def load_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML config file and check its keys against `cls`'s fields."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CuteGPTError(f"{path}: config file does not exist (--config).") from None
    except IsADirectoryError:
        raise CuteGPTError(f"{path}: --config must be a YAML file, not a folder.") from None
    except PermissionError:
        raise CuteGPTError(f"{path}: cannot read this config file (permission denied).") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CuteGPTError(f"{path}: not a valid YAML file ({first}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CuteGPTError(f"{path}: a config file must be a mapping of setting: value.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in visible_fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise CuteGPTError(f"{path}: unknown setting '{key}'; known settings: {', '.join(sorted(fields))}.")
        label = f"{path}: {key}"
        is_list, item = _is_list(hints[name])
        _, optional = _unwrap_optional(hints[name])
        if value is None:
            if not optional:
                raise CuteGPTError(f"{label} must have a value (null is not allowed for this setting).")
            out[name] = None
        elif is_list:
            values = value if isinstance(value, list) else [value]
            conv = _converter(item, label)
            out[name] = [conv(v) for v in values]
        else:
            out[name] = _converter(hints[name], label)(value)
    check_values(cls, out, source=str(path))
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one CuteGPTError sentence (exit 1), not exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise CuteGPTError(f"{message} (see `{self.prog} --help`).")


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE.yaml", help="read settings from a YAML file (flags win)")
    add_dataclass_arguments(parser, cls)
    return parser


def parse_config(cls: type[C], argv: list[str], prog: str, description: str = "") -> C:
    """Parse `argv` into an instance of the dataclass `cls` (flags override `--config` YAML), then check it."""
    parser = build_parser(cls, prog, description)
    ns = vars(parser.parse_args(argv))
    config_file = ns.pop("config", None)
    values = load_yaml(config_file, cls) if config_file else {}
    check_values(cls, ns)
    values.update(ns)
    missing = [flag_name(f.name, f.metadata.get("positional", False)) for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CuteGPTError(f"missing required argument(s): {', '.join(missing)} (see `{prog} --help`).")
    cfg = cls(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: Any) -> None:
    """Bounds of every field, then the config's own cross-field `check()` (also for configs built in Python)."""
    check_values(type(cfg), {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    check = getattr(cfg, "check", None)
    if callable(check):
        check()
