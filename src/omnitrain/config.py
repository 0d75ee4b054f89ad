"""Typed configs: turn a plain mapping (a composed Hydra config) into a component's dataclass.

Every component keeps one config dataclass beside its code. The CLI composes the YAML from
``recipes/`` with Hydra, turns it into plain Python containers, and calls :func:`from_dict`
here, which validates *everything* before any work starts:

* unknown keys (with a "did you mean" from the dataclass's fields),
* wrong types (``int`` / ``float`` / ``bool`` / ``str`` / ``Path`` / lists / dicts / nested
  dataclasses / ``Optional``),
* values outside a ``Literal[...]`` set (the message lists the valid choices).

Errors are :class:`ConfigError` (a ``ValueError``) whose message names the dotted key, the
value given and what would have been accepted. Library code never imports Hydra or OmegaConf.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-controlled setting is wrong; the message says which and how to fix it."""


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _typename(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_typename(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list[{_typename(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _quote_hint(key: str, value: Any) -> str:
    """For a number or boolean where text was wanted: how to pass it as text on the command line,
    where Hydra reads ``text=123`` as the integer 123."""
    if isinstance(value, (bool, int, float)):
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        return f"; to pass {shown} as text, quote it: '{key}=\"{shown}\"' (the single quotes are for the shell)"
    return ""


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (e.g. str -> Path)."""
    origin = get_origin(tp)
    if value == "???":  # OmegaConf's "must be given" marker left in a recipe
        raise ConfigError(f"{key} must be set: the recipe leaves it as ???; add {key}=... to the command line")
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            valid = ", ".join(repr(c) for c in choices)
            hint = suggest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{key}={value!r} is not a valid choice; valid choices: {valid}.{hint}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must be set (expected {_typename(tp)}), got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {_typename(tp)}")
    if value is None:
        raise ConfigError(f"{key} must be set (expected {_typename(tp)}), got null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected {_typename(tp)}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a mapping")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, f"{key}.<key>"): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} has the wrong type: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} has the wrong type: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} has the wrong type: expected a string{_quote_hint(key, value)}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected a path{_quote_hint(key, value)}")
    raise TypeError(f"config annotation {tp!r} of {key} is not supported")  # a bug in our dataclass


def from_dict(cls: type[T], data: typing.Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, validating keys, types and choices.

    Missing keys take the dataclass defaults; a field without a default must be given.

    Raises:
        ConfigError: naming the first offending key, its value and the accepted values.
    """
    data = dict(data or {})
    where = f"{prefix}." if prefix else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        valid = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key '{where}{k}'.{suggest(k, fields)} Valid keys here: {valid}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], where + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing config key '{where}{name}' (expected {_typename(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # __post_init__ checks of cross-field constraints
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (Paths become strings)."""

    def clean(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(dataclasses.asdict(cfg))
