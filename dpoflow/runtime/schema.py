"""Typed, validated parameter sections: a frozen dataclass per section, its fields' types (Literal = a choice list)
and numeric ranges (`_spec`), built from a parsed YAML mapping with one `ParamsError` naming the key, the value and
what is allowed (dpoflow.runtime.params declares the sections)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import click
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError


class ParamsError(click.ClickException, ValueError):
    """A params.yaml value is missing or not allowed. A click error: a stage script prints `Error: <message>` and
    exits 1 before doing any work (no traceback)."""


def _spec(
    default: Any = dataclasses.MISSING, *, low=None, high=None, low_open=False, default_factory=dataclasses.MISSING
) -> Any:
    """A dataclass field carrying its numeric range (choices come from the field's Literal type)."""
    meta = {"low": low, "high": high, "low_open": low_open}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _choices(typ: Any) -> tuple[str, ...]:
    """The values a Literal type (possibly nested: Literal["auto", Chip]) allows."""
    if get_origin(typ) is not Literal:
        return ()
    return tuple(v for arg in get_args(typ) for v in (_choices(arg) or (arg,)))


def _check_value(key: str, value: Any, typ: Any, meta: dict) -> Any:
    choices = _choices(typ)
    if choices:
        if value not in choices:
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; allowed values: {', '.join(choices)}")
        return value
    optional = get_origin(typ) is not None and type(None) in get_args(typ)
    if value is None:
        if optional:
            return None
        raise ParamsError(f"params.yaml: {key}: null is not allowed")
    base = next((a for a in getattr(typ, "__args__", ()) if a is not type(None)), typ) if optional else typ
    if isinstance(value, dict) and dict in get_args(typ):  # a mapping name -> value (e.g. a limit per task)
        return {str(k): _check_value(f"{key}.{k}", v, base, meta) for k, v in value.items()}
    if base is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; use true or false")
    elif base in (int, float):
        expected = "an integer" if base is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected {expected}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected a finite number")
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected {expected}")
        try:
            value = base(value)
        except OverflowError:  # an integer literal too large for a float
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected a finite number") from None
    elif base is str and not isinstance(value, str):
        raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected a string")
    elif base is list and not isinstance(value, list):
        raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected a list")
    elif base is dict and not isinstance(value, dict):
        raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected a mapping")
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (value < low or (meta.get("low_open") and value == low))
    if too_low or (high is not None and value > high):
        bounds = [] if low is None else [f"> {low}" if meta.get("low_open") else f">= {low}"]
        bounds += [] if high is None else [f"<= {high}"]
        raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; must be {' and '.join(bounds)}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(
            f"params.yaml: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {type(raw).__name__}"
        )
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ParamsError(f"params.yaml: {prefix}{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        key, typ = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, raw[f.name], key + ".")
        else:
            kwargs[f.name] = _check_value(key, raw[f.name], typ, dict(f.metadata))
    return cls(**kwargs)


def read_params_file(path: str | Path) -> dict:
    """The params file as DVC reads it (YAML 1.2, ruamel: `1e-4` is a number, as DVC compares it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root or pass --params") from None
    try:
        raw = YAML(typ="safe", pure=True).load(text)
    except YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    return raw if raw is not None else {}
