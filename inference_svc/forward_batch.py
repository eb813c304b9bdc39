"""The inputs of one forward step, laid out in persistent buffers in O(new tokens) host work.

`StepInputs` owns device buffers sized for the largest step (`max_num_batched_tokens` tokens,
`max_num_seqs` sequences), allocated once. Each step writes only its new tokens' ids, positions,
LoRA slots and KV write slots, and one entry per sequence for the attention metadata; block tables
are the KV pool's array, updated when blocks are appended. Nothing here walks a sequence's context.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

import kernels
from inference_svc.kv_cache import BlockTable, KVCache
from kernels.attention import AttentionMeta


@dataclass(frozen=True)
class SequenceChunk:
    """The tokens one sequence contributes to a step."""

    token_ids: Sequence[int]  # new tokens (a prefill chunk, or one decode token)
    start_pos: int  # position of token_ids[0]; positions before it are already in the KV cache
    block_table: BlockTable  # KV blocks of the sequence, covering start_pos + len(token_ids)
    slot: int  # LoRA slot, -1 = base model
    want_logits: bool  # whether the last token's logits are needed (to sample)
    prompt_len: int = 0  # the sequence's prompt length (rope lengths); 0 = this chunk ends the prompt


@dataclass(frozen=True)
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64, every chunk's tokens concatenated
    positions: torch.Tensor  # [T] int64
    rope_lens: torch.Tensor  # [T] int64, max(prompt length, position + 1): length-dependent rope
    slot_ids: torch.Tensor  # [T] int32, LoRA slot per token (-1 = none)
    lora_meta: kernels.LoraBatchMeta  # tokens grouped by slot
    kv_write: torch.Tensor  # [T] int64, flat KV-pool position each token's K/V goes to
    attention: AttentionMeta  # queries per sequence, context lengths, block tables
    logits_index: torch.Tensor  # [n] int64, token rows whose logits are returned

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


class StepInputs:
    """Persistent buffers for the inputs of a step of up to `max_tokens` tokens and `max_seqs` sequences."""

    def __init__(self, kv: KVCache, max_tokens: int, max_seqs: int, device: torch.device, max_loras: int = 0):
        self.kv = kv
        self.device = device
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs

        def buffer(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, device=device)

        self.token_ids = buffer(max_tokens, torch.int64)  # [max_tokens]
        self.positions = buffer(max_tokens, torch.int64)
        self.rope_lens = buffer(max_tokens, torch.int64)
        self.slot_ids = buffer(max_tokens, torch.int32)
        self.kv_write = buffer(max_tokens, torch.int64)
        self.logits_index = buffer(max_tokens, torch.int64)
        self.query_start_loc = buffer(max_seqs + 1, torch.int32)  # [max_seqs + 1]
        self.seq_lens = buffer(max_seqs, torch.int32)
        self.seq_rows = buffer(max_seqs, torch.int32)
        self.kv_tables = kv.tables_host.numpy()  # [rows, max_blocks] int32, the host copy
        # LoRA metadata at fixed addresses, for decode steps padded to a CUDA graph's batch size
        self.lora_buffers = (
            kernels.LoraMetaBuffers(max_seqs, max_loras, device) if kv.padding_row >= 0 else None
        )

    def build(
        self, chunks: list[SequenceChunk], all_logits: bool = False, pad_to: int | None = None
    ) -> ForwardBatch:
        """Lay out `chunks` for one forward pass; `all_logits` returns logits for every token.

        `pad_to` (decode steps replayed from a CUDA graph): add one-token padding sequences up to
        that many, on the KV pool's padding row, and lay the LoRA metadata out at fixed addresses
        with fixed grids; every row's logits are returned.
        """
        num_seqs = len(chunks)
        lens = np.fromiter((len(c.token_ids) for c in chunks), np.int64, num_seqs)  # [B]
        starts = np.fromiter((c.start_pos for c in chunks), np.int64, num_seqs)
        rows = np.fromiter((c.block_table.row for c in chunks), np.int64, num_seqs)
        seq_slots = np.fromiter((c.slot for c in chunks), np.int32, num_seqs)
        want = np.fromiter((c.want_logits for c in chunks), bool, num_seqs)
        prompts = np.fromiter((c.prompt_len for c in chunks), np.int64, num_seqs)
        tokens = np.fromiter(
            itertools.chain.from_iterable(c.token_ids for c in chunks), np.int64, int(lens.sum())
        )
        if pad_to is not None:
            pad = pad_to - num_seqs
            if pad < 0 or self.lora_buffers is None or (num_seqs and lens.max() > 1):
                raise ValueError(
                    f"only decode steps of <= {pad_to} sequences pad, on an engine built for graphs"
                )
            lens, starts = np.append(lens, np.ones(pad, np.int64)), np.append(starts, np.zeros(pad, np.int64))
            prompts = np.append(prompts, np.zeros(pad, np.int64))
            rows = np.append(rows, np.full(pad, self.kv.padding_row))
            seq_slots, want = (
                np.append(seq_slots, np.full(pad, -1, np.int32)),
                np.append(want, np.ones(pad, bool)),
            )
            tokens, num_seqs = np.append(tokens, np.zeros(pad, np.int64)), pad_to
        if num_seqs > self.max_seqs:
            raise ValueError(f"{num_seqs} sequences exceed the step's max_num_seqs ({self.max_seqs})")
        ends = np.cumsum(lens)  # [B] end row of each sequence's tokens
        num_tokens = int(ends[-1])
        if num_tokens > self.max_tokens:
            raise ValueError(
                f"{num_tokens} tokens exceed the step's max_num_batched_tokens ({self.max_tokens})"
            )
        firsts = ends - lens
        seq_of = np.repeat(np.arange(num_seqs), lens)  # [T] sequence of each token
        positions = np.arange(num_tokens) - firsts[seq_of] + starts[seq_of]  # [T]
        prompts = np.where(prompts > 0, prompts, starts + lens)  # [B]
        rope_lens = np.maximum(prompts[seq_of], positions + 1)  # [T]
        bs = self.kv.block_size
        kv_write = self.kv_tables[rows[seq_of], positions // bs].astype(np.int64) * bs + positions % bs
        slots = seq_slots[seq_of]  # [T]
        logits_rows = np.arange(num_tokens) if all_logits else (ends - 1)[want]
        seq_lens = starts + lens
        self.kv.sync_tables({int(r): -(-int(n) // bs) for r, n in zip(rows, seq_lens)})

        slot_ids = self._fill(self.slot_ids, slots)
        if pad_to is None:
            lora_meta = kernels.make_batch_meta(slot_ids, host_slot_ids=slots)
        else:
            lora_meta = self.lora_buffers.fill(slots)
        return ForwardBatch(
            token_ids=self._fill(self.token_ids, tokens),
            positions=self._fill(self.positions, positions),
            rope_lens=self._fill(self.rope_lens, rope_lens),
            slot_ids=slot_ids,
            lora_meta=lora_meta,
            kv_write=self._fill(self.kv_write, kv_write),
            attention=AttentionMeta(
                query_start_loc=self._fill(self.query_start_loc, np.concatenate(([0], ends))),
                seq_lens=self._fill(self.seq_lens, seq_lens),
                block_tables=self.kv.tables,
                seq_rows=self._fill(self.seq_rows, rows),
                max_query_len=int(lens.max()),
                max_seq_len=int(seq_lens.max()),
                host_seqs=tuple(zip(firsts.tolist(), ends.tolist(), seq_lens.tolist(), rows.tolist())),
            ),
            logits_index=self._fill(self.logits_index, logits_rows),
        )

    def _fill(self, buffer: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        """`values` copied into the front of `buffer`; returns that view."""
        view = buffer[: len(values)]
        view.copy_(
            torch.from_numpy(np.ascontiguousarray(values, dtype=_NUMPY[buffer.dtype])), non_blocking=True
        )
        return view


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32}
