"""A checkpoint's manifest: proof that its files are the ones the save wrote, and the check of that proof.

``checkpoint-<step>/manifest.json``, written last (to a temporary name, then renamed) once every other
file is in the directory::

    {"format": 1, "step": 4,
     "files": {"model.safetensors": {"size": 663552616, "sha256": "3f1c..."}, "trainer_state.pt": ..., ...},
     "sha256": "<SHA-256 of the lines above, as canonical JSON>"}

A checkpoint is *whole* when every file the manifest lists is there with its size and SHA-256, and the
manifest's own checksum holds; files it does not list (a user's notes) are ignored. ``verify`` names
the first file that breaks this and why: ``missing``, ``size``, ``checksum`` or ``unreadable``. It
checks every size before it hashes anything, and hashes the smallest files first, so a truncated or
deleted file costs nothing to find.

The files this package writes itself (``trainer_state.pt``, ``config.yaml``) are hashed as they are
written (``write_file``); the weights and tokenizer files, written by transformers / peft /
tokenizers, are read back once right after (still in the page cache), on background threads while
the trainer state is being written. Checking hashes the files in parallel too.

Checkpoints saved before manifests existed have none: they load after a cheap check of their structure
(a safetensors header that accounts for the file's length, a readable zip directory in ``.pt`` files,
JSON files that parse), with one line saying they cannot be verified. A checkpoint of this format says
so in the first line of its ``config.yaml`` (``MARK``), so one whose manifest was lost is not taken for
an old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

MANIFEST = "manifest.json"
FORMAT = 1
_MARK_PREFIX = "# grpo-cli checkpoint format"
MARK = f"{_MARK_PREFIX} {FORMAT}: whole only when {MANIFEST} matches its files\n"  # config.yaml's first line
_CHUNK = 1 << 20  # a write at least this long is hashed on a second thread while it is written


@dataclass(frozen=True)
class Damage:
    """What is wrong with one file of a checkpoint. ``reason``: missing | size | checksum | unreadable."""

    file: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason} ({self.detail})"


@dataclass(frozen=True)
class Verdict:
    """``damage`` None: whole. ``verified`` False: no manifest (an older checkpoint), structure checked only."""

    path: Path
    damage: Damage | None
    verified: bool

    @property
    def whole(self) -> bool:
        return self.damage is None

    def unverified_line(self) -> str:
        return (
            f"{self.path} has no {MANIFEST} (saved before checkpoints had one, or made elsewhere): "
            "its files cannot be verified"
        )


# ---------------------------------------------------------------------------- writing


class HashingWriter:
    """A binary file that hashes what goes through it: ``entry()`` is its manifest entry.

    A large chunk is hashed on a second thread while this one writes it (both let go of the GIL), so
    a chunk costs the longer of the two, not their sum; the chunks still enter the hash in order.
    ``error`` keeps the OSError a write raised: torch.save reports a failing writer as a RuntimeError
    without the cause (``unexpected pos``), and the cause (no space left, ...) is what the user needs.
    """

    def __init__(self, path: str | Path) -> None:
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close() / __exit__
        self._sha = hashlib.sha256()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256-write")
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data)
        hashing = self._thread.submit(self._sha.update, view) if view.nbytes >= _CHUNK else None
        try:
            written = self._file.write(view)
        except OSError as exc:
            self.error = exc
            raise
        finally:
            if hashing is not None:
                hashing.result()
        if hashing is None:
            self._sha.update(view)
        self.size += view.nbytes
        return written

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._thread.shutdown()
        self._file.close()

    def entry(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self._sha.hexdigest()}

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_file(path: str | Path, fill: Callable[[HashingWriter], Any]) -> dict[str, Any]:
    """Write ``path`` through ``fill(writer)``; returns its manifest entry, hashed on the way."""
    with HashingWriter(path) as writer:
        try:
            fill(writer)
            writer.flush()
        except RuntimeError:
            if writer.error is not None:  # the OSError underneath torch's RuntimeError
                raise writer.error from None
            raise
    return writer.entry()


def file_entry(path: str | Path) -> dict[str, Any]:
    """The manifest entry of a file already written (read once)."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": digest}


class Hasher:
    """SHA-256 of files on background threads, for one save or one check (a ``with`` block).

    hashlib lets go of the GIL, so files hash in parallel with each other and with whatever the caller
    writes meanwhile; leaving the block cancels what has not started and waits for the rest.
    """

    def __enter__(self) -> Hasher:
        self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="sha256")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def later(self, path: Path) -> Future:
        """``file_entry(path)``, computed in the background."""
        return self._pool.submit(file_entry, path)

    def all_files(self, directory: str | Path) -> dict[str, Future]:
        """Start hashing every file now in ``directory`` (the weights, while the trainer state is written)."""
        root = Path(directory)
        return {rel: self.later(root / rel) for rel in _files(root)}


