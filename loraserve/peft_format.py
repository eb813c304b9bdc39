"""The PEFT LoRA adapter format, torch-free: `adapter_config.json` + `adapter_model.safetensors`.

Both services validate adapters with this module: `inspect_adapter` reads the config and the
safetensors header only and returns an `AdapterManifest` (what the adapter is, matched against a
base model and an engine's `AdapterLimits`); `non_finite_tensor` scans the weights for NaN/Inf.
Turning the weights into tensors is the engine's job (`inference_svc.adapters.load_adapter`).

Hostile files are bounded before any work grows with them: the config file by
`MAX_CONFIG_BYTES`; the safetensors header by `HeaderLimits.for_model` (a LoRA adapter of a model
has at most layers x LoRA-capable modules x 2 tensors, so the tensor count and the header's size
follow from the model and are checked from the header's first 8 bytes, before it is parsed);
JSON nesting by the parser's recursion limit (INVALID_ARGUMENT, not a crash); and
`rank_pattern` / `alpha_pattern` keys are matched with RE2, in time linear in the module name,
never by a backtracking engine.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import re2

from loraserve import errors
from loraserve.engine_limits import TARGET_MODULE_NAMES, AdapterLimits, serves
from loraserve.model_summary import ModelConfig
from loraserve.names import CONFIG_FILE as CONFIG_FILE  # re-exported: the format names its files
from loraserve.names import WEIGHTS_FILE as WEIGHTS_FILE

PICKLE_WEIGHTS_FILE = "adapter_model.bin"

# safetensors dtype code -> bytes per element, for the dtypes LoRA weights may use.
SAFETENSORS_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# dtype code -> (the element as an unsigned int, its exponent bits): all ones = NaN or Inf.
_EXPONENT_BITS = {
    "F64": ("<u8", 0x7FF0000000000000),
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
}
# Largest adapter_config.json: real ones are a few KiB; the manager sends it to replicas inside one
# gRPC message (FetchAdapterWeights' header), so it must stay far below the 4 MiB message default.
MAX_CONFIG_BYTES = 1024 * 1024
# Header bytes allowed per tensor entry (a PEFT entry is ~150 bytes) and for `__metadata__`.
HEADER_BYTES_PER_TENSOR = 1024
HEADER_METADATA_BYTES = 64 * 1024
TENSOR_ENTRY_SLACK = 2  # header entries allowed per LoRA tensor (see HeaderLimits.for_model)
# rank_pattern / alpha_pattern: at most this many keys, each at most this long and all together
# at most this long (matching costs about modules x total key length: per-module keys of an
# 80-layer model take ~20 KiB), each compiled by RE2 within this much memory (one at a time).
MAX_PATTERN_KEYS = 1024
MAX_PATTERN_CHARS = 1024
MAX_PATTERN_TOTAL_CHARS = 32 * 1024
PATTERN_MAX_MEM = 1024 * 1024
# base_model.model.model.layers.3.self_attn.q_proj.lora_A[.adapter_name].weight (fullmatch)
TENSOR_KEY_RE = re.compile(
    r"(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\."
    r"(?:self_attn|mlp)\.(?P<module>\w+)\.(?P<kind>lora_A|lora_B)(?:\.[\w-]+)?\.weight"
)


@dataclass(frozen=True)
class HeaderLimits:
    """What a safetensors header of one model's LoRA adapter may hold."""

    max_tensors: int  # tensor entries
    max_bytes: int  # header length

    @classmethod
    def for_model(cls, model: ModelConfig) -> HeaderLimits:
        """A LoRA adapter has at most layers x LoRA-capable modules x 2 (lora_A, lora_B) tensors;
        the header may list twice that, so that the DoRA magnitudes and LoRA biases some
        adapters add are refused by name (`build_manifest`) rather than by count."""
        max_tensors = model.num_layers * len(model.module_shapes()) * 2 * TENSOR_ENTRY_SLACK
        return cls(max_tensors, max_tensors * HEADER_BYTES_PER_TENSOR + HEADER_METADATA_BYTES)


