"""The decoded-image cache: image files decoded and resized once, into a ``.npy`` file on disk that
every process (each sweep worker and trial, each restart) reads instead of decoding again.

An entry is keyed by the file list, each file's size and modification time, the image size and the
colour mode, and lives in ``cache_dir()``: ``TRIPLETLAB_CACHE`` when set, else
``$XDG_CACHE_HOME/tripletlab`` or ``~/.cache/tripletlab``. Deleting the folder clears the cache.

An entry is ``<dataset>-<content>.npy`` (uint8 (N, C, H, W)), ``.sums.npy`` (each image's
per-channel pixel sums, for exact normalisation statistics) and ``.json``, the index, written last:
an entry without its index is unfinished. It is built by one process under a file lock, into
temporary files renamed into place, so concurrent processes decode once and never read a
half-written entry. On opening, the index, the ``.npy`` header, the file sizes and a digest of the
sums and of sampled rows are checked; an entry failing any check is rebuilt, as is an entry whose
files changed (a new key; the old entries of the same file list are removed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from experiments.data.image_decoding import common_mode, read_resized
from experiments.data.image_store import CachedImages

CACHE_ENV = "TRIPLETLAB_CACHE"
FORMAT = 1
SAMPLED_ROWS = 64  # rows whose bytes the digest covers (reading all would make opening slow)
MODES = ("auto", "L", "RGB")  # auto: "L" when every file is grey, else "RGB"


def cache_dir() -> Path:
    """The cache folder: ``TRIPLETLAB_CACHE``, else the user's cache directory."""
    configured = os.environ.get(CACHE_ENV, "")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "") or Path.home() / ".cache"
    return Path(base) / "tripletlab"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def _file_stats(files: list[Path]) -> list[list[int]]:
    stats = []
    for file in files:
        try:
            stat = os.stat(file)
        except OSError as exc:
            raise ValueError(
                f"{file}: cannot read it ({exc.strerror}); restore the file or remove it from the dataset"
            ) from None
        stats.append([stat.st_size, stat.st_mtime_ns])
    return stats


def _sampled_rows(count: int) -> list[int]:
    return sorted(set(np.linspace(0, count - 1, min(count, SAMPLED_ROWS)).astype(int).tolist()))


def _progress_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("TRIPLETLAB_PROGRESS", "1") != "0"


def _decode(file: Path, mode: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    image = read_resized(file, mode, size)
    pixels = image.reshape(image.shape[0], -1).astype(np.int64)
    return image, np.stack([pixels.sum(axis=1), (pixels * pixels).sum(axis=1)])


def _open_entry(stem: Path, key: str, count: int) -> CachedImages | None:
    """The entry at ``stem`` if it is complete, has ``key`` and passes every check, else ``None``."""
    try:
        index = json.loads(stem.with_suffix(".json").read_text())
        if index.get("format") != FORMAT or index.get("key") != key or index.get("count") != count:
            return None
        shape = tuple(index["shape"])
        with open(stem.with_suffix(".npy"), "rb") as file:
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }[np.lib.format.read_magic(file)]
            header_shape, fortran, dtype = read_header(file)
            offset = file.tell()
            if header_shape != shape or fortran or dtype != np.uint8 or offset != index["offset"]:
                return None
            if os.fstat(file.fileno()).st_size != offset + int(np.prod(shape)):
                return None
            sums = np.load(stem.with_suffix(".sums.npy"))
            if sums.shape != (count, 2, shape[1]) or sums.dtype != np.int64:
                return None
            store = CachedImages(stem.with_suffix(".npy"), offset, shape, sums)
            digest = hashlib.sha256(sums.tobytes())
            digest.update(store.gather(torch.tensor(_sampled_rows(count))).numpy().tobytes())
            return store if digest.hexdigest() == index["digest"] else None
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _remove_entries(folder: Path, dataset: str) -> None:
    for path in folder.glob(f"{dataset}-*"):
        path.unlink(missing_ok=True)


def _build(stem: Path, key: str, files: list[Path], size: tuple[int, int], mode: str, workers: int) -> None:
    """Decode ``files`` into the entry at ``stem``: temporary files, then renamed, the index last."""
    mode = common_mode(files) if mode == "auto" else mode
    shape = (len(files), 1 if mode == "L" else 3, *size)
    sums = np.empty((len(files), 2, shape[1]), dtype=np.int64)
    sampled, digest = set(_sampled_rows(len(files))), hashlib.sha256()
    temporary = {
        suffix: stem.with_name(f"{stem.name}.{os.getpid()}.tmp{suffix}")
        for suffix in (".npy", ".sums.npy", ".json")
    }
    try:
        with (
            open(temporary[".npy"], "wb") as out,
            ThreadPoolExecutor(workers) as pool,
            tqdm(
                total=len(files),
                desc=f"decoding {len(files)} images into {stem.parent}",
                unit="img",
                disable=not _progress_enabled(),
            ) as bar,
        ):
            np.lib.format.write_array_header_1_0(
                out, {"descr": "|u1", "fortran_order": False, "shape": shape}
            )
            offset = out.tell()
            chunk = 64 * workers  # bounds the decoded images waiting to be written
            sampled_bytes = []
            for first in range(0, len(files), chunk):
                decoded = pool.map(lambda file: _decode(file, mode, size), files[first : first + chunk])
                for row, (image, image_sums) in enumerate(decoded, start=first):
                    out.write(np.ascontiguousarray(image).tobytes())
                    sums[row] = image_sums
                    if row in sampled:
                        sampled_bytes.append(np.ascontiguousarray(image).tobytes())
                    bar.update()
            out.flush()
            os.fsync(out.fileno())
        np.save(temporary[".sums.npy"], sums)
        digest.update(sums.tobytes())
        for data in sampled_bytes:
            digest.update(data)
        index = {
            "format": FORMAT,
            "key": key,
            "count": len(files),
            "shape": list(shape),
            "mode": mode,
            "offset": offset,
            "digest": digest.hexdigest(),
            "first_file": str(files[0]),
        }
        temporary[".json"].write_text(json.dumps(index))
        for suffix in (".npy", ".sums.npy", ".json"):  # the index last: it marks the entry complete
            os.replace(temporary[suffix], stem.with_suffix(suffix))
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def decoded_images(
    files: list[Path], size: tuple[int, int], mode: str = "auto", workers: int | None = None
) -> CachedImages:
    """``files`` decoded to ``mode`` and resized to ``size`` (height, width), from the cache: opened
    when a valid entry exists, else decoded in ``workers`` threads (default: up to 8, one per
    core) with a progress bar, by one process while the others wait for it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not files:
        raise ValueError("no image files to decode")
    files = [Path(os.path.abspath(file)) for file in files]
    dataset = _digest([FORMAT, [str(file) for file in files], list(size), mode])[:16]
    key = _digest([dataset, _file_stats(files)])[:16]
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"cannot create the image cache folder {folder} ({exc.strerror}); set {CACHE_ENV} "
            "to a writable folder"
        ) from None
    stem = folder / f"{dataset}-{key}"
    store = _open_entry(stem, key, len(files))
    if store is not None:
        return store
    with _locked(folder / f"{dataset}.lock"):
        store = _open_entry(stem, key, len(files))  # another process may have built it meanwhile
        if store is None:
            _remove_entries(folder, dataset)
            _build(stem, key, files, size, mode, workers or min(8, os.cpu_count() or 1))
            store = _open_entry(stem, key, len(files))
    if store is None:
        raise RuntimeError(
            f"{stem}.npy: the decoded-image cache entry just written fails its checks; "
            f"is another program writing to {folder}?"
        )
    return store
