"""One config module per preset, each a `get_config()` that returns every stage's settings as one frozen tree.

    from experiments import configs
    config = configs.get("tiny")                       # vae, sft, mine, dpo, eval: each stage's frozen dataclass
    config = configs.override(config, ["sft.optim.lr=3e-4", "mine.inputs=128"])

Stages read their own slice (`config.sft`, ...) and keep no preset table of their own. On a stage's command line the
overrides name fields of that stage's slice (`python -m experiments.sft optim.lr=3e-4`); the main job takes them
with the stage in front (`python -m experiments.dpo sft.optim.lr=3e-4`). An unknown preset, an unknown field or a
value of the wrong type is an error that lists what is valid, raised before any work.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

# preset name -> its module in this package
PRESETS = {"tiny": "tiny", "flux2-dev": "flux2_dev", "klein-4b": "klein_4b", "klein-9b": "klein_9b"}
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def get(name: str):
    """The preset's whole config (`experiments.configs.schema.Config`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    return importlib.import_module(f"{__name__}.{PRESETS[name]}").get_config()


def is_override(item: str, config) -> bool:
    """Whether a command-line word is a `field.path=value` override of `config` (its first name is a field), so
    overrides may stand anywhere, even after a flag that takes several values (`--hr A B lr=1`)."""
    return bool(_OVERRIDE.match(item)) and item.split(".", 1)[0].split("=", 1)[0] in _field_names(config)


def split_overrides(argv: Sequence[str], config) -> tuple[list[str], list[str]]:
    """`(other words, overrides)` of a command line, the overrides recognised by `is_override`."""
    rest, overrides = [], []
    for item in argv:
        (overrides if is_override(item, config) else rest).append(item)
    return rest, overrides


def override(config, items: Sequence[str]):
    """Apply `a.b.c=value` strings to a tree of frozen dataclasses, checking each value against its field's type.

    Values are Python literals (`3e-4`, `(1, 2)`, `true`, `none`); a string field takes the text as written and a
    tuple field also takes a bare comma list (`(psnr, ssim)`). The replaced dataclasses validate themselves as usual.
    """
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        dotted, raw = item.split("=", 1)
        config = _replace(config, dotted.split("."), raw, dotted)
    return config


def _field_names(node) -> list[str]:
    return [f.name for f in dataclasses.fields(node) if f.init] if dataclasses.is_dataclass(node) else []


def _replace(node, path: list[str], raw: str, dotted: str):
    names = _field_names(node)
    if path[0] not in names:
        raise ValueError(f"unknown config field {dotted!r}: {type(node).__name__} has {names}")
    current = getattr(node, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{dotted!r}: {path[0]} is a value, not a section")
        return dataclasses.replace(node, **{path[0]: _replace(current, path[1:], raw, dotted)})
    if dataclasses.is_dataclass(current):
        raise ValueError(f"{dotted!r} is a section ({type(current).__name__}); set one of its fields: "
                         f"{_field_names(current)}")
    hints = typing.get_type_hints(type(node))
    value = _coerce(raw, hints.get(path[0], Any), current, dotted)
    return dataclasses.replace(node, **{path[0]: value})


def _literal(text: str):
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(raw: str, annotation, current, dotted: str):
    """`raw` as a value of `annotation` (the field's type), or a ValueError saying what the field takes."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.strip().lower() in ("none", "null"):
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(raw, option, current, dotted)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{dotted}={raw!r}: expected one of {options}")
    if annotation is str:
        return raw
    if annotation is bool:
        value = _literal(raw)
        if not isinstance(value, bool):
            raise ValueError(f"{dotted}={raw!r}: expected true or false")
        return value
    if annotation is int:
        value = _literal(raw)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{dotted}={raw!r}: expected an integer")
        return value
    if annotation is float:
        value = _literal(raw)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{dotted}={raw!r}: expected a number")
        return float(value)
    if origin is tuple:
        value = _literal(raw)
        if isinstance(value, str):  # a bare comma list: `(psnr, ssim)`
            value = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = (value,)
        element_types = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        if args and not (len(args) == 2 and args[1] is Ellipsis) and len(value) != len(args):
            raise ValueError(f"{dotted}={raw!r}: expected {len(args)} values")
        types_ = [element_types[0]] * len(value) if len(element_types) == 1 else list(element_types)
        return tuple(_coerce(v if isinstance(v, str) else repr(v), t, None, dotted) if t is not Any else v
                     for v, t in zip(value, types_))
    return _literal(raw)  # a field typed Any or with a type the table above does not know