# For a header read without a model at hand (tools, format tests); services use `for_model`.
ANY_MODEL_HEADER = HeaderLimits(max_tensors=100_000, max_bytes=100 * 1024 * 1024)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # byte offset into the data section
    end: int


@dataclass(frozen=True)
class AdapterManifest:
    """What an adapter is, known without reading its weights."""

    path: str
    rank: int  # the largest per-module rank
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # modules that carry tensors
    module_ranks: dict  # {(layer, module): rank}
    module_scales: dict  # {(layer, module): alpha / r or alpha / sqrt(r)}
    size_bytes: int  # of the weights file
    tensors: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory's two files held in memory, e.g. just fetched from the adapter
    manager: the engine validates and loads from these bytes instead of reading the directory."""

    config_json: bytes  # adapter_config.json
    weights: bytearray  # adapter_model.safetensors (loaded tensors may view it: never mutate it)


def header_length(data: bytes, file_size: int, where: str, limits: HeaderLimits) -> int:
    """The header length a safetensors file's first 8 bytes announce, checked against `limits`
    and the file's size before anything else is read."""
    if len(data) < 8:
        raise errors.CorruptSafetensors(f"{where}: file is {file_size} bytes, too short for a header")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > file_size:
        raise errors.CorruptSafetensors(
            f"{where}: header length {n} does not fit the {file_size}-byte file (truncated?)"
        )
    if n > limits.max_bytes:
        raise errors.TooManyTensors(
            f"{where}: header is {n} bytes; an adapter of this model lists at most "
            f"{limits.max_tensors} tensors, so its header is at most {limits.max_bytes} bytes"
        )
    return n


def parse_safetensors_header(
    data: bytes, file_size: int, where: str, limits: HeaderLimits = ANY_MODEL_HEADER
) -> tuple[TensorInfo, ...]:
    """Validate a safetensors header (the first 8 + N bytes) against the file's size and `limits`."""
    n = header_length(data, file_size, where, limits)
    if len(data) < 8 + n:
        raise errors.CorruptSafetensors(f"{where}: header is truncated")
    header = _json_object(data[8 : 8 + n], f"{where}: header", errors.CorruptSafetensors)
    count = len(header) - ("__metadata__" in header)
    if count > limits.max_tensors:
        raise errors.TooManyTensors(
            f"{where}: header lists {count} tensors; an adapter of this model may list at most "
            f"{limits.max_tensors}"
        )
    data_size = file_size - 8 - n
    tensors, spans = [], []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise errors.CorruptSafetensors(f"{where}: tensor {name!r} has a malformed entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_SIZES:
            raise errors.UnsupportedTensorDtype(
                f"{where}: tensor {name!r} has dtype {dtype}; LoRA weights must be one of "
                f"{sorted(SAFETENSORS_DTYPE_SIZES)}"
            )
        ok_shape = isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
        ok_offsets = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        )
        if not ok_shape or not ok_offsets:
            raise errors.CorruptSafetensors(
                f"{where}: tensor {name!r} has shape {shape} / offsets {offsets} outside the "
                f"{data_size}-byte data section"
            )
        expected = math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise errors.CorruptSafetensors(
                f"{where}: tensor {name!r} claims shape {shape} ({expected} bytes) but spans "
                f"{offsets[1] - offsets[0]} bytes"
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1]))
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise errors.CorruptSafetensors(f"{where}: tensors overlap in the data section")
    if spans and spans[-1][1] != data_size:
        raise errors.CorruptSafetensors(
            f"{where}: data section is {data_size} bytes but tensors end at {spans[-1][1]}"
        )
    return tuple(tensors)


