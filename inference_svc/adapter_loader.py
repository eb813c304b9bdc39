"""Adapter reads off the engine thread.

One worker thread reads an adapter's files, hashes them (sha256) and validates them
(`adapters.load_adapter`), one load at a time in the order asked. It holds no residency state: the
engine thread asks for loads through `AdapterCache` and installs the finished ones itself. On CUDA
the host copies are moved to pinned (page-locked) memory, so copies into slots can be asynchronous.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from inference_svc.adapters import LoraAdapter, load_adapter
from inference_svc.config import EngineConfig
from loraserve.model_summary import ModelConfig
from loraserve.peft_format import AdapterFiles


@dataclass(frozen=True)
class LoadedAdapter:
    """A finished read, waiting for the engine thread to install it in the host tier."""

    adapter: LoraAdapter
    seconds: float  # reading, hashing and validating


class AdapterLoader:
    """Runs `load_adapter` on one background thread.

    Args:
        model, config, dtype: what `load_adapter` validates against and casts to.
        pin_memory: move the loaded tensors to pinned host memory (only when slots are on CUDA).
    """

    def __init__(self, model: ModelConfig, config: EngineConfig, dtype: torch.dtype, pin_memory: bool):
        self.model = model
        self.config = config
        self.dtype = dtype
        self.pin_memory = pin_memory
        # One worker: loads run one at a time, in the order they were submitted. It runs torch ops
        # on one core: an idle pool of intra-op threads of its own would keep spinning on the cores
        # the engine's steps need (measured: attention 6x slower while the worker lived).
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="adapter-loader",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        # Called on the loader thread after every load, failed or not (AsyncEngine wakes its inbox).
        self.on_done: Callable[[], None] = lambda: None

    def submit(
        self, adapter_id: str, path: Path, files: AdapterFiles | None
    ) -> concurrent.futures.Future[LoadedAdapter]:
        """Start reading `adapter_id`; the future raises what `load_adapter` raises
        (InvalidAdapter and its kinds, AdapterFilesMissing)."""
        future = self.executor.submit(self._load, adapter_id, path, files)
        future.add_done_callback(lambda _: self.on_done())
        return future

    def close(self) -> None:
        """Stop the worker; loads not yet started are cancelled."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _load(self, adapter_id: str, path: Path, files: AdapterFiles | None) -> LoadedAdapter:
        start = time.perf_counter()
        adapter = load_adapter(adapter_id, path, self.model, self.config, self.dtype, files)
        if self.pin_memory:
            adapter.weights = {
                key: (a.pin_memory(), b.pin_memory()) for key, (a, b) in adapter.weights.items()
            }
        return LoadedAdapter(adapter, time.perf_counter() - start)
