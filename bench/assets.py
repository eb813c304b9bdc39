"""Models and adapters the scenarios run on, generated deterministically (inference_svc.demo_model).

Shapes are Llama-style with 4 layers; `hidden` 512 and 2048 are the two of the LoRA-overhead
report (issue 2), `tiny` is for smoke runs. Files are written once per work directory and reused
by every scenario of a run.
"""

from __future__ import annotations

from pathlib import Path

from bench.workload import WorkloadSpec
from inference_svc.demo_model import (
    DEMO_SHAPE,
    TINY_SHAPE,
    llama_shape,
    write_demo_adapter,
    write_demo_model,
)
from loraserve.model_summary import ModelConfig

SHAPES = {
    "tiny": TINY_SHAPE,
    "256": DEMO_SHAPE,
    "512": llama_shape(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=2, vocab=32000),
    "2048": llama_shape(hidden=2048, intermediate=5632, layers=4, heads=16, kv_heads=4, vocab=32000),
}
# The fields of a trace-replaying scenario's Params that are WorkloadSpec fields of the same name.
TRACE_FIELDS = ("rate", "cv", "num_requests", "input_len", "output_len", "seed")


def model(workdir: Path, shape: str, **overrides) -> Path:
    """The model directory for `shape` (with config.json fields overridden), written on first use."""
    overrides = {k: v for k, v in overrides.items() if SHAPES[shape].get(k) != v}
    name = "-".join([f"model-{shape}", *(f"{k}{v}" for k, v in sorted(overrides.items()))])
    out = workdir / name
    if not (out / "config.json").is_file():
        write_demo_model(out, **{**SHAPES[shape], **overrides})
    return out


def adapters(
    workdir: Path,
    model_dir: Path,
    count: int,
    rank: int,
    prefix: str = "lora-",
    target_modules: tuple[str, ...] | None = None,
) -> dict[str, Path]:
    """`{prefix}{i}` -> directory of a distinct random PEFT adapter (seed i), written on first use."""
    cfg = ModelConfig.from_dir(model_dir)
    kwargs = {} if target_modules is None else {"target_modules": target_modules}
    modules = "all" if target_modules is None else "+".join(target_modules)
    root = workdir / f"adapters-{model_dir.name}-r{rank}-{modules}"
    out = {}
    for i in range(count):
        path = root / f"{prefix}{i}"
        if not (path / "adapter_config.json").is_file():
            write_demo_adapter(path, cfg, rank=rank, alpha=2 * rank, seed=i, **kwargs)
        out[f"{prefix}{i}"] = path
    return out


def workload(p, num_adapters: int, alpha: float) -> WorkloadSpec:
    """The trace spec of a scenario's Params `p` (its TRACE_FIELDS, prompts over the vocabulary of
    `p.shape`) over `num_adapters` with popularity `alpha`."""
    trace = {name: getattr(p, name) for name in TRACE_FIELDS}
    return WorkloadSpec(
        num_adapters=num_adapters, alpha=alpha, vocab_size=SHAPES[p.shape]["vocab_size"], **trace
    )