def _json_object(raw: bytes | str, what: str, error: type[errors.InvalidAdapter]) -> dict:
    """A JSON object, or `error` naming `what`: invalid JSON, nesting too deep to parse, or not an object."""
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} is not valid JSON ({e})") from e
    except RecursionError as e:
        raise error(f"{what} nests JSON too deeply to parse") from e
    if not isinstance(value, dict):
        raise error(f"{what} is not a JSON object")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def read_adapter_config(path: Path, files: AdapterFiles | None = None) -> dict:
    """The adapter's config as a dict; AdapterConfigInvalid for JSON that is invalid, too deep,
    not an object, or larger than MAX_CONFIG_BYTES."""
    cfg_path = path / CONFIG_FILE
    if files is None and not cfg_path.is_file():
        raise errors.AdapterFilesMissing(f"{path}: {CONFIG_FILE} is missing")
    size = cfg_path.stat().st_size if files is None else len(files.config_json)
    if size > MAX_CONFIG_BYTES:
        raise errors.AdapterConfigInvalid(
            f"{cfg_path}: {size} bytes; {CONFIG_FILE} may be at most {MAX_CONFIG_BYTES} bytes"
        )
    raw = cfg_path.read_bytes() if files is None else files.config_json
    return _json_object(raw, str(cfg_path), errors.AdapterConfigInvalid)


