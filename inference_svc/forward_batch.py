"""The index tensors of one forward step, built once and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from inference_svc.kv_cache import KVCache


@dataclass(frozen=True)
class SequenceChunk:
    """The tokens one sequence contributes to a step."""

    token_ids: list[int]  # new tokens (a prefill chunk, or one decode token)
    start_pos: int  # position of token_ids[0]; positions before it are already in the KV cache
    block_table: list[int]  # KV blocks of the sequence, covering start_pos + len(token_ids)
    slot: int  # LoRA slot, -1 = base model
    want_logits: bool  # whether the last token's logits are needed (to sample)


@dataclass(frozen=True)
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64, every chunk's tokens concatenated
    positions: torch.Tensor  # [T] int64
    slot_ids: torch.Tensor  # [T] int32, LoRA slot per token (-1 = none)
    lora_meta: kernels.LoraBatchMeta  # tokens grouped by slot
    kv_write: torch.Tensor  # [T] int64, flat KV-cache slot each token's K/V goes to
    query_index: torch.Tensor  # [B, Qmax] int64, token row of each padded query (0 = pad)
    kv_read: torch.Tensor  # [B, Lmax] int64, flat KV slot of each context position (0 = pad)
    attn_mask: torch.Tensor  # [B, 1, Qmax, Lmax] bool, True = attend
    unpad_index: torch.Tensor | None  # [T] rows of the padded [B*Qmax] output; None if no padding
    logits_index: torch.Tensor  # [n] int64, token rows whose logits are returned

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @classmethod
    def build(
        cls,
        chunks: list[SequenceChunk],
        kv: KVCache,
        device: torch.device,
        all_logits: bool = False,
    ) -> ForwardBatch:
        """Lay out `chunks` for one forward pass; `all_logits` returns logits for every token."""
        tokens, positions, slots, kv_write, logits_rows = [], [], [], [], []
        q_max = max(len(c.token_ids) for c in chunks)
        l_max = max(c.start_pos + len(c.token_ids) for c in chunks)
        query_index = torch.zeros(len(chunks), q_max, dtype=torch.int64)
        kv_read = torch.zeros(len(chunks), l_max, dtype=torch.int64)
        q_pos = torch.full((len(chunks), q_max), -1, dtype=torch.int64)  # pads attend to key 0
        unpad = []
        row = 0
        for b, c in enumerate(chunks):
            n = len(c.token_ids)
            span = range(c.start_pos, c.start_pos + n)
            tokens += c.token_ids
            positions += list(span)
            slots += [c.slot] * n
            kv_write += kv.slot_index(c.block_table, span)
            kv_read[b, : c.start_pos + n] = torch.tensor(
                kv.slot_index(c.block_table, range(c.start_pos + n)), dtype=torch.int64
            )
            query_index[b, :n] = torch.arange(row, row + n)
            q_pos[b, :n] = torch.arange(c.start_pos, c.start_pos + n)
            unpad += range(b * q_max, b * q_max + n)
            if all_logits:
                logits_rows += range(row, row + n)
            elif c.want_logits:
                logits_rows.append(row + n - 1)
            row += n
        key_pos = torch.arange(l_max)
        mask = key_pos[None, None, :] <= q_pos[:, :, None]  # causal, and within the sequence
        mask |= (q_pos[:, :, None] < 0) & (key_pos[None, None, :] == 0)
        slot_ids = torch.tensor(slots, dtype=torch.int32, device=device)
        return cls(
            token_ids=torch.tensor(tokens, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_ids=slot_ids,
            lora_meta=kernels.make_batch_meta(slot_ids),
            kv_write=torch.tensor(kv_write, dtype=torch.int64, device=device),
            query_index=query_index.to(device),
            kv_read=kv_read.to(device),
            attn_mask=mask[:, None].to(device),
            unpad_index=None if q_max == 1 else torch.tensor(unpad, dtype=torch.int64, device=device),
            logits_index=torch.tensor(logits_rows, dtype=torch.int64, device=device),
        )
