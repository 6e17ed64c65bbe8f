"""The one path from shard bytes to pixels: JPEG -> uint8 [N, 1, L, L] (short side to L,
centre crop), nvJPEG in batches on CUDA, libjpeg-turbo over a thread pool on a CPU. The
resident loader (decoded_cache=off) and the decoded cache both decode here, so the manifest's
checksums are checked in one place (read_payloads)."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from cxr_fast.errors import CxrError, one_line
from cxr_fast.loading.payloads import read_payloads
from cxr_fast.loading.workers import decode_threads

DECODE_CHUNK = 256
# torchvision 0.29 warns on every decode that TorchCodec will take over image decoding; the
# decoder itself is unchanged, and the warning would flood every training log.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def decode_rows(rows: pd.DataFrame, shards_dir: Path, load_size: int, device: torch.device,
                threads: int = 0) -> torch.Tensor:
    """The images of manifest `rows` as uint8 [N, 1, L, L] on `device`: the one path from shard
    bytes to pixels. The bytes are checked against the manifest's crc32 (read_payloads); an
    image that still does not decode (a manifest without checksums) is one line naming shard and key."""
    jpegs = read_payloads(rows, shards_dir)
    try:
        return decode_to_square(jpegs, load_size, device, threads)
    except RuntimeError as error:
        bad = _first_undecodable(jpegs)
        if bad is None:
            raise  # not the data's fault (out of memory, a driver error): keep the traceback
        index, problem = bad
        row = rows.iloc[index]
        raise CxrError(f"{Path(shards_dir) / str(row['shard'])}: {row['key']}: cannot decode its JPEG ({problem})") from error


def _first_undecodable(jpegs: list) -> tuple[int, str] | None:
    """Index and error of the first JPEG the CPU decoder refuses (searched only after a failure)."""
    for index, data in enumerate(jpegs):
        try:
            _decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)], torch.device("cpu"))
        except RuntimeError as error:
            return index, one_line(error, 120)
    return None


def decode_to_square(jpegs: list[bytes], load_size: int, device: torch.device, threads: int = 0) -> torch.Tensor:
    """JPEG bytes -> uint8 [N, 1, L, L]: short side resized to L (antialiased), centre crop.

    On CUDA the decode is nvJPEG in batches; on CPU libjpeg-turbo over a thread pool
    (torchvision's decoder releases the GIL).
    """
    out = torch.empty((len(jpegs), 1, load_size, load_size), dtype=torch.uint8, device=device)
    chunks = [range(start, min(start + DECODE_CHUNK, len(jpegs))) for start in range(0, len(jpegs), DECODE_CHUNK)]

    def fill(chunk: range) -> None:
        data = [torch.frombuffer(bytearray(jpegs[i]), dtype=torch.uint8) for i in chunk]
        images = _decode(data, device)
        for i, image in zip(chunk, images):
            out[i] = square_resize(image, load_size)

    run_chunks(fill, chunks, device, threads)
    return out


def run_chunks(fill, chunks: list[range], device: torch.device, threads: int = 0) -> None:
    """Call `fill` on every chunk: in order on CUDA, over a thread pool on a CPU."""
    if device.type != "cuda":
        with ThreadPoolExecutor(decode_threads(threads)) as pool:
            list(pool.map(fill, chunks))
        return
    for chunk in chunks:
        # nvJPEG decodes on its own stream and may reuse the previous chunk's buffers while
        # this stream's resize kernels still read them: let those kernels finish first.
        synchronize_stream(device)
        fill(chunk)


def synchronize_stream(device: torch.device) -> None:
    torch.cuda.current_stream(device).synchronize()


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        return decode_jpeg(data, mode=ImageReadMode.GRAY, device=device)
    return [decode_jpeg(item, mode=ImageReadMode.GRAY) for item in data]


def square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [1, H, W] -> uint8 [1, size, size]: short side to `size`, centre crop."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    if target != (height, width):
        resized = F.interpolate(image[None].float(), size=target, mode="bilinear", antialias=True, align_corners=False)
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    return image[:, top:top + size, left:left + size]
