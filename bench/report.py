"""What a scenario returns and how a run is written down: report.md, results.json, plots.

A results directory holds `report.md` (machine, exact command, one section per scenario with its
tables and goals), `results.json` (the same plus every raw figure), the PNG plots, the traces that
were replayed, and the services' logs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.procs import REPO


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list]


@dataclass
class Goal:
    """A target from the issue, and the figure this run measured for it."""

    text: str
    value: float
    target: float
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


@dataclass
class ScenarioResult:
    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # file names in the results directory
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # raw figures, JSON-serializable
    seconds: float = 0.0
    load_average: tuple[float, ...] = ()  # the machine's 1/5/15-minute load when the scenario ended


def machine() -> dict:
    """The hardware and software the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError):
        mem_gib = math.nan
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "git": _git_revision(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return f"{rev}{' (uncommitted changes)' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fmt(value) -> str:
    """A table cell: floats to 3 significant figures, NaN as '-'."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value == 0 or abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(table: Table) -> str:
    lines = [
        "| " + " | ".join(table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
    ]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)


def goals_table(goals: list[Goal]) -> str:
    rows = [
        [g.text, fmt(g.value), ("≥ " if g.higher_is_better else "≤ ") + fmt(g.target), g.met] for g in goals
    ]
    return markdown_table(Table("goals", ["goal", "measured", "target", "met"], rows))


def render(command: str, info: dict, results: list[ScenarioResult], smoke: bool) -> str:
    """The whole report.md."""
    out = [
        "# loraserve benchmark results"
        + (" (smoke configuration: sizes too small to mean anything)" if smoke else ""),
        "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB"
        + (f", GPU {info['gpu']}" if info["gpu"] else ", no GPU"),
        f"- software: torch {info['torch']} ({info['torch_threads']} threads), Python {info['python']}, "
        f"{info['os']}",
        f"- code: git {info['git']}",
        f"- load average at start: {', '.join(f'{x:.2f}' for x in info['load_average'] or ())}",
        "",
        "Ratios compare systems measured side by side in one run (interleaved, best of N); absolute "
        "figures depend on the machine and on whatever else ran on it.",
    ]
    for r in results:
        load = (
            f", load average after: {', '.join(f'{x:.2f}' for x in r.load_average)}" if r.load_average else ""
        )
        out += ["", f"## {r.title}", "", f"`{r.name}`, {r.seconds:.0f} s{load}."]
        for note in r.notes:
            out += ["", note]
        for table in r.tables:
            out += ["", f"**{table.title}**", "", markdown_table(table)]
        if r.goals:
            out += ["", "**Goals**", "", goals_table(r.goals)]
        for plot in r.plots:
            out += ["", f"![{plot}]({plot})"]
    return "\n".join(out) + "\n"


def write(out_dir: Path, command: str, info: dict, results: list[ScenarioResult], smoke: bool) -> Path:
    """Write report.md and results.json into `out_dir`; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "report.md"
    report.write_text(render(command, info, results, smoke))
    payload = {
        "command": command,
        "smoke": smoke,
        "machine": info,
        "scenarios": {
            r.name: {
                **{k: v for k, v in asdict(r).items() if k != "goals"},
                "goals": [{**asdict(g), "met": g.met} for g in r.goals],
            }
            for r in results
        },
    }
    (out_dir / "results.json").write_text(json.dumps(_plain(payload), indent=2, allow_nan=False) + "\n")
    return report


def _plain(value):
    """`value` as strict JSON data: NaN/inf -> None, numpy/torch scalars -> numbers, paths -> str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
