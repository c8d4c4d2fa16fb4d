"""The ``MANIFEST.json`` of a sparsejax checkpoint: the size and sha256 of every file of
one step folder, wrapped with a checksum of its own, and the check of a folder against
it. Written by the primary process into orbax's temporary folder after every process has
written and before orbax's commit rename (:mod:`sparsejax.io.checkpoint`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

FORMAT_NAME = "sparsejax.checkpoint"
FORMAT_VERSION = 2  # 1: the hand-written format (read only); 2: orbax CheckpointManager
MANIFEST_NAME = "MANIFEST.json"
# orbax rewrites its step metadata (commit time) in the commit itself, after our hook; the
# manifest leaves it out (restoring does not read it)
ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
_CHUNK = 1 << 20


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def manifest_bytes(body: dict[str, Any]) -> bytes:
    wrapped = {"body": body, "body_sha256": hashlib.sha256(_canonical_json(body)).hexdigest()}
    return json.dumps(wrapped, sort_keys=True, indent=1).encode()


def write_manifest(folder: Path, step: int) -> None:
    """Hash every file under ``folder`` (a finished, uncommitted step) into its manifest."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            full = Path(dirpath) / name
            rel = full.relative_to(folder).as_posix()
            if rel not in (MANIFEST_NAME, ORBAX_STEP_METADATA) and full.is_file():
                files[rel] = {"size": full.stat().st_size, "sha256": hash_file(full)}
    body = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": step,
            "created_unix": time.time(), "orbax_checkpoint_version": ocp.__version__,
            "files": dict(sorted(files.items()))}
    with open(folder / MANIFEST_NAME, "wb") as f:
        f.write(manifest_bytes(body))
        f.flush()
        os.fsync(f.fileno())


def manifest_problem(path: Path, step: int, checksums: bool) -> str | None:
    """Why the files of checkpoint ``path`` disagree with its manifest, or ``None``."""
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return (f"no {MANIFEST_NAME}: not a completed save (partly deleted, altered, or "
                "not written by sparsejax)")
    try:
        wrapped = json.loads(manifest.read_bytes())
        body, recorded = wrapped["body"], wrapped["body_sha256"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_NAME} is unreadable ({e})"
    if hashlib.sha256(_canonical_json(body)).hexdigest() != recorded:
        return f"{MANIFEST_NAME} checksum mismatch (manifest altered)"
    if body.get("format") != FORMAT_NAME or not isinstance(body.get("files"), dict):
        return f"{MANIFEST_NAME} is not a {FORMAT_NAME} manifest"
    if not isinstance(body.get("version"), int) or body["version"] > FORMAT_VERSION:
        return f"unsupported format version {body.get('version')!r}"
    if body.get("step") != step:
        return f"manifest is for step {body.get('step')}, not {step}"
    for rel, info in sorted(body["files"].items()):
        f = path / rel
        if not f.is_file():
            return f"file {rel} is missing"
        size = f.stat().st_size
        if size != info["size"]:
            kind = "truncated" if size < info["size"] else "has the wrong size"
            return f"file {rel} is {kind} ({size} bytes, manifest says {info['size']})"
        if checksums and hash_file(f) != info["sha256"]:
            return f"file {rel} checksum mismatch (sha256 differs from manifest)"
    return None
