import os
import sys
from pathlib import Path

import pytest
import torch

# Triton runs on CPU tensors only through its interpreter, which must be chosen before triton is
# first imported: hence here, at collection time. An explicit TRITON_INTERPRET wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tests/oracles.py and helpers

from harness import LoopThread, write_adapters, write_model  # noqa: E402
from oracles import MODEL_KINDS, write_hf_model, write_peft_adapter  # noqa: E402


@pytest.fixture(scope="session", params=sorted(MODEL_KINDS))
def hf_checkpoint(request, tmp_path_factory):
    """(kind, model_dir, {adapter_name: adapter_dir}) written by transformers + PEFT."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"hf_{kind}")
    model_dir = write_hf_model(kind, root / "model")
    adapters = {
        name: write_peft_adapter(model_dir, root / "adapters" / name, seed=i, **spec)
        for i, (name, spec) in enumerate(MODEL_KINDS[kind]["adapters"].items())
    }
    return kind, model_dir, adapters


# --- the servers' tests (adapter_svc/, reliability/; inference_svc/ overrides adapter_root) -------


@pytest.fixture(scope="session")
def loop():
    """The event loop that hosts every in-process server of the session."""
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny Llama-style demo model (2 layers, hidden 64)."""
    return write_model(tmp_path_factory.mktemp("servers_model"))


@pytest.fixture(scope="session")
def adapters(model_dir, tmp_path_factory):
    """{id: dir} of 8 rank-4 adapters on q_proj/v_proj, all under one adapter root."""
    return write_adapters(model_dir, tmp_path_factory.mktemp("adapter_root"), 8)


@pytest.fixture(scope="session")
def adapter_root(adapters):
    return next(iter(adapters.values())).parent
