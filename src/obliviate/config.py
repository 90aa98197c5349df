"""Typed dataclass configs built from ``key=value`` strings (CLI ``--set``) or dicts (ledger).

Every config class is a dataclass whose fields carry ``metadata={"help": ...}`` and which
validates values in ``__post_init__``; this module only coerces strings to the declared types
and reports unknown keys with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from typing import Any


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["lr=1e-4", "steps=50"]`` -> ``{"lr": "1e-4", "steps": "50"}``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"Expected key=value, got {item!r} (for example --set steps=100).")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"uce:incremental=false,lam=1"`` -> ``("uce", {"incremental": "false", "lam": "1"})``: a
    method or regularizer with options, as the CLI and bench write it (keys as in ``--set``)."""
    name, _, options = spec.partition(":")
    try:
        return name.strip(), parse_assignments([o for o in options.split(",") if o.strip()])
    except ValueError:
        raise ValueError(f"Expected NAME:key=value,key=value (e.g. l2sp:weight=300), got {spec!r}.") from None


def _coerce(value: Any, annotation, name: str):
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if annotation is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, str):
            return annotation(value)
        if origin is tuple:
            parts = [p for p in re.split(r"[,/]", value) if p.strip()]  # "/" inside NAME:key=a/b specs
            kind = args[0] if args else str
            return tuple(kind(p.strip()) for p in parts)
        if origin is typing.Literal:
            if value not in args:
                raise ValueError(value)
            return value
        return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"Option {name}={value!r} is not a valid {getattr(annotation, '__name__', annotation)}.") from None


def build_config(cls, values: dict[str, Any] | None = None, owner: str = ""):
    """Instantiate dataclass ``cls`` from strings or plain values, with clear errors."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        near = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"Unknown option {unknown[0]!r} for {owner or cls.__name__}.{hint} "
                         f"Valid options: {describe_options(cls)}")
    kwargs = {k: _coerce(v, hints[k], k) for k, v in values.items()}
    return cls(**kwargs)


def describe_options(cls) -> str:
    parts = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        help_text = f.metadata.get("help", "")
        parts.append(f"{f.name} (default {default!r}{': ' + help_text if help_text else ''})")
    return "; ".join(parts) if parts else "none"


def config_to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))
