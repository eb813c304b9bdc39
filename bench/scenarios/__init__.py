"""The scenarios of the suite, and what every scenario gets to run with.

A scenario is a module with `NAME`, `TITLE`, a frozen `Params` dataclass whose defaults are the
full-size run, `SMOKE` (a `Params` small enough for CI) and `run(ctx, params) -> ScenarioResult`.
`python -m bench run NAME --set field=value` overrides single parameters.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tqdm import tqdm

from bench.scenarios import (
    control_plane,
    front_door,
    http_vs_grpc,
    long_context,
    overhead,
    placement_scale,
    scale,
    step_build,
    swap,
    vs_peft,
)

SCENARIOS: dict[str, ModuleType] = {
    m.NAME: m
    for m in (
        overhead,
        vs_peft,
        scale,
        swap,
        control_plane,
        step_build,
        long_context,
        http_vs_grpc,
        front_door,
        placement_scale,
    )
}


@dataclass(frozen=True)
class Context:
    """Where a scenario writes and keeps its files."""

    out: Path  # the results directory: plots, traces, logs
    work: Path  # scratch space for models and adapters, shared by the scenarios of a run
    smoke: bool

    def progress(self, total: int, desc: str) -> tqdm:
        """A progress bar over a scenario's measurements (on stderr)."""
        return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True, leave=True)

    def log(self, name: str) -> Path:
        return self.out / "logs" / name


def params_for(module: ModuleType, smoke: bool, overrides: list[str]):
    """The scenario's Params (SMOKE or full size) with `field=value` overrides applied.

    Raises ValueError naming an unknown field or a value that does not parse.
    """
    params = module.SMOKE if smoke else module.Params()
    fields = {f.name: f for f in dataclasses.fields(params)}
    changes = {}
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: {module.NAME} parameters are {', '.join(fields)} (NAME=VALUE)")
        changes[name] = _parse(text, getattr(params, name), f"--set {item!r}")
    return dataclasses.replace(params, **changes)


def _parse(text: str, like, where: str):
    """`text` parsed to the type of `like`: tuples are comma-separated, of the first item's type."""
    try:
        if isinstance(like, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if isinstance(like, tuple):
            item = like[0] if like else ""
            return tuple(_parse(part, item, where) for part in text.split(",") if part)
        return type(like)(text)
    except ValueError:
        raise ValueError(f"{where}: cannot read {text!r} as {type(like).__name__}") from None
