"""Models and adapters the scenarios run on, generated deterministically (inference_svc.demo_model).

Shapes are Llama-style with 4 layers; `hidden` 512 and 2048 are the two of the LoRA-overhead
report (issue 2), `tiny` is for smoke runs. Files are written once per work directory and reused
by every scenario of a run.
"""

from __future__ import annotations

from pathlib import Path

from bench.workload import WorkloadSpec
from inference_svc.demo_model import DEMO_SHAPE, TINY_SHAPE, write_demo_adapter, write_demo_model
from loraserve.model_summary import ModelConfig

SHAPES = {
    "tiny": TINY_SHAPE,
    "256": DEMO_SHAPE,
    "512": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
    "2048": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


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
    """The trace spec of a scenario's Params `p` (its rate, cv, num_requests, input_len, output_len
    and seed, prompts over the vocabulary of `p.shape`) over `num_adapters` with popularity `alpha`."""
    return WorkloadSpec(
        num_adapters=num_adapters,
        alpha=alpha,
        rate=p.rate,
        cv=p.cv,
        num_requests=p.num_requests,
        input_len=p.input_len,
        output_len=p.output_len,
        vocab_size=SHAPES[p.shape]["vocab_size"],
        seed=p.seed,
    )
