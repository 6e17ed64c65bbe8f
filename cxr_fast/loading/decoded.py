"""The decoded cache: a shard folder's images decoded once per load size, mapped by every run.

`<shards>/decoded/<load>px-<digest>.u8` holds every manifest row (all splits, manifest order)
as uint8 `[N, 1, L, L]`, decoded by `loading.decode.decode_rows` (checksums checked). The first
run that needs a (shard set, load size) builds it under the shard folder's lock (locks.py),
to a temporary name that is renamed when complete; every later run, on any rank, maps it:
start-up is a read, and the processes of a node share one copy in the page cache.

The digest in the name (and again in the header) covers everything that decides the bytes:
the format version, the resize rule, the load size, the manifest's keys and byte ranges and
each shard's sha256 from meta.json. A changed shard set or rule gets another name, so no
stale cache is ever read.

File layout (docs/DATA_SPEC.md): MAGIC, the header's length (u64 little-endian), the header
(JSON), zero padding to a 4 KiB boundary, then the pixel data. The header lists a CRC-32 per
block of rows. Opening checks the size, the header and a few blocks (first, last, spread);
`decoded_cache=verify` checks every block (a full read of the file). Anything wrong: a
one-line warning, and the file is rebuilt, never trained on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from cxr_fast.errors import CxrError, one_line
from cxr_fast.io import atomic_path, remove_stale_temporaries
from cxr_fast.locks import LockHeld, describe, exclusive_lock, locks_enabled
from cxr_fast.schema import DECODED_CACHE_FOLDER

FORMAT_VERSION = 1
# decode.square_resize: short side to L (bilinear, antialiased, rounded), centre crop to L x L.
RESIZE_RULE = "short-side-bilinear-antialias-round-centre-crop"
MAGIC = b"CXRDEC\x00\x01"
ALIGN = 4096
BLOCK_BYTES = 1 << 20        # one CRC-32 per ~1 MiB of rows: an open reads a few MiB to check
BUILD_ROWS = 2048             # rows decoded per step of a build (bounds its memory)
SAMPLED_BLOCKS = 4           # blocks checked on every open besides size and header
LOCK_POLL_SECONDS = 2.0


class CacheInvalid(Exception):
    """A cache file that must not be read (why, in one line)."""


class CacheUnwritable(Exception):
    """The shard folder cannot take a cache (read-only, full): the run decodes in memory."""


def cache_digest(manifest: pd.DataFrame, shards_dir: Path, load_size: int) -> str:
    """16 hex digits of sha256 over what decides the cache's bytes."""
    import hashlib

    digest = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "resize_rule": RESIZE_RULE,
                                        "load_size": int(load_size)}, sort_keys=True).encode())
    digest.update("\n".join(manifest["key"].astype(str)).encode())
    digest.update("\n".join(manifest["shard"].astype(str)).encode())
    for column in ("offset", "nbytes"):
        digest.update(manifest[column].to_numpy(dtype=np.int64).tobytes())
    digest.update(json.dumps(shard_fingerprints(shards_dir, manifest["shard"].astype(str).unique()),
                             sort_keys=True).encode())
    return digest.hexdigest()[:16]


def shard_fingerprints(shards_dir: Path, names) -> dict[str, str]:
    """Each shard's sha256 from meta.json; a shard it does not list, by its size and mtime."""
    from cxr_fast.data.integrity import shard_records

    listed = shard_records(shards_dir)
    prints = {}
    for name in sorted(names):
        entry = listed.get(name)
        if isinstance(entry, dict) and entry.get("sha256"):
            prints[name] = entry["sha256"]
        else:
            stat = (shards_dir / name).stat()
            prints[name] = f"size {stat.st_size} mtime {stat.st_mtime_ns}"
    return prints


def cache_path(shards_dir: Path, load_size: int, digest: str) -> Path:
    return Path(shards_dir) / DECODED_CACHE_FOLDER / f"{load_size}px-{digest}.u8"


