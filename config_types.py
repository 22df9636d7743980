"""The generic layer under config.py: YAML read as a config is written (`1e-4` a float), bounded
reprs for messages, and values checked against their declared types.
"""
import math
import re
import reprlib
import typing
from typing import List, Literal

import yaml

from errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (PyYAML's YAML 1.1 rules read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text):
    return yaml.load(text, Loader=_Loader)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 4, 4


def short(value):
    """A bounded repr for messages: a YAML alias bomb must not be expanded to print it."""
    return _REPR.repr(value)


def check_type(value, annotation, key):
    """Return value converted to `annotation` (int -> float only), or raise ConfigError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:                          # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_type(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {short(value)}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {short(value)}")
        return [check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {short(value)}")
        return float(value)
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got "
                          f"{type(value).__name__} {short(value)}")
    return value