def write(directory: str | Path, step: int, hashed: dict[str, Any] | None = None) -> Path:
    """``manifest.json`` for every file under ``directory``, atomically; returns its path.

    ``hashed``: entries computed while writing (``write_file``) or futures of them (``Hasher``), by
    path relative to ``directory``; an entry whose size no longer matches the file is computed again.
    """
    root = Path(directory)
    hashed = hashed or {}
    with Hasher() as hasher:
        pending = {rel: hashed.get(rel) or hasher.later(root / rel) for rel in _files(root)}
        files = {}
        for rel, known in pending.items():
            entry = known.result() if isinstance(known, Future) else known
            files[rel] = entry if entry["size"] == (root / rel).stat().st_size else file_entry(root / rel)
    body = {"format": FORMAT, "step": step, "files": files}
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({**body, "sha256": _checksum(body)}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)
    return root / MANIFEST


def _files(root: Path) -> list[str]:
    """Files under ``root`` by relative POSIX path, the manifest and its temporary excluded."""
    skip = {MANIFEST, f".{MANIFEST}.tmp"}
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name not in skip
    )


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------- checking


def verify(checkpoint: str | Path, need: Iterable[str] = ()) -> Verdict:
    """Whether ``checkpoint`` is whole; ``need``: files it must hold besides what its manifest lists."""
    path = Path(checkpoint).expanduser()
    if not (path / MANIFEST).is_file():
        if _marked(path):
            return Verdict(
                path, Damage(MANIFEST, "missing", "its config.yaml says it was saved with one"), True
            )
        return Verdict(path, _structure(path, need), verified=False)
    try:
        files = _read(path / MANIFEST)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return Verdict(path, Damage(MANIFEST, "unreadable", _why(exc)), True)
    return Verdict(path, _compare(path, files, need), True)


def _read(manifest: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` of a manifest whose own checksum holds; ValueError (or KeyError...) otherwise."""
    data = json.loads(manifest.read_bytes())
    claimed = data.pop("sha256")
    if data["format"] > FORMAT:
        raise ValueError(f"format {data['format']} is newer than this grpo-cli reads ({FORMAT})")
    if claimed != _checksum(data):
        raise ValueError("its contents do not match its own checksum")
    files = data["files"]
    for rel, entry in files.items():
        int(entry["size"]), str(entry["sha256"])  # noqa: B018 - the shape is checked here, once
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"it lists {rel!r}, outside the checkpoint")
    return files


def _compare(path: Path, files: dict[str, dict[str, Any]], need: Iterable[str]) -> Damage | None:
    """The first damaged file: missing ones, then wrong sizes (free to see), then checksums."""
    for rel in [*files, *need]:
        if not (path / rel).is_file():
            listed = "the manifest lists it" if rel in files else "the manifest does not list it"
            return Damage(rel, "missing", listed)
    for rel, entry in files.items():
        size = (path / rel).stat().st_size
        if size != entry["size"]:
            return Damage(rel, "size", f"{size:,} bytes, the manifest says {entry['size']:,}")
    order = sorted(files, key=lambda rel: files[rel]["size"])  # the cheapest answer first
    with Hasher() as hasher:  # in parallel; leaving early cancels the rest
        digests = {rel: hasher.later(path / rel) for rel in order}
        for rel in order:
            try:
                digest = digests[rel].result()["sha256"]
            except OSError as exc:
                return Damage(rel, "unreadable", _why(exc))
            if digest != files[rel]["sha256"]:
                return Damage(rel, "checksum", "its SHA-256 differs from the manifest's: the bytes changed")
    return None


def _marked(path: Path) -> bool:
    """Whether the checkpoint's config.yaml says it was saved with a manifest (``MARK``)."""
    try:
        with open(path / "config.yaml", "rb") as fh:
            return fh.readline().startswith(_MARK_PREFIX.encode())
    except OSError:
        return False


def _structure(path: Path, need: Iterable[str]) -> Damage | None:
    """The cheap checks an old checkpoint gets: needed files there, headers and directories readable."""
    for rel in need:
        if not (path / rel).is_file():
            return Damage(rel, "missing", "and no manifest either: an older or incomplete checkpoint")
    if not path.is_dir():
        return None
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            problem = _file_structure(file)
        except OSError as exc:
            problem = _why(exc)
        except (KeyError, TypeError, IndexError, AttributeError):
            problem = "its safetensors header is malformed"
        if problem:
            return Damage(file.name, "unreadable", problem)
    return None


def _file_structure(file: Path) -> str | None:
    """Why ``file`` cannot be a whole file of its kind, or None (unknown kinds pass)."""
    if file.suffix == ".safetensors":
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8 or (n := struct.unpack("<Q", head)[0]) > size - 8:
                return "its safetensors header is cut off"
            try:
                header = json.loads(fh.read(n))
            except ValueError:
                return "its safetensors header is not valid JSON"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            return f"{size:,} bytes, its safetensors header needs {8 + n + end:,}"
    elif file.suffix == ".pt":
        try:
            zipfile.ZipFile(file).close()
        except zipfile.BadZipFile:
            return "its zip directory is missing or cut off"
    elif file.suffix == ".json":
        try:
            json.loads(file.read_bytes())
        except ValueError:
            return "not valid JSON"
    return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())[:200] or type(exc).__name__
