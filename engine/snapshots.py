"""Snapshots on disk: written atomically, every byte checked before use.

A snapshot of base path B is three files: B.safetensors (cache and source-map tensors),
B.index.sqlite (the passage index, when there is one) and B.json (the manifest). The manifest is
written last and names the SHA-256, shape and dtype of every tensor and the hash of the index file,
and carries a checksum of itself; each file is first written to a temporary name in the same folder
and then renamed, so an interrupted save leaves either the old snapshot or files whose hashes do
not match (refused), never a half-written snapshot that loads. Loading checks everything before a
tensor is used: any mismatch is one line naming the file, never a traceback or a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import UserError

VERSION = 2  # 2: checksums and shapes in the manifest (1 had none; still read, unverified)


def base_of(path: str | os.PathLike) -> Path:
    p = str(path)
    for suffix in (".json", ".safetensors", ".index.sqlite"):
        if p.endswith(suffix):
            return Path(p[: -len(suffix)])
    return Path(p)


def files(base: Path) -> tuple[Path, Path, Path]:
    """(manifest, tensors, index) paths of a snapshot."""
    return Path(f"{base}.json"), Path(f"{base}.safetensors"), Path(f"{base}.index.sqlite")


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a save path that cannot be written (a file in the way, no permission)."""
    base = base_of(path)
    probe = base.parent
    while not probe.exists():  # the nearest folder that exists must be a writable folder
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot save to {base}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot save to {base}: {probe} is not writable")
    for f in files(base):
        if f.is_dir():
            raise UserError(f"cannot save to {base}: {f} is a folder")
    return base


def _sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (hashlib.file_digest needs Python 3.11; we support 3.10)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the manifest without its own "checksum" field (edit a manifest: recompute this)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # on disk before it takes the real name
    os.replace(tmp, final)


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], manifest: dict, index=None) -> Path:
    """Write a snapshot atomically; `index` is a recall.PassageIndex or None. Returns the base path."""
    from safetensors.torch import save_file

    base = check_writable(path)
    man_path, data_path, index_path = files(base)
    tmp = lambda p: p.with_name(f".{p.name}.tmp-{os.getpid()}")  # noqa: E731 (not *.json: never listed)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    manifest = {**manifest, "version": VERSION,
                "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                                "sha256": _sha256_tensor(v)} for k, v in tensors.items()}}
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp(data_path)))
        if index is not None:
            index.save(tmp(index_path))
            manifest["index_sha256"] = sha256_file(tmp(index_path))
        manifest["checksum"] = manifest_checksum(manifest)
        tmp(man_path).write_text(json.dumps(manifest, indent=1))
        _replace(tmp(data_path), data_path)
        if index is not None:
            _replace(tmp(index_path), index_path)
        elif index_path.exists():
            index_path.unlink()  # an older save's index would not fit this one
        _replace(tmp(man_path), man_path)  # last: the snapshot exists once its manifest does
    except OSError as e:
        raise UserError(f"cannot save to {base}: {e.strerror or e}") from None
    finally:
        for p in (data_path, index_path, man_path):
            tmp(p).unlink(missing_ok=True)
    return base


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], Path | None]:
    """Read and verify a snapshot: (manifest, tensors, index path or None). One-line UserError otherwise."""
    from safetensors.torch import load_file

    base = base_of(path)
    man_path, data_path, index_path = files(base)
    if not man_path.exists() or not data_path.exists():
        raise UserError(f"{base}: no snapshot there (need {man_path.name} and {data_path.name})")
    try:
        man = json.loads(man_path.read_text())
        if not isinstance(man, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{man_path}: not a snapshot manifest (unreadable JSON)") from None
    # Format 1 (before checksums) is read as it always was, with nothing to verify it against. A
    # damaged format-2 manifest cannot pass for one: a byte flip cannot remove both its "checksum" and
    # "tensors" keys and still be JSON.
    legacy = man.get("version") == 1 and "checksum" not in man and "tensors" not in man
    if not legacy and man.get("version") != VERSION:
        raise UserError(f"{man_path}: snapshot format {man.get('version')} is not supported (this version "
                        f"reads formats 1 and {VERSION}); read the document again to make a new snapshot")
    if not legacy and man.get("checksum") != manifest_checksum(man):
        raise UserError(f"{man_path}: the manifest is damaged (checksum mismatch)")
    try:
        tensors = load_file(str(data_path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise UserError(f"{data_path}: damaged snapshot ({type(e).__name__})") from None
    if not legacy:
        _verify_tensors(man.get("tensors") or {}, tensors, data_path)
    if not (man.get("index") if legacy else "index_sha256" in man):
        return man, tensors, None
    if not index_path.exists():
        raise UserError(f"{index_path}: missing (the snapshot says it has a passage index)")
    if not legacy and sha256_file(index_path) != man["index_sha256"]:
        raise UserError(f"{index_path}: changed since it was saved (checksum mismatch)")
    return man, tensors, index_path


def _verify_tensors(want: dict, tensors: dict[str, torch.Tensor], data_path: Path) -> None:
    """Every tensor the manifest names, with its shape, dtype and SHA-256, and no other."""
    if set(want) != set(tensors):
        raise UserError(f"{data_path}: does not match its manifest (other tensors; an interrupted save?)")
    for name, t in tensors.items():
        w = want[name]
        if list(t.shape) != w["shape"] or str(t.dtype).removeprefix("torch.") != w["dtype"]:
            raise UserError(f"{data_path}: tensor {name} has shape {list(t.shape)} {t.dtype}, the manifest "
                            f"says {w['shape']} {w['dtype']} (an interrupted save?)")
        if _sha256_tensor(t) != w["sha256"]:
            raise UserError(f"{data_path}: tensor {name} is damaged (checksum mismatch)")