def block_rows(load_size: int) -> int:
    return max(1, BLOCK_BYTES // (load_size * load_size))


# ------------------------------------------------------------------ reading


def open_cache(path: Path, *, digest: str, load_size: int, rows: int, verify: bool = False) -> np.memmap:
    """The cache's images, memory-mapped read-only; CacheInvalid when it must not be read."""
    try:
        with open(path, "rb") as handle:
            header = read_header(handle, path)
            expected = {"format": FORMAT_VERSION, "digest": digest, "load_size": load_size,
                        "resize_rule": RESIZE_RULE, "rows": rows}
            for key, value in expected.items():
                if header.get(key) != value:
                    raise CacheInvalid(f"header {key} {header.get(key)!r}, expected {value!r}")
            size = os.fstat(handle.fileno()).st_size
            if size != header["data_offset"] + header["data_bytes"]:
                raise CacheInvalid(f"{size} bytes, expected {header['data_offset'] + header['data_bytes']} "
                                   "(truncated or overwritten)")
            check_blocks(handle, header, every=verify)
    except OSError as error:
        raise CacheInvalid(f"cannot read it ({one_line(error)})") from error
    # Copy-on-write: the pages are the shared page cache's as long as nobody writes (nothing
    # does), and torch takes the array without its warning about read-only memory.
    return np.memmap(path, dtype=np.uint8, mode="c", offset=header["data_offset"],
                     shape=(rows, 1, load_size, load_size))


def read_header(handle, path: Path) -> dict:
    start = handle.read(len(MAGIC) + 8)
    if len(start) < len(MAGIC) + 8 or start[:len(MAGIC)] != MAGIC:
        raise CacheInvalid("not a decoded cache of this format (magic bytes differ)")
    (length,) = struct.unpack("<Q", start[len(MAGIC):])
    try:
        header = json.loads(handle.read(min(length, 64 << 20)))
        int(header["data_offset"]), int(header["data_bytes"]), list(header["block_crc32"])
    except (ValueError, KeyError, TypeError) as error:
        raise CacheInvalid(f"unreadable header ({one_line(error, 80)})") from None
    return header


def check_blocks(handle, header: dict, *, every: bool) -> None:
    """CRC-32 of every block (`every`), or of the first, the last and a few spread between."""
    crcs = header["block_crc32"]
    block_bytes = header["block_rows"] * header["load_size"] ** 2
    if every or len(crcs) <= SAMPLED_BLOCKS:
        chosen = range(len(crcs))
    else:
        chosen = sorted(set(np.linspace(0, len(crcs) - 1, SAMPLED_BLOCKS).round().astype(int).tolist()))
    for block in chosen:
        start = block * block_bytes
        length = min(block_bytes, header["data_bytes"] - start)
        data = os.pread(handle.fileno(), length, header["data_offset"] + start)
        if zlib.crc32(data) != crcs[block]:
            raise CacheInvalid(f"block {block} fails its checksum (corrupt)")


# ------------------------------------------------------------------ building


def decoded_chunks(rows: pd.DataFrame, shards_dir: Path, load_size: int, *, device,
                   threads: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, uint8 [n, 1, L, L] on the host) for `rows`, a few thousand rows (whole
    checksum blocks) at a time, decoded by the resident loader's decoder on `device`."""
    from cxr_fast.loading.decode import decode_rows

    step = block_rows(load_size) * max(1, BUILD_ROWS // block_rows(load_size))
    for start in range(0, len(rows), step):
        chunk = rows.iloc[start:start + step]
        yield start, decode_rows(chunk, shards_dir, load_size, device, threads).cpu().numpy()


def build_cache(path: Path, manifest: pd.DataFrame, shards_dir: Path, load_size: int, *, digest: str, device,
                threads: int = 0) -> None:
    """Write the cache of `manifest`'s rows to a temporary name, then rename it to `path`.
    Written with pwrite, not through a mapping: a full disk is an OSError, not a SIGBUS."""
    import torch

    rows_per_block, image_bytes = block_rows(load_size), load_size * load_size
    blocks = math.ceil(len(manifest) / rows_per_block)
    crcs = [0] * blocks
    # Room for the header: its fixed fields, then at most 11 characters per block checksum.
    data_offset = ALIGN * math.ceil((len(MAGIC) + 8 + 1024 + 11 * blocks) / ALIGN)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        for start, images in decoded_chunks(manifest, shards_dir, load_size, device=device, threads=threads):
            flat = images.reshape(len(images), -1)
            for offset in range(0, len(images), rows_per_block):
                crcs[(start + offset) // rows_per_block] = zlib.crc32(flat[offset:offset + rows_per_block])
            write_at(handle.fileno(), flat, data_offset + start * image_bytes)
        header = {"format": FORMAT_VERSION, "digest": digest, "load_size": load_size, "resize_rule": RESIZE_RULE,
                  "rows": len(manifest), "data_offset": data_offset, "data_bytes": len(manifest) * image_bytes,
                  "block_rows": rows_per_block, "block_crc32": crcs,
                  "decoder": "nvJPEG (cuda)" if torch.device(device).type == "cuda" else "libjpeg-turbo (cpu)",
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(MAGIC) + 8 + len(text) > data_offset:
            raise AssertionError(f"decoded-cache header of {len(text)} bytes overflows its {data_offset} bytes")
        write_at(handle.fileno(), MAGIC + struct.pack("<Q", len(text)) + text, 0)
        handle.truncate(data_offset + len(manifest) * image_bytes)  # an empty manifest: the header alone
        handle.flush()
        os.fsync(handle.fileno())


def write_at(fd: int, data, offset: int) -> None:
    """All of `data` at `offset` (pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def remove_superseded(path: Path) -> None:
    """Other caches of the same load size in the folder: built from a shard set that is gone
    (the folder holds one shard set). A run still mapping one keeps its pages until it ends."""
    for old in path.parent.glob(path.name.split("-")[0] + "-*.u8"):
        if old != path:
            old.unlink(missing_ok=True)


# ------------------------------------------------------------------ the one entry point


def cached_images(manifest: pd.DataFrame, shards_dir: Path, load_size: int, *, device, threads: int = 0,
                  verify: bool = False) -> np.memmap | None:
    """Every manifest row decoded at `load_size`, from the cache (built first when missing or
    invalid). None when the shard folder cannot hold a cache (read-only, full): the caller
    decodes in memory, as without a cache."""
    shards_dir = Path(shards_dir)
    digest = cache_digest(manifest, shards_dir, load_size)
    path = cache_path(shards_dir, load_size, digest)
    arguments = {"digest": digest, "load_size": load_size, "rows": len(manifest)}
    if path.is_file():
        with contextlib.suppress(CacheInvalid):
            return open_cache(path, verify=verify, **arguments)
    try:
        with contextlib.ExitStack() as stack:
            wait_for_lock(shards_dir, stack)
            problem = None
            if path.is_file():  # built (or still broken) while we waited
                try:
                    return open_cache(path, verify=verify, **arguments)
                except CacheInvalid as error:
                    problem = str(error)
            if problem:
                print(f"{path}: {problem}; rebuilding it", file=sys.stderr, flush=True)
            build_under_lock(path, manifest, shards_dir, load_size, digest=digest, device=device, threads=threads)
    except CacheUnwritable as error:
        print(f"{shards_dir}: cannot write the decoded cache ({error}); decoding in memory for this run",
              file=sys.stderr, flush=True)
        return None
    return open_cache(path, **arguments)


def build_under_lock(path: Path, manifest: pd.DataFrame, shards_dir: Path, load_size: int, *, digest: str, device,
                     threads: int) -> None:
    """Build the cache (the caller holds the lock); a write that fails is CacheUnwritable, a
    shard that cannot be read stays the error it is."""
    started = time.perf_counter()
    try:
        # A build killed mid-write left its temporary; holding the lock, nobody else writes now
        # (with locks off another process may: leave its file alone).
        if path.parent.is_dir() and locks_enabled():
            remove_stale_temporaries(path.parent)
        build_cache(path, manifest, shards_dir, load_size, digest=digest, device=device, threads=threads)
        remove_superseded(path)
    except OSError as error:
        raise CacheUnwritable(one_line(error, 120)) from error
    except CxrError as error:  # io.atomic_path reports OS faults as one line: a full or read-only disk
        if not isinstance(error.__cause__, OSError):
            raise  # a shard that cannot be read
        raise CacheUnwritable(str(error)) from error
    print(f"{path}: decoded {len(manifest)} images once for every later run "
          f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)


def wait_for_lock(folder: Path, stack: contextlib.ExitStack) -> None:
    """Hold the shard folder's lock, waiting while another process (a cache build, a shard
    writer) holds it: its result is what this process then reads."""
    announced = False
    while True:
        try:
            stack.enter_context(exclusive_lock(folder, what="process (cache build or shard writer)"))
            return
        except LockHeld as held:
            if not announced:
                print(f"{folder}: waiting for {describe(held.holder)} to finish writing there",
                      file=sys.stderr, flush=True)
                announced = True
            wait_a_moment()
        except CxrError as error:  # the folder cannot be written (exclusive_lock's one line)
            raise CacheUnwritable(one_line(error, 120)) from error


def wait_a_moment() -> None:
    time.sleep(LOCK_POLL_SECONDS)


# ------------------------------------------------------------------ a split's images on the host


class HostImages:
    """A split's images on the host: row i is `source[positions[i]]` (the mapped cache, or an
    array decoded for this run alone)."""

    def __init__(self, source: np.ndarray, positions: np.ndarray):
        self.source, self.positions = source, positions

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def load_size(self) -> int:
        return self.source.shape[-1]

    def gather(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 [len(indices), 1, L, L]: the rows `indices` of the split (into `out` if given)."""
        # mode="clip": with `out`, the default mode="raise" gathers through a buffer (a second
        # copy); positions are valid by construction (host_images checks them).
        return np.take(self.source, self.positions[np.asarray(indices, dtype=np.int64)], axis=0, out=out, mode="clip")


def host_images(rows: pd.DataFrame, shards_dir: Path, load_size: int, *, device, threads: int = 0,
                cache: str = "on") -> HostImages:
    """`rows` decoded at `load_size`: mapped from the decoded cache (cache `on`/`verify`), or
    decoded in memory for this run (cache `off`, a folder that cannot hold a cache, or rows
    read by offset from a folder without a manifest, which a cache could not name)."""
    from cxr_fast.loading.payloads import read_manifest
    from cxr_fast.schema import MANIFEST_FILE

    if cache != "off" and (Path(shards_dir) / MANIFEST_FILE).is_file():
        manifest = read_manifest(shards_dir)
        source = cached_images(manifest, shards_dir, load_size, device=device, threads=threads,
                               verify=cache == "verify")
        if source is not None:
            positions = pd.Index(manifest["key"]).get_indexer(rows["key"])
            if (positions < 0).any():
                missing = rows["key"].iloc[int(np.flatnonzero(positions < 0)[0])]
                raise CxrError(f"{Path(shards_dir) / 'manifest.parquet'}: no row for image {missing!r}")
            return HostImages(source, positions.astype(np.int64))
    decoded = np.empty((len(rows), 1, load_size, load_size), dtype=np.uint8)
    for start, images in decoded_chunks(rows, shards_dir, load_size, device=device, threads=threads):
        decoded[start:start + len(images)] = images
    return HostImages(decoded, np.arange(len(rows), dtype=np.int64))
