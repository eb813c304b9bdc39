"""`python -m entrypoints.docs [--check]`: regenerate the README's reference tables from the code.

Each table sits between `<!-- BEGIN GENERATED: NAME -->` and `<!-- END GENERATED: NAME -->` in
README.md and is rebuilt from its source of truth:

  engine-config     EngineConfig fields, their comments and defaults (inference_svc/config.py)
  inference-flags   the other flags of `python -m inference_svc serve` (inference_svc/cli.py)
  manager-config    ManagerConfig fields, their comments and defaults (adapter_svc/config.py)
  inference-metrics metric specs of an inference replica (inference_svc/metrics.py)
  manager-metrics   metric specs of the adapter manager (adapter_svc/metrics.py)
  door-config       FrontDoorConfig fields: the Envoy configuration's settings (loraserve/front_door.py)
  picker-config     PickerConfig fields (endpoint_picker/config.py)
  picker-metrics    metric specs of the endpoint picker (endpoint_picker/metrics.py)

`--check` changes nothing and exits 1, naming the stale tables, when README.md differs (tests run it).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK_RE = re.compile(r"(<!-- BEGIN GENERATED: ([\w-]+) -->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.S)


def field_comments(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (comment above it, the default's source text)} from a dataclass's source."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    (tree,) = ast.parse(source).body
    out = {}
    for node in tree.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        comment, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            comment.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        default = ast.get_source_segment(source, node.value) if node.value is not None else ""
        out[node.target.id] = (" ".join(comment), default or "")
    return out


def render_default(field: dataclasses.Field, source: str) -> str:
    value = field.default
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, tuple):
        return ", ".join(value) if value else "none"
    if "*" in source and re.fullmatch(r"[\d.*\s]+", source):  # keep `256 * 1024**2` readable
        return f"`{source}`"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def config_table(cls: type, flag_for: Callable[[str], str], env_prefix: str) -> str:
    comments = field_comments(cls)
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        comment, source = comments[f.name]
        env = env_prefix + f.name.upper()
        rows.append(f"| `{flag_for(f.name)}` | `{env}` | {render_default(f, source)} | {_cell(comment)} |")
    return "\n".join(rows) + "\n"


def flags_table(parser: argparse.ArgumentParser, skip: set[str]) -> str:
    """| flag | meaning | for every option of `parser` whose dest is not in `skip`."""
    rows = ["| flag | meaning |", "|---|---|"]
    for action in parser._actions:  # argparse has no public accessor for its options
        if not action.option_strings or action.dest in skip or action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[-1] + (f" {action.metavar}" if action.metavar else "")
        rows.append(f"| `{flag}` | {_cell(' '.join((action.help or '').split()))} |")
    return "\n".join(rows) + "\n"


def metrics_table(specs) -> str:
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for s in specs:
        labels = ", ".join(f"`{label}`" for label in s.labels) or "-"
        rows.append(f"| `{s.name}` | {s.kind} | {labels} | {_cell(s.help)} |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def blocks() -> dict[str, str]:
    """Every generated block's text, by name."""
    from adapter_svc import cli as manager_cli
    from adapter_svc import metrics as manager_metrics
    from adapter_svc.config import ManagerConfig
    from endpoint_picker import cli as picker_cli
    from endpoint_picker import metrics as picker_metrics
    from endpoint_picker.config import PickerConfig
    from inference_svc import metrics as inference_metrics
    from inference_svc.cli import ENV_PREFIX, add_serve_parser
    from inference_svc.config import EngineConfig
    from loraserve import front_door

    subparsers = argparse.ArgumentParser().add_subparsers()
    add_serve_parser(subparsers)
    serve = subparsers.choices["serve"]

    def manager_flag(name: str) -> str:
        return manager_cli.REPEATED.get(name, "--" + name.replace("_", "-"))

    def picker_flag(name: str) -> str:
        return picker_cli.REPEATED.get(name, "--" + name.replace("_", "-"))

    def door_flag(name: str) -> str:
        return front_door.REPEATED.get(name, "--" + name.replace("_", "-"))

    return {
        "engine-config": config_table(EngineConfig, lambda n: "--" + n.replace("_", "-"), ENV_PREFIX),
        "inference-flags": flags_table(serve, {"help", *EngineConfig.__dataclass_fields__}),
        "manager-config": config_table(ManagerConfig, manager_flag, manager_cli.ENV_PREFIX),
        "inference-metrics": metrics_table(inference_metrics.SPECS),
        "manager-metrics": metrics_table(manager_metrics.SPECS),
        "door-config": config_table(front_door.FrontDoorConfig, door_flag, front_door.ENV_PREFIX),
        "picker-config": config_table(PickerConfig, picker_flag, picker_cli.ENV_PREFIX),
        "picker-metrics": metrics_table(picker_metrics.SPECS),
    }


def regenerate(text: str, generated: dict[str, str]) -> tuple[str, list[str]]:
    """(text with every known block replaced, names of blocks that changed)."""
    changed = []

    def replace(match: re.Match) -> str:
        name, old = match[2], match[3]
        if name not in generated:
            return match[0]
        if old != generated[name]:
            changed.append(name)
        return match[1] + generated[name] + match[4]

    return BLOCK_RE.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale; change nothing")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    generated = blocks()
    missing = sorted(set(generated) - set(m[2] for m in BLOCK_RE.finditer(text)))
    new_text, changed = regenerate(text, generated)
    if args.check:
        if changed or missing:
            stale = ", ".join(changed + [f"{name} (missing)" for name in missing])
            print(
                f"{args.readme}: stale generated tables: {stale}; run `python -m entrypoints.docs`",
                file=sys.stderr,
            )
            return 1
        return 0
    if missing:
        print(f"{args.readme}: no markers for {', '.join(missing)}", file=sys.stderr)
        return 1
    args.readme.write_text(new_text)
    print(f"{args.readme}: {'updated ' + ', '.join(changed) if changed else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
