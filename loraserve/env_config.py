"""Config objects from flags and environment variables, parsed once; and their validation helper.

Each service keeps one frozen dataclass (`EngineConfig`, `ManagerConfig`). Every field becomes a
flag (`--max-loras`) and an environment variable (`<PREFIX>MAX_LORAS`); a flag wins over the
variable, the variable over the dataclass default. Values are parsed by the field's annotation:
`bool` (1/true/yes/on), `float`, `int`, `str`, `tuple[str, ...]` (comma- or space-separated), each
optionally `| None`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping


def require(ok: bool, name: str, value, rule: str) -> None:
    """Raise ValueError "name (value) rule" unless `ok`: how every config names a bad field."""
    if not ok:
        raise ValueError(f"{name} ({value!r}) {rule}")


def field_parser(field: dataclasses.Field) -> Callable[[str], object]:
    """How a flag or variable's text becomes the field's value (from its annotation)."""
    t = str(field.type)
    if "tuple" in t:
        return lambda s: tuple(x for x in s.replace(",", " ").split() if x)
    if "bool" in t:
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if "float" in t:
        return float
    if "int" in t:
        return int
    return str


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    env_prefix: str,
    title: str,
    repeated: Mapping[str, str] | None = None,
) -> None:
    """One flag per field of dataclass `cls`; `repeated` maps fields to a flag given once per value."""
    group = parser.add_argument_group(f"{title} (flag, or env {env_prefix}<NAME>)")
    for f in dataclasses.fields(cls):
        env = env_prefix + f.name.upper()
        default = None if f.default is dataclasses.MISSING else f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        help_ = f"(env {env}; default {default!r})"
        if repeated and f.name in repeated:
            group.add_argument(repeated[f.name], dest=f.name, action="append", metavar="DIR", help=help_)
            continue
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=field_parser(f),
            default=None,
            metavar=f.name.upper(),
            help=help_,
        )


def config_from(
    cls: type, args: argparse.Namespace, env_prefix: str, environ: Mapping[str, str] = os.environ
):
    """`cls(...)`: flag > environment variable > default; raises ValueError naming a bad field."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if isinstance(value, list):  # a repeated flag
            value = tuple(value)
        env = environ.get(env_prefix + f.name.upper())
        if value is None and env is not None:
            value = field_parser(f)(env)
        if value is not None:
            values[f.name] = value
    return cls(**values)
