"""Typed dataclass configs built from ``key=value`` strings (CLI ``--set``) or dicts (ledger).

Every config class is a dataclass whose fields carry ``metadata={"help": ...}`` and which
validates values in ``__post_init__``; this module coerces strings to the declared types, reports
unknown keys with the list of valid ones, and holds every number to the rules all configs share:

- finite (no NaN or infinity);
- inside its stated range: the field's ``metadata={"range": (low, high)}``, else the range of its
  name in ``NAMED_RANGES`` (learning rates, seeds);
- below the limits on size (``COUNT_LIMIT`` for integers, ``MAGNITUDE_LIMIT`` for other numbers),
  which catch typos such as ``steps=10^30`` that would run forever; ``limits=False`` (the CLI's
  ``--no-limits``) lifts them for a user who means it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from typing import Any


COUNT_LIMIT = 100_000
MAGNITUDE_LIMIT = 1e9
SEED_RANGE = (0, 2**32 - 1)  # what numpy and torch both accept
NAMED_RANGES = {"learning_rate": (0.0, 1.0), "inner_learning_rate": (0.0, 1.0), "seed": SEED_RANGE}


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
        if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"Option {name}={value!r} is not a valid int.")
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
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
        if origin is typing.Literal:
            raise ValueError(f"Option {name}={value!r} is not one of {', '.join(map(repr, args))}.") from None
        raise ValueError(f"Option {name}={value!r} is not a valid {getattr(annotation, '__name__', annotation)}.") from None


def build_config(cls, values: dict[str, Any] | None = None, owner: str = "", limits: bool = True):
    """Instantiate dataclass ``cls`` from strings or plain values, with clear errors. ``limits``
    holds numbers under the size limits (off for configs rebuilt from the ledger, which were
    checked when their request was added)."""
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
    for name, value in kwargs.items():
        check_number(name, value, fields[name].metadata.get("range", NAMED_RANGES.get(name)), limits)
    return cls(**kwargs)


def check_number(name: str, value: Any, allowed: tuple | None = None, limits: bool = True) -> None:
    """Raise ValueError unless every number in ``value`` (a number or a tuple of them) is finite,
    inside ``allowed`` (low, high) and, with ``limits``, under the size limits."""
    for number in value if isinstance(value, tuple) else (value,):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"Option {name}={number} is not a finite number.")
        if allowed is not None:
            if not allowed[0] <= number <= allowed[1]:
                raise ValueError(f"Option {name}={number} is outside its range [{allowed[0]}, {allowed[1]}].")
        elif limits and abs(number) > (COUNT_LIMIT if isinstance(number, int) else MAGNITUDE_LIMIT):
            limit = COUNT_LIMIT if isinstance(number, int) else f"{MAGNITUDE_LIMIT:g}"
            raise ValueError(f"Option {name}={number} is above the limit of {limit}, which guards against typos that "
                             "would run without end; pass --no-limits (limits=False) if you mean it.")


def describe_options(cls) -> str:
    parts = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        help_text = f.metadata.get("help", "")
        allowed = f.metadata.get("range", NAMED_RANGES.get(f.name))
        bounds = f", in [{allowed[0]}, {allowed[1]}]" if allowed else ""
        parts.append(f"{f.name} (default {default!r}{bounds}{': ' + help_text if help_text else ''})")
    return "; ".join(parts) if parts else "none"


def config_to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))