def check_adapter_config(cfg: dict, limits: AdapterLimits, where: str) -> None:
    """Reject every PEFT option the engine does not serve, each with its own error type."""
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise errors.AdapterConfigInvalid(f"{where}: peft_type {peft_type!r} is not LORA")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise errors.AdapterConfigInvalid(f"{where}: adapter_config.json lacks {key!r}")
    if cfg.get("use_dora"):
        raise errors.DoraNotSupported(f"{where}: DoRA adapters (use_dora=true) are not supported")
    if cfg.get("modules_to_save"):
        raise errors.ModulesToSaveNotSupported(
            f"{where}: modules_to_save {cfg['modules_to_save']} would replace base weights; not supported"
        )
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise errors.BiasNotSupported(
            f"{where}: bias={cfg.get('bias')!r} / lora_bias={cfg.get('lora_bias')!r}; only "
            "bias='none' is supported"
        )
    if cfg.get("fan_in_fan_out"):
        raise errors.AdapterConfigInvalid(f"{where}: fan_in_fan_out=true is not supported")
    if not _is_number(cfg["lora_alpha"]):
        raise errors.AdapterConfigInvalid(f"{where}: lora_alpha must be a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise errors.AdapterConfigInvalid(f"{where}: {key} must be an object of pattern -> value")
        total = sum(len(k) for k in pattern)
        if len(pattern) > MAX_PATTERN_KEYS or total > MAX_PATTERN_TOTAL_CHARS:
            raise errors.AdapterConfigInvalid(
                f"{where}: {key} has {len(pattern)} keys of {total} characters; at most "
                f"{MAX_PATTERN_KEYS} keys of {MAX_PATTERN_TOTAL_CHARS} characters in all"
            )
        for regex in pattern:
            _module_pattern(regex, f"{where}: {key}")
    if not all(_is_number(a) for a in (cfg.get("alpha_pattern") or {}).values()):
        raise errors.AdapterConfigInvalid(f"{where}: alpha_pattern values must be finite numbers")
    ranks = [cfg["r"], *(cfg.get("rank_pattern") or {}).values()]
    for r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise errors.RankInvalid(f"{where}: rank {r!r} must be a positive integer")
        if r > limits.max_lora_rank:
            raise errors.RankTooLarge(f"{where}: rank {r} exceeds max_lora_rank ({limits.max_lora_rank})")
    targets = cfg["target_modules"]
    if not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise errors.AdapterConfigInvalid(
            f"{where}: target_modules must be a list of names or a regex string"
        )
    if isinstance(targets, list):
        unknown = sorted(t for t in targets if not serves(limits.lora_target_modules, t))
        if unknown:
            raise errors.UnsupportedTargetModule(
                f"{where}: target modules {unknown} are not supported; this engine serves "
                f"LoRA on {list(limits.lora_target_modules)}"
            )


def _module_pattern(key: str, where: str):
    """PEFT's pattern for a rank/alpha key, `(.*\\.)?(key)$`, compiled by RE2 (linear-time
    matching: no backtracking to exploit); AdapterConfigInvalid when RE2 cannot compile it
    (backreferences, lookaround, too large) or the key is longer than MAX_PATTERN_CHARS."""
    if len(key) > MAX_PATTERN_CHARS:
        raise errors.AdapterConfigInvalid(
            f"{where} key {key[:40]!r}... is {len(key)} characters; at most {MAX_PATTERN_CHARS}"
        )
    return _compile_pattern(key, where)


def _compile_pattern(key: str, where: str):
    options = re2.Options()
    options.log_errors = False
    options.max_mem = PATTERN_MAX_MEM
    try:
        return re2.compile(rf"(.*\.)?({key})$".encode(), options)  # bytes: matched without re-encoding
    except re2.error as e:
        detail = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else e
        raise errors.AdapterConfigInvalid(
            f"{where} key {key!r} is not a regular expression RE2 accepts ({detail}); "
            "backreferences and lookaround are not supported"
        ) from e


def _pattern_values(patterns: dict, module_names: list[str], where: str) -> dict:
    """PEFT's rule for every module at once: {dotted name: the value of the first key that matches
    the end of the name}; names no key matches are absent. Each key is compiled once."""
    found: dict = {}
    encoded = [(name, name.encode()) for name in module_names]
    for key, value in patterns.items():
        pattern = _module_pattern(key, where)
        for name, raw in encoded:
            if name not in found and pattern.match(raw):
                found[name] = value
    return found


def _module_name(layer: int, module: str) -> str:
    """The module's dotted name in the model, which pattern keys are matched against."""
    block = "mlp" if module in ("gate_proj", "up_proj", "gate_up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{block}.{module}"


def build_manifest(
    path: Path,
    cfg: dict,
    tensors: tuple[TensorInfo, ...],
    size: int,
    model: ModelConfig,
    limits: AdapterLimits,
) -> AdapterManifest:
    """Match every tensor to a (layer, module, A|B) of the base model and check its shape."""
    where = str(path)
    shapes = model.module_shapes()
    found: dict = {}
    for t in tensors:
        if "lora_magnitude_vector" in t.name:
            raise errors.DoraNotSupported(f"{where}: tensor {t.name!r} is a DoRA magnitude")
        if t.name.endswith(".bias"):
            raise errors.BiasNotSupported(f"{where}: tensor {t.name!r} is a LoRA bias")
        m = TENSOR_KEY_RE.fullmatch(t.name)
        if m is None:
            raise errors.UnsupportedTargetModule(
                f"{where}: tensor {t.name!r} does not belong to a LoRA-capable linear layer "
                f"({list(TARGET_MODULE_NAMES)})"
            )
        layer, module, kind = int(m["layer"]), m["module"], m["kind"]
        if module not in shapes:
            raise errors.UnsupportedTargetModule(
                f"{where}: tensor {t.name!r} targets {module!r}, which {model.model_type} models do not "
                f"have; their LoRA-capable modules are {list(shapes)}"
            )
        if not serves(limits.lora_target_modules, module):
            raise errors.UnsupportedTargetModule(
                f"{where}: tensor {t.name!r} targets {module!r}; this engine serves LoRA on "
                f"{list(limits.lora_target_modules)}"
            )
        if layer >= model.num_layers:
            raise errors.ShapeMismatch(
                f"{where}: tensor {t.name!r} is for layer {layer}; the model has {model.num_layers} layers"
            )
        found.setdefault((layer, module), {})[kind] = t
    if not found:
        raise errors.AdapterConfigInvalid(f"{where}: {WEIGHTS_FILE} holds no LoRA tensors")
    ranks, scales = {}, {}
    for (layer, module), pair in sorted(found.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise errors.ShapeMismatch(f"{where}: layer {layer} {module} has no {missing} tensor")
    names = {key: _module_name(*key) for key in sorted(found)}
    rank_of = _pattern_values(cfg.get("rank_pattern") or {}, list(names.values()), f"{where}: rank_pattern")
    alpha_of = _pattern_values(
        cfg.get("alpha_pattern") or {}, list(names.values()), f"{where}: alpha_pattern"
    )
    for (layer, module), pair in sorted(found.items()):
        name = names[(layer, module)]
        r = rank_of.get(name, cfg["r"])
        alpha = alpha_of.get(name, cfg["lora_alpha"])
        fan_in, fan_out = shapes[module]
        a, b = pair["lora_A"], pair["lora_B"]
        if a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise errors.ShapeMismatch(
                f"{where}: layer {layer} {module}: lora_A {list(a.shape)} / lora_B "
                f"{list(b.shape)} do not match the base model's [{r}, {fan_in}] / [{fan_out}, {r}]"
            )
        ranks[(layer, module)] = r
        scales[(layer, module)] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return AdapterManifest(
        path=where,
        rank=max(ranks.values()),
        lora_alpha=float(cfg["lora_alpha"]),
        use_rslora=bool(cfg.get("use_rslora")),
        target_modules=tuple(sorted({m for _, m in found}, key=TARGET_MODULE_NAMES.index)),
        module_ranks=ranks,
        module_scales=scales,
        size_bytes=size,
        tensors=tensors,
    )


def weights_path(path: Path, limits: AdapterLimits) -> Path:
    """The directory's weights file: safetensors, else pickle weights if `limits` allow them."""
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        return weights
    if (path / PICKLE_WEIGHTS_FILE).is_file():
        if limits.allow_pickle_adapters:
            return path / PICKLE_WEIGHTS_FILE
        raise errors.PickleWeightsNotAllowed(
            f"{path}: only pickle weights ({PICKLE_WEIGHTS_FILE}) found; convert them to "
            f"safetensors or start the engine with allow_pickle_adapters"
        )
    raise errors.AdapterFilesMissing(f"{path}: {WEIGHTS_FILE} is missing")


def inspect_adapter(
    path: str | Path,
    model: ModelConfig,
    limits: AdapterLimits,
    files: AdapterFiles | None = None,
    pickle_tensors: Callable[[Path], tuple[TensorInfo, ...]] | None = None,
) -> AdapterManifest:
    """Validate an adapter directory reading only its config and safetensors header.

    With `files`, the directory's contents are those bytes and the directory is not read.
    Pickle weights (allowed by `limits` only) have no header to read alone: `pickle_tensors`
    reads them (the engine passes its torch reader); without one they are refused.
    """
    path = Path(path)
    header_limits = HeaderLimits.for_model(model)
    if files is not None:
        cfg = read_adapter_config(path, files)
        check_adapter_config(cfg, limits, str(path))
        where = str(path / WEIGHTS_FILE)
        tensors = parse_safetensors_header(files.weights, len(files.weights), where, header_limits)
        return build_manifest(path, cfg, tensors, len(files.weights), model, limits)
    if not path.is_dir():
        raise errors.AdapterFilesMissing(f"{path}: adapter directory does not exist")
    cfg = read_adapter_config(path)
    check_adapter_config(cfg, limits, str(path))
    weights = weights_path(path, limits)
    size = weights.stat().st_size
    if weights.name == PICKLE_WEIGHTS_FILE:
        if pickle_tensors is None:
            raise errors.PickleWeightsNotAllowed(f"{path}: pickle weights can only be read by an engine")
        return build_manifest(path, cfg, pickle_tensors(weights), size, model, limits)
    with weights.open("rb") as f:
        head = f.read(8)
        head += f.read(header_length(head, size, str(weights), header_limits))
    tensors = parse_safetensors_header(head, size, str(weights), header_limits)
    return build_manifest(path, cfg, tensors, size, model, limits)


def non_finite_tensor(weights: Path, tensors: tuple[TensorInfo, ...]) -> str | None:
    """The name of the first tensor of a (header-validated) safetensors file holding NaN or Inf.

    Reads every tensor once (memory-mapped); a value is NaN or Inf when its exponent bits are all
    ones, which holds for every IEEE format, bfloat16 included.
    """
    data = np.memmap(weights, dtype=np.uint8, mode="r")
    (n,) = struct.unpack("<Q", data[:8].tobytes())
    base = 8 + n
    for t in tensors:
        if t.end == t.start:
            continue
        as_uint, exponent = _EXPONENT_BITS[t.dtype]
        values = data[base + t.start : base + t.end].view(as_uint)
        if np.any((values & exponent) == exponent):
            return t.name
    return None
