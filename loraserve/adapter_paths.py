"""The adapter-root allow-list: which local directories a service may read adapters from.

Security code, one copy for both services: the manager's RegisterAdapter(path) and a replica's
LoadAdapter(path) call `resolve_adapter_dir`. A path is accepted only when it is absolute, has no
`..`, names an existing directory, and the directory and every adapter file a loader could open
in it (config, safetensors and pickle weights) resolve, through symlinks, under one allowed root.
Refusals start with the field name, `path:`, like the replica's other INVALID_ARGUMENT messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loraserve import errors
from loraserve.peft_format import CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE

# Every file a loader may open inside an adapter directory.
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, PICKLE_WEIGHTS_FILE)


def resolve_adapter_dir(path: str, roots: Sequence[str | Path]) -> Path:
    """The real directory `path` names, if it and its adapter files lie under an allowed root.

    Raises PathNotAllowed when there is no root at all, for relative paths, `..`, and anything
    (the directory or a file in it) whose symlinks resolve outside every root; AdapterFilesMissing
    when the directory does not exist.
    """
    if not roots:
        raise errors.PathNotAllowed("path: loading adapters from a directory is disabled (no --adapter-root)")
    given = Path(path)
    if not given.is_absolute():
        raise errors.PathNotAllowed(f"path: {path!r} must be absolute")
    if ".." in given.parts:
        raise errors.PathNotAllowed(f"path: {path!r} must not contain '..'")
    if not given.is_dir():
        raise errors.AdapterFilesMissing(f"{path}: adapter directory does not exist")
    real = given.resolve(strict=True)  # follows symlinks, so a link cannot escape the roots
    # ... and neither can a link to one of the adapter's files inside an allowed directory
    candidates = [real, *((real / name).resolve() for name in ADAPTER_FILES)]
    resolved_roots = [Path(root).resolve() for root in roots]
    if any(all(c.is_relative_to(root) for c in candidates) for root in resolved_roots):
        return real
    raise errors.PathNotAllowed(
        f"path: {path!r} resolves (through symlinks) outside the adapter roots "
        f"{[str(r) for r in resolved_roots]}"
    )
