"""The adapter-root allow-list: which local directories a service may read adapters from.

Security code, one copy for both services: the manager's RegisterAdapter(path) and a replica's
LoadAdapter(path) call `resolve_adapter_dir`. A path is accepted only when it is absolute, has no
`..`, names an existing directory, and the directory and every adapter file a loader could open
in it (config, safetensors and pickle weights) resolve, through symlinks, under one allowed root.
Refusals start with the field name, `path:`, like the replica's other INVALID_ARGUMENT messages.

Checking a path and then opening it by name races with whoever can write under the root: a file
swapped for a symlink between the two is read from wherever the link points. `open_adapter_dir`
closes the race (open, then verify): files are opened by walking from a descriptor of the allowed
root, one component at a time with O_NOFOLLOW, and checked with fstat on the descriptor that is
then read. A symlink that appears meanwhile makes the open fail; nothing outside the root is read.
Symlinks that exist and stay under the root (a Hugging Face cache snapshot) still work: each file
is resolved first and its real path walked.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

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
    real = _resolve(given, strict=True)  # follows symlinks, so a link cannot escape the roots
    # ... and neither can a link to one of the adapter's files inside an allowed directory
    candidates = [real, *(_resolve(real / name) for name in ADAPTER_FILES)]
    resolved_roots = [Path(root).resolve() for root in roots]
    if any(all(c.is_relative_to(root) for c in candidates) for root in resolved_roots):
        return real
    raise errors.PathNotAllowed(
        f"path: {path!r} resolves (through symlinks) outside the adapter roots "
        f"{[str(r) for r in resolved_roots]}"
    )


def _resolve(path: Path, strict: bool = False) -> Path:
    """`path.resolve`; PathNotAllowed when links change under it while it is resolved."""
    try:
        return path.resolve(strict=strict)
    except FileNotFoundError:
        if strict:
            raise errors.AdapterFilesMissing(f"{path}: adapter directory does not exist") from None
        raise
    except OSError as e:  # a link replaced by a file (EINVAL) or a loop (ELOOP) meanwhile
        raise errors.PathNotAllowed(
            f"path: {path} changed while it was checked ({e.strerror}); try again"
        ) from e


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO must not block


class AdapterDir:
    """An adapter directory under an allowed root whose files are opened race-free (`open`).

    Holds a descriptor of the root; `close` it (or use `with`).
    """

    def __init__(self, root: Path, root_fd: int, path: Path):
        self.root = root
        self.path = path  # the real directory, under root
        self._root_fd = root_fd

    def exists(self, name: str) -> bool:
        """Whether the directory has an entry `name` (for messages; `open` decides)."""
        return os.path.lexists(self.path / name)

    def open(self, name: str) -> BinaryIO:
        """The file `name` in the directory, opened for reading without following any link that
        was not under the root when resolved. Raises PathNotAllowed (outside the root, a link
        appeared, not a regular file) or FileNotFoundError."""
        real = _resolve(self.path / name)
        if not real.is_relative_to(self.root):
            raise errors.PathNotAllowed(
                f"path: {self.path / name} resolves outside the adapter root {self.root}"
            )
        *dirs, leaf = real.relative_to(self.root).parts
        fd = os.dup(self._root_fd)
        try:
            for part, flags in [*((d, _DIR_FLAGS) for d in dirs), (leaf, _FILE_FLAGS)]:
                parent, fd = fd, _step(fd, part, flags, real)
                os.close(parent)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise errors.PathNotAllowed(f"path: {real} is not a regular file")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> AdapterDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _step(fd: int, part: str, flags: int, real: Path) -> int:
    """Open `part` relative to directory `fd`, following no link; -> the new descriptor."""
    try:
        return os.open(part, flags, dir_fd=fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise errors.PathNotAllowed(
                f"path: {real} changed while it was opened (a symbolic link appeared); try again"
            ) from e
        raise


def open_adapter_dir(path: str, roots: Sequence[str | Path]) -> AdapterDir:
    """`resolve_adapter_dir`, then an `AdapterDir` to read the adapter's files from safely.

    Raises what `resolve_adapter_dir` raises.
    """
    real = resolve_adapter_dir(path, roots)
    root = max(
        (r for r in (Path(r).resolve() for r in roots) if real.is_relative_to(r)), key=lambda r: len(r.parts)
    )
    return AdapterDir(root, os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), real)
