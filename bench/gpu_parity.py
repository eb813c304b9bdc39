"""Parity checks of `bench.gpu_check`: the engine in bfloat16 against transformers + PEFT.

One mixed batch (base rows and four adapters of different ranks, modules and scalings, prompts
from 1 to 300 tokens) is prefilled with `engine.score` and decoded greedily with
`engine.record_logits`. The reference is transformers + PEFT in float32 on the same device, run on
the engine's own tokens, so every decode step is compared on the same context. The tolerance is
twice transformers' own bfloat16 error against that float32 reference (at least BF16_FLOOR), and a
check also shows that adapters move the logits by more than the tolerance, so a lost adapter
cannot pass. `graphs_checks` runs the same greedy decode with CUDA graphs allowed
(enforce_eager=False) against without, on a larger batch whose rows finish at different steps.

Runs on any device (on CPU the engine ignores enforce_eager), which is how it is tested.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import assets
from inference_svc.config import EngineConfig
from inference_svc.demo_model import write_demo_adapter
from inference_svc.engine import LLMEngine
from inference_svc.sampling import SamplingParams
from loraserve.model_summary import ModelConfig

ADAPTERS = {
    "r16-all": dict(rank=16, alpha=32.0),
    "r8-attn": dict(rank=8, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    "r4-mlp-rslora": dict(
        rank=4, alpha=8.0, target_modules=("gate_proj", "up_proj", "down_proj"), use_rslora=True
    ),
    "r16-qv": dict(rank=16, alpha=16.0, target_modules=("q_proj", "v_proj")),
}
# Prompt lengths: within one KV block, across blocks, a one-token prompt, many blocks.
LENGTHS = (5, 17, 64, 1, 300, 33)
DECODE_STEPS = 8
GRAPH_ROWS = 40  # the graphs-on/off batch: it shrinks as rows finish, so several batch sizes run
BF16_FLOOR = 0.02

Row = tuple[list[int], str | None]  # (prompt ids, adapter or None for the base model)
Decoded = list[list[tuple[int, torch.Tensor]]]  # per row, per step: (token, logits [V] float32)


@dataclass
class Check:
    """One PASS/FAIL line of the GPU check, with its figures for gpu_check.json."""

    name: str
    passed: bool
    detail: str
    figures: dict = field(default_factory=dict)


def parity_rows(vocab: int, count: int) -> list[Row]:
    """`count` rows: prompt lengths cycle LENGTHS, adapters cycle base + every adapter."""
    gen = torch.Generator().manual_seed(0)
    names = [None, *ADAPTERS]
    rows = []
    for i in range(count):
        ids = torch.randint(1, vocab - 1, (LENGTHS[i % len(LENGTHS)],), generator=gen).tolist()
        rows.append((ids, names[i % len(names)]))
    return rows


def parity_assets(work: Path, shape: str) -> tuple[Path, dict[str, Path]]:
    """The model of `shape` (bench.assets.SHAPES) and the ADAPTERS for it, written on first use."""
    model_dir = assets.model(work, shape)
    cfg = ModelConfig.from_dir(model_dir)
    paths = {}
    for seed, (name, spec) in enumerate(ADAPTERS.items()):
        paths[name] = work / f"parity-{model_dir.name}" / name
        if not (paths[name] / "adapter_config.json").is_file():
            write_demo_adapter(paths[name], cfg, seed=100 + seed, **spec)
    return model_dir, paths


def bfloat16_engine(
    model_dir: Path,
    adapters: dict[str, Path],
    device: str,
    enforce_eager: bool,
    *,
    max_lora_rank: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    kv_tokens: int,
    max_loras: int | None = None,
) -> LLMEngine:
    """A bfloat16 engine (default backends: Triton on CUDA) with every adapter registered, a KV
    cache of `kv_tokens` tokens and `max_loras` slots (default: one per adapter)."""
    config = EngineConfig(
        max_loras=max_loras if max_loras is not None else len(adapters),
        max_lora_rank=max_lora_rank,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        device=device,
        dtype="bfloat16",
        kv_cache_bytes=kv_tokens * ModelConfig.from_dir(model_dir).kv_bytes_per_token(2),
        enforce_eager=enforce_eager,
    )
    engine = LLMEngine(model_dir, config)
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    return engine


def parity_engine(model_dir: Path, adapters: dict[str, Path], device: str, enforce_eager: bool) -> LLMEngine:
    """A bfloat16 engine with every adapter of ADAPTERS registered, sized for the parity rows."""
    return bfloat16_engine(
        model_dir,
        adapters,
        device,
        enforce_eager,
        max_lora_rank=max(spec["rank"] for spec in ADAPTERS.values()),
        max_num_seqs=GRAPH_ROWS,
        max_num_batched_tokens=1024,
        kv_tokens=GRAPH_ROWS * (max(LENGTHS) + DECODE_STEPS + 16),  # + a partial KV block each
    )


def greedy_decode(engine: LLMEngine, rows: list[Row]) -> Decoded:
    """Every row in one batch, greedy; row i stops after DECODE_STEPS - i % 3 tokens."""
    engine.record_logits = True
    for i, (ids, adapter) in enumerate(rows):
        params = SamplingParams(max_tokens=DECODE_STEPS - i % 3, temperature=0, ignore_eos=True)
        engine.add_request(f"row-{i}", ids, params, adapter)
    out: Decoded = [[] for _ in rows]
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.error is not None:
                raise o.error
            out[int(o.request_id.removeprefix("row-"))].append((o.token.token_id, o.logits.float().cpu()))
    return out


def load_reference(model_dir: Path, adapters: dict[str, Path], dtype: torch.dtype, device: str):
    """transformers + PEFT holding every adapter under its name, in `dtype` on `device`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():  # transformers' deprecation notices about its own internals
        warnings.simplefilter("ignore", FutureWarning)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        names = list(adapters)
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


