"""The manager's store of canonical adapter copies, content-addressed.

An adapter's files live in `<store>/blobs/<sha[:2]>/<sha>-<config_sha[:16]>/` (`sha` = sha256 of the
weights file, `config_sha` = sha256 of adapter_config.json), so identical uploads share one copy and
a directory's contents never change once written. New files are staged under `<store>/staging/`,
hashed while they are copied, validated there, then renamed into place (atomic on one filesystem).

A blob is named `blob_name(sha, config_sha)`. Redis counts who uses it (the registry's references,
and leases taken while a registration commits it or a fetch reads it); when the last reference goes
it is garbage, and `Catalog.collect_garbage` deletes it under a claim no lease can overlap (see
adapter_svc/README.md, "Store").
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from adapter_svc import errors
from loraserve.adapter_paths import AdapterDir
from loraserve.peft_format import CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE

COPY_CHUNK = 1024**2
# Staging entries untouched this long are left over from a manager that died mid-upload (an
# upload in progress writes to its entry all the time); they are removed when a store is opened.
STALE_STAGING_S = 3600


@dataclass(frozen=True)
class StagedAdapter:
    """Adapter files copied into the staging area, with their checksums."""

    directory: Path
    sha256: str  # of the weights file
    config_sha256: str
    size_bytes: int  # of the weights file


def blob_name(sha256: str, config_sha256: str) -> str:
    """A stored copy's name: its weights' sha256 and the start of its config's."""
    return f"{sha256}-{config_sha256[:16]}"


class BlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.blobs = self.root / "blobs"
        self.staging = self.root / "staging"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.sweep_staging()

    def sweep_staging(self, older_than_s: float = STALE_STAGING_S) -> int:
        """Remove staging entries no file of which changed for `older_than_s`; -> how many."""
        cutoff, removed = time.time() - older_than_s, 0
        for entry in self.staging.iterdir():
            try:
                changed = max([entry.stat().st_mtime, *(f.stat().st_mtime for f in entry.iterdir())])
            except OSError:  # removed meanwhile by whoever owned it
                continue
            if changed < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    def path_for(self, sha256: str, config_sha256: str) -> Path:
        return self.path_of(blob_name(sha256, config_sha256))

    def path_of(self, blob: str) -> Path:
        return self.blobs / blob[:2] / blob

    def delete(self, blob: str) -> bool:
        """Remove a stored copy (blocking): renamed out of its address first, so a half-deleted
        copy is never found there. -> whether it was there."""
        path = self.path_of(blob)
        trash = self.staging / f"deleted-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def new_staging_dir(self) -> Path:
        path = self.staging / uuid.uuid4().hex
        path.mkdir()
        return path

    def stage_directory(self, source: AdapterDir) -> StagedAdapter:
        """Copy an adapter directory's two files into staging, hashing them, reading each from the
        descriptor `source.open` verified (never by path again). Blocking.

        Raises InvalidAdapter when a file is missing (pickle-only weights are never accepted),
        PathNotAllowed when one is (or became) a link out of the root or not a regular file.
        """
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not source.exists(name):
                pickle = " (only pickle weights, adapter_model.bin, are there: convert them)"
                hint = pickle if name == WEIGHTS_FILE and source.exists(PICKLE_WEIGHTS_FILE) else ""
                raise errors.InvalidAdapter(f"{source.path}: {name} is missing{hint}")
        target = self.new_staging_dir()
        try:
            with _open(source, CONFIG_FILE) as f:
                config = f.read()
            (target / CONFIG_FILE).write_bytes(config)
            digest, size = hashlib.sha256(), 0
            with _open(source, WEIGHTS_FILE) as src, (target / WEIGHTS_FILE).open("wb") as dst:
                while block := src.read(COPY_CHUNK):
                    digest.update(block)
                    dst.write(block)
                    size += len(block)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return StagedAdapter(target, digest.hexdigest(), hashlib.sha256(config).hexdigest(), size)

    def verify(self, sha256: str, config_sha256: str) -> str | None:
        """Re-hash a stored copy. Blocking; -> what is wrong with it, or None if it is intact."""
        directory = self.path_for(sha256, config_sha256)
        try:
            weights = _file_sha256(directory / WEIGHTS_FILE)
            config = _file_sha256(directory / CONFIG_FILE)
        except OSError as e:
            return f"cannot be read ({e})"
        return mismatch(WEIGHTS_FILE, weights, sha256) or mismatch(CONFIG_FILE, config, config_sha256)

    def commit(self, staged: StagedAdapter) -> Path:
        """Move staged files to their content address, keeping an existing intact identical copy
        (a corrupt one is replaced, so registering the files again repairs the store)."""
        final = self.path_for(staged.sha256, staged.config_sha256)
        if final.is_dir() and self.verify(staged.sha256, staged.config_sha256) is not None:
            trash = self.staging / f"corrupt-{uuid.uuid4().hex}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        if final.is_dir():
            self.discard(staged)
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged.directory, final)
        except OSError:  # another manager committed the same content first
            if not final.is_dir():
                raise
            self.discard(staged)
        return final

    @staticmethod
    def discard(staged: StagedAdapter) -> None:
        shutil.rmtree(staged.directory, ignore_errors=True)


class UploadWriter:
    """Writes an upload's weights into a staging directory, hashing and bounding its size."""

    def __init__(self, store: BlobStore, config_json: bytes, max_bytes: int):
        self.store = store
        self.max_bytes = max_bytes
        self.directory = store.new_staging_dir()
        (self.directory / CONFIG_FILE).write_bytes(config_json)
        self.config_sha256 = hashlib.sha256(config_json).hexdigest()
        self._file = (self.directory / WEIGHTS_FILE).open("wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise errors.UploadTooLarge(
                f"upload exceeds max_upload_bytes ({self.max_bytes} bytes); the weights are larger"
            )
        self._digest.update(chunk)
        self._file.write(chunk)

    def finish(self) -> StagedAdapter:
        self._file.close()
        return StagedAdapter(self.directory, self._digest.hexdigest(), self.config_sha256, self.size)

    def abort(self) -> None:
        self._file.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def mismatch(name: str, got: str, registered: str) -> str | None:
    """What is wrong with a stored file hashing to `got`, or None if it matches."""
    return None if got == registered else f"{name} hashes to {got}, registered as {registered}"


def read_hashed(f, digest, size: int) -> bytes:
    """Read up to `size` bytes of `f` and add them to `digest` (blocking; run it on a thread)."""
    block = f.read(size)
    digest.update(block)
    return block


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(COPY_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _open(source: AdapterDir, name: str):
    try:
        return source.open(name)
    except FileNotFoundError as e:  # removed since it was listed
        raise errors.InvalidAdapter(f"{source.path}: {name} is missing") from e
