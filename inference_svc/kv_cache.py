"""Paged KV cache: one preallocated pool of fixed-size blocks, handed out per sequence.

The pool also owns the block-table array the attention kernels read: each sequence holding
blocks has a row in it, written entry by entry as blocks are appended (never rebuilt per step).
"""

from __future__ import annotations

import torch

from loraserve.model_summary import ModelConfig


class BlockTable:
    """One sequence's KV blocks; while it holds any, they are also row `row` of the pool's array."""

    __slots__ = ("ids", "row")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.row = -1  # -1 while it holds no block

    def __len__(self) -> int:
        return len(self.ids)


class KVCache:
    """Keys and values of every layer in `num_blocks` blocks of `block_size` token positions.

    Storage is allocated once; sequences own `BlockTable`s and the allocator only moves block ids
    between the free list and those tables. At most `max_tables` tables hold blocks at a time.
    With `padding`, one block and one extra table row (`padding_row`) are set aside for the
    padding rows of steps replayed from CUDA graphs: they write and read only that block.
    """

    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_tables: int,
        max_blocks_per_table: int,
        padding: bool = False,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks ({num_blocks}) must be >= 1: the KV-cache budget is too small")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [L, blocks, block_size, KVH, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # [rows, max_blocks_per_table] int32: the host copy is written, the device copy read
        pin = device.type == "cuda"
        rows = max_tables + 1 if padding else max_tables
        self.tables_host = torch.zeros(rows, max_blocks_per_table, dtype=torch.int32, pin_memory=pin)
        self._free_rows: list[int] = list(range(max_tables - 1, -1, -1))
        self.padding_row = -1
        if padding:
            self.padding_row = max_tables
            self.tables_host[self.padding_row, 0] = self._free.pop()
        self.tables = self.tables_host if device.type == "cpu" else self.tables_host.to(device)
        self._dirty: dict[int, int] = {}  # row -> first entry not yet copied to the device

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, table: BlockTable, num_tokens: int) -> bool:
        """Grow `table` to hold `num_tokens` positions; False (and no change) if blocks run out."""
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra <= 0:
            return True
        if extra > len(self._free) or (table.row < 0 and not self._free_rows):
            return False
        if num_tokens > self.tables_host.shape[1] * self.block_size:
            raise ValueError(
                f"{num_tokens} positions exceed the block table's {self.tables_host.shape[1]} blocks"
            )
        if table.row < 0:
            table.row = self._free_rows.pop()
        first = len(table)
        new = [self._free.pop() for _ in range(extra)]
        table.ids += new
        self.tables_host[table.row, first : first + extra] = torch.tensor(new, dtype=torch.int32)
        self._dirty[table.row] = min(self._dirty.get(table.row, first), first)
        return True

    def free(self, table: BlockTable) -> None:
        self._free.extend(reversed(table.ids))
        table.ids.clear()
        if table.row >= 0:
            self._free_rows.append(table.row)
            self._dirty.pop(table.row, None)
            table.row = -1

    def sync_tables(self, row_lengths: dict[int, int]) -> None:
        """Copy the entries appended since the last step to the device (a no-op on CPU)."""
        if self.tables is self.tables_host:
            self._dirty.clear()
            return
        for row, first in self._dirty.items():
            end = row_lengths.get(row)
            if end is not None:
                self.tables[row, first:end].copy_(self.tables_host[row, first:end], non_blocking=True)
        self._dirty = {row: first for row, first in self._dirty.items() if row not in row_lengths}

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each [num_blocks, block_size, KVH, D]."""
        return self.keys[index], self.values[index]