@torch.inference_mode()
def reference_logits(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    """[len(ids), V] float32 on the host, at every position."""
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device), adapter_names=[adapter or "__base__"])
    return out.logits[0].float().cpu()


def max_abs_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Largest |got - want| over every pair of tensors."""
    return max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want, strict=True))


def is_greedy_pick(token: int, logits: torch.Tensor, tol: float) -> bool:
    """Whether `token` is the argmax of `logits` [V], or within `tol` of it (a near tie)."""
    return bool(logits[token] >= logits.max() - tol)


def compare_decodes(want: Decoded, got: Decoded, tol: float) -> tuple[float, int]:
    """(max logits error, diverged rows) of two greedy runs over the same rows, step by step.

    Where the tokens differ, `got`'s pick must be a near tie in `want`'s logits, else the row
    has diverged; either way it is compared no further (the two contexts now differ).
    """
    err, diverged = 0.0, 0
    for want_row, got_row in zip(want, got, strict=True):
        if len(want_row) != len(got_row):
            diverged += 1
            continue
        for (want_tok, want_logits), (got_tok, got_logits) in zip(want_row, got_row):
            err = max(err, float((want_logits - got_logits).abs().max()))
            if want_tok != got_tok:
                diverged += not is_greedy_pick(got_tok, want_logits, tol)
                break
    return err, diverged


def run_engine(model_dir: Path, adapters: dict[str, Path], rows: list[Row], device: str):
    """(prefill logits [len, V] per row from `score`, greedy decode of the rows), eagerly."""
    engine = parity_engine(model_dir, adapters, device, enforce_eager=True)
    prefill = [t.float().cpu() for t in engine.score([ids for ids, _ in rows], [a for _, a in rows])]
    return prefill, greedy_decode(engine, rows)


def run_reference(model_dir: Path, adapters: dict[str, Path], rows: list[Row], decoded: Decoded, device: str):
    """transformers + PEFT on each row's prompt + the engine's tokens, every position in one pass.

    Returns (float32 logits per row, float32 base-model logits of each adapter row's prompt,
    the largest error of bfloat16 transformers + PEFT against float32 on the same rows).
    """
    seqs = [(ids + [tok for tok, _ in steps], a) for (ids, a), steps in zip(rows, decoded)]
    model = load_reference(model_dir, adapters, torch.float32, device)
    ref = [reference_logits(model, ids, a) for ids, a in seqs]
    base = [reference_logits(model, ids, None) for ids, a in rows if a is not None]
    del model
    model = load_reference(model_dir, adapters, torch.bfloat16, device)
    own_error = max_abs_error([reference_logits(model, ids, a) for ids, a in seqs], ref)
    return ref, base, own_error


def parity_checks(work: Path, shape: str, device: str) -> list[Check]:
    """Engine vs transformers + PEFT: prefill and decode logits, greedy tokens, adapters visible."""
    model_dir, adapters = parity_assets(work, shape)
    rows = parity_rows(ModelConfig.from_dir(model_dir).vocab_size, len(LENGTHS))
    prefill, decoded = run_engine(model_dir, adapters, rows, device)
    ref, base, own_error = run_reference(model_dir, adapters, rows, decoded, device)
    tol = max(BF16_FLOOR, 2 * own_error)
    bound = f"tolerance {tol:.4f} = max({BF16_FLOOR}, 2 x transformers' own bf16 error {own_error:.4f})"
    at_prompt = [r[: len(ids)] for r, (ids, _) in zip(ref, rows)]  # [len, V]
    at_steps = [r[len(ids) - 1 : len(ids) - 1 + len(s)] for r, (ids, _), s in zip(ref, rows, decoded)]
    steps = [torch.stack([logits for _, logits in row]) for row in decoded]  # [steps, V]
    name, checks = f"parity {shape}", []
    for what, got, want in (("prefill logits", prefill, at_prompt), ("decode logits", steps, at_steps)):
        err = max_abs_error(got, want)
        detail = f"max abs err {err:.4f}, {bound}"
        checks.append(Check(f"{name}: {what}", err <= tol, detail, dict(error=err, tolerance=tol)))
    picks = [
        is_greedy_pick(tok, r[k], tol) for row, r in zip(decoded, at_steps) for k, (tok, _) in enumerate(row)
    ]
    detail = f"{sum(picks)}/{len(picks)} are float32 transformers+PEFT's argmax (or within the tolerance)"
    checks.append(
        Check(f"{name}: greedy tokens", all(picks), detail, dict(agree=sum(picks), total=len(picks)))
    )
    with_adapter = [r for r, (_, a) in zip(at_prompt, rows) if a is not None]
    effect = min(float((r - b).abs().max()) for r, b in zip(with_adapter, base, strict=True))
    detail = f"smallest adapter effect on the logits {effect:.4f} (must exceed the tolerance)"
    checks.append(
        Check(f"{name}: adapters visible", effect > tol, detail, dict(effect=effect, tolerance=tol))
    )
    return checks


def graphs_checks(work: Path, shape: str, device: str) -> list[Check]:
    """Greedy decode with CUDA graphs allowed against the same rows decoded eagerly.

    Same kernels on the same inputs, so the bfloat16 floor is the tolerance; a graph captured
    for a padded batch may still round differently, hence not bit-for-bit.
    """
    model_dir, adapters = parity_assets(work, shape)
    rows = parity_rows(ModelConfig.from_dir(model_dir).vocab_size, GRAPH_ROWS)
    runs = {}
    for eager in (True, False):
        engine = parity_engine(model_dir, adapters, device, enforce_eager=eager)
        engine.warm_up()  # where graphs may be captured, as before serving
        runs[eager] = greedy_decode(engine, rows)
        del engine
    err, diverged = compare_decodes(runs[True], runs[False], BF16_FLOOR)
    detail = f"max abs err {err:.4f} (tolerance {BF16_FLOOR}), {diverged}/{GRAPH_ROWS} rows diverged"
    figures = dict(error=err, tolerance=BF16_FLOOR, diverged=diverged)
    return [
        Check(f"graphs {shape}: CUDA graphs vs eager", diverged == 0 and err <= BF16_FLOOR, detail, figures)
    ]
