"""Read a Hugging Face checkpoint directory: `model.safetensors` or a sharded index."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from loraserve.errors import InvalidModel

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: Path) -> list[Path]:
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise InvalidModel(f"{index}: not a safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise InvalidModel(f"{model_dir}: shards {missing} named in {INDEX_FILE} are missing")
        return [model_dir / f for f in files]
    raise InvalidModel(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} exists")


def load_state_dict(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> dict:
    """Every tensor of the checkpoint, cast to `dtype` and moved to `device`."""
    state = {}
    files = checkpoint_files(Path(model_dir))
    # a progress bar on a terminal only (disable=None), one step per tensor
    with tqdm(desc="loading weights", unit="tensor", disable=None, leave=False) as bar:
        for path in files:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
                        bar.update()
            except (OSError, ValueError, RuntimeError) as e:
                raise InvalidModel(f"{path}: cannot read safetensors ({e})") from e
    return state
