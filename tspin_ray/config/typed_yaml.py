"""Typed YAML: build frozen dataclasses from parsed YAML, checking every key and type on the way.

    .venv/bin/pytest tests/e2e/test_bad_input.py -k config

`build(cls, raw, where, retired)` turns a mapping into `cls`, raising `UserError` with the dotted key path
for an unknown key (with the nearest valid one), a wrong type or a value the dataclass refuses. The
config's own dataclasses live in config/schema.py; this module knows nothing of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tspin_ray.errors import UserError


def check_type(value: Any, tp: Any, where: str, retired: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return check_type(value, a, where, retired)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0])
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, retired)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return tuple(check_type(v, typing.get_args(tp)[0], f"{where}[{i}]", retired) for i, v in enumerate(value))
    if tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {tp}")


def build(cls: type, raw: Any, where: str, retired: dict) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            retired = retired.get(where, {}).get(key)
            if retired:
                raise UserError(f"config key '{path}' was removed: it was never read ({retired})")
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{where + '.' if where else ''}{near[0]}'?)" if near else ""
            raise UserError(f"unknown config key '{path}'{hint}")
        kwargs[key] = check_type(value, hints[key], path, retired)
        choices = fields[key].metadata.get("choices")  # a registry's names, read when the config is
        if choices is not None and kwargs[key] not in choices():
            raise UserError(f"{path}: {kwargs[key]!r} is not one of {list(choices())}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise UserError(f"{where or 'config'}: {e}") from None


def apply_override(raw: dict, dotted: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to the raw config dict, in place."""
    if "=" not in dotted:
        raise UserError(f"override '{dotted}' must look like key.sub=value")
    key, value = dotted.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping, or a one-line UserError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    return raw


def entries(cls: type, prefix: str = "") -> list[tuple[str, bool, Any, str]]:
    """(dotted key, is a section, default, documentation) for every key of `cls`, sections first."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        sub = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or (
            [tp] if dataclasses.is_dataclass(tp) else [])
        key, doc = prefix + f.name, f.metadata.get("doc", "")
        if sub:
            out.append((key, True, None, doc))
            out.extend(entries(sub[0], key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f" (one of {', '.join(f.metadata['choices']())})" if "choices" in f.metadata else ""
            out.append((key, False, default, doc + choices))
    return out


def describe(cls: type) -> list[str]:
    """Every config key with its default and documentation, one line each (`tspin-ray config`)."""
    return [f"{key}: {doc}" if section else f"{key} = {default!r}  # {doc}"
            for key, section, default, doc in entries(cls)]


def reference(cls: type) -> str:
    """The same as a Markdown page: one table per top-level section (`tspin-ray config --markdown`)."""
    table = ["| key | default | meaning |", "|---|---|---|"]

    def row(key: str, section: bool, default: Any, doc: str) -> str:
        return f"| `{key}` | {'' if section else f'`{default!r}`'} | {doc.replace('|', chr(92) + '|')} |"

    lines, top = [], []
    for key, section, default, doc in entries(cls):
        if "." not in key and section:
            lines += ["", f"## `{key}`", "", doc, "", *table]
        elif "." not in key:
            top.append(row(key, section, default, doc))
        else:
            lines.append(row(key, section, default, doc))
    if top:
        lines += ["", "## Top-level keys", "", *table, *top]
    return "\n".join(lines).strip() + "\n"


def plain(value: Any) -> Any:
    """Tuples (how list keys are held, frozen) back to lists, so config.yaml stays plain YAML."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return [plain(v) for v in value] if isinstance(value, tuple | list) else value


def positive(obj: Any, *names: str) -> None:
    """A ValueError naming the first of `names` that is not > 0 on `obj` (a dataclass's __post_init__)."""
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name} must be > 0")
