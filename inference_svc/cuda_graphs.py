"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured at warm-up.

A decode step of B sequences is padded to the smallest bucket >= B (padding sequences decode one
token on the KV pool's padding block, with no adapter), its inputs are written into the persistent
buffers the graphs were captured on (`StepInputs` and its `LoraMetaBuffers`), and the bucket's
graph is replayed: the whole forward pass as one launch sequence, with no per-kernel host work.
Kernel grids are fixed per bucket, as in vLLM: the LoRA kernels cover every slot (`max_loras`) and
B tokens per slot and exit early where a slot is unused; attention covers B one-query sequences.
Prefill chunks, mixed steps and decode steps above the largest bucket run eagerly.
"""

from __future__ import annotations

import logging

import torch

from inference_svc.forward_batch import SequenceChunk, StepInputs
from inference_svc.kv_cache import KVCache
from inference_svc.lora_slots import LoraSlots
from inference_svc.model import CausalLM

log = logging.getLogger(__name__)


def batch_buckets(max_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to and including `max_seqs`."""
    sizes = [n for n in (1, 2, 4) if n < max_seqs] + list(range(8, max_seqs, 8))
    return [*sizes, max_seqs]


class DecodeGraphs:
    """Captured decode graphs of one engine, sharing one memory pool."""

    def __init__(self, model: CausalLM, kv: KVCache, lora: LoraSlots, inputs: StepInputs, max_seqs: int):
        self.model, self.kv, self.lora, self.inputs = model, kv, lora, inputs
        self.buckets = batch_buckets(max_seqs)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # size -> (graph, logits)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    @torch.inference_mode()
    def capture(self) -> list[int]:
        """Capture every bucket, largest first (so smaller ones reuse its pool); returns the sizes."""
        pool = None
        for size in reversed(self.buckets):
            batch = self.inputs.build([], pad_to=size)  # all padding: any step of `size` replays it
            self.model.forward(batch, self.kv, self.lora)  # compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.forward(batch, self.kv, self.lora)  # [size, V]
            pool = graph.pool()
            self._graphs[size] = (graph, logits)
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)
        return list(self.buckets)

    def fits(self, chunks: list[SequenceChunk]) -> bool:
        """Whether this step can be replayed: captured, decode only, at most the largest bucket."""
        return (
            self.captured
            and len(chunks) <= self.buckets[-1]
            and all(len(c.token_ids) == 1 and c.want_logits for c in chunks)
        )

    def run(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """Logits [len(chunks), V] of a decode step that `fits`, by replaying its bucket's graph.

        The tensor is the graph's output buffer: read it before the next replay.
        """
        size = next(n for n in self.buckets if n >= len(chunks))
        graph, logits = self._graphs[size]
        self.inputs.build(chunks, pad_to=size)
        graph.replay()
        return logits[: len(chunks)]
