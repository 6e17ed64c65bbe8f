"""The `dali` loader: stream JPEGs from the shards through a DALI pipeline, every epoch.

For data that does not fit the device: nothing but the manifest's byte offsets stays in host
memory. Each batch, the sampler's indices become JPEG bytes read with `os.pread` from shard
files kept open, fed to the pipeline by `fn.external_source` together with the batch's
augmentation parameters. DALI decodes (nvJPEG, `device="mixed"`, on a GPU; libjpeg-turbo on
CPU threads without one) and augments while the training step runs: the pipeline keeps
`prefetch` batches in flight.

Same images and same augmentation as the `resident` loader:
- stored image = the resident loader's square: short side resized to `load_size`
  (antialiased linear), centre crop. One `fn.resize` with a per-sample ROI does both; when
  every stored JPEG already is `load_size` square (256 px shards at 224 px) it is skipped.
- eval = centre crop of `image_size`, normalised (`fn.crop_mirror_normalize`).
- train = `augment.draw_params` with `augment.batch_generator(seed, epoch, batch)`, so both
  loaders draw the same random numbers for the same batch, and the two kernels of
  augment.py (`mode`, default `augment.default_mode(device)`):
  `affine` (GPU): crop window, rotation and flip become one per-sample matrix for
  `fn.warp_affine` - exactly the geometry of `augment._affine_crop` (grid_sample, bilinear,
  border clamp);
  `crop` (CPU): no rotation, as the resident loader on a CPU; the drawn window is one
  `fn.resize` with a per-sample relative ROI (a flip swaps its x ends) - which equals
  `_affine_crop` at angle 0 (DALI's CPU warp is slower than its resize). Unlike the resident
  `crop` kernel, every sample keeps its own crop size and sub-pixel position.
  Then brightness/contrast around the per-image mean, clamp and normalisation
  (`augment._jitter`, `augment.normalize`) as one fused DALI arithmetic expression.

Output: float32 [B, 1, S, S] on `device`, handed to torch by DLPack without a copy (the
default DALI executor allocates every output afresh, so a batch stays valid after the next
one is produced).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import nvidia.dali.math as dali_math  # make_loader checks that DALI is installed before importing this module
import pandas as pd
import torch
from nvidia.dali import fn, pipeline_def, types

from cxr_fast.loading.payloads import ShardReader
from cxr_fast.loading.prefetch import Prefetched
from cxr_fast.loading.workers import decode_threads
from cxr_fast.loading.augment import (
    MEAN,
    STD,
    AugmentSettings,
    BatchParams,
    batch_generator,
    default_mode,
    draw_params,
)

PREFETCH = 2  # batches in flight: decode of batch k+1..k+2 overlaps the step on batch k


def stored_rois(heights: np.ndarray, widths: np.ndarray, load_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image source ROI (y0, x0), (y1, x1) whose resize to L x L is the resident loader's square.

    `decode.square_resize`: short side to L (long side rounded), then crop at
    ((H'-L)//2, (W'-L)//2). Resizing that crop's footprint in the source straight to L x L
    is the same sampling (same scale, same centres) without the intermediate image.
    """
    starts, ends = [], []
    for height, width in zip(heights.tolist(), widths.tolist()):
        scale = load_size / min(height, width)
        target_h, target_w = max(load_size, round(height * scale)), max(load_size, round(width * scale))
        top, left = (target_h - load_size) // 2, (target_w - load_size) // 2
        step_y, step_x = height / target_h, width / target_w
        starts.append((top * step_y, left * step_x))
        ends.append(((top + load_size) * step_y, (left + load_size) * step_x))
    return np.asarray(starts, dtype=np.float32), np.asarray(ends, dtype=np.float32)


def warp_matrices(params: BatchParams, *, load_size: int, image_size: int) -> np.ndarray:
    """float32 [B, 2, 3] destination->source pixel maps for fn.warp_affine.

    `augment._affine_crop` maps output (x, y) in [-1, 1] (align_corners=False) to input
    centre + R(angle) diag(scale_x * flip, scale_y) (x, y). In DALI's pixel coordinates
    ([0, 0] = corner of the first pixel) that is u = L/2 (1 + x_in), x = 2 X / S - 1.
    """
    cos, sin = np.cos(params.angle.numpy()), np.sin(params.angle.numpy())
    scale_x = params.crop_w.numpy() * np.where(params.flip.numpy(), -1.0, 1.0)
    scale_y = params.crop_h.numpy()
    centre_x = (params.left.numpy() + params.crop_w.numpy() / 2) * 2 - 1
    centre_y = (params.top.numpy() + params.crop_h.numpy() / 2) * 2 - 1
    a11, a12 = cos * scale_x, -sin * scale_y
    a21, a22 = sin * scale_x, cos * scale_y
    ratio, half = load_size / image_size, load_size / 2
    matrix = np.stack([
        np.stack([ratio * a11, ratio * a12, half * (1 + centre_x - a11 - a12)], axis=1),
        np.stack([ratio * a21, ratio * a22, half * (1 + centre_y - a21 - a22)], axis=1),
    ], axis=1)
    return matrix.astype(np.float32)


def crop_windows(params: BatchParams) -> tuple[np.ndarray, np.ndarray]:
    """float32 [B, 2] ROI start and end (y, x) relative to the stored square, for `crop` mode.

    The drawn window exactly (per-sample size and sub-pixel position); a flip swaps the x ends.
    """
    top, left = params.top.numpy(), params.left.numpy()
    bottom, right = top + params.crop_h.numpy(), left + params.crop_w.numpy()
    flip = params.flip.numpy()
    start = np.stack([top, np.where(flip, right, left)], axis=1).astype(np.float32)
    end = np.stack([bottom, np.where(flip, left, right)], axis=1).astype(np.float32)
    return start, end


class DaliLoader:
    """Batches of one split, decoded and augmented by DALI every epoch."""

    name = "dali"

    def __init__(self, rows: pd.DataFrame, shards_dir: Path, settings: AugmentSettings, *,
                 device: torch.device, batch_size: int, seed: int = 0, rank: int = 0, threads: int = 0, prefetch: int = PREFETCH,
                 mode: str | None = None):
        self.settings = settings
        self.mode = mode or default_mode(torch.device(device))
        if self.mode not in ("affine", "crop"):
            raise ValueError(f"unknown augmentation mode {self.mode!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank  # augmentation draws differ per process
        self.threads = decode_threads(threads)
        self.prefetch = max(1, prefetch)
        self.reader = ShardReader(rows, shards_dir)
        heights, widths = _image_sizes(rows, self.reader)
        load = settings.load_size
        # No resize at all when every stored JPEG is already the L x L square.
        self.resize = bool(np.any(heights != load) or np.any(widths != load))
        self.roi_start, self.roi_end = stored_rois(heights, widths, load)
        self._pipes: dict[str, object] = {}
        self._feeds: dict[str, Iterator[tuple]] = {}  # per mode: the inputs of the pass under way
        self._running: set[str] = set()  # modes whose pipeline is mid-pass

    def __len__(self) -> int:
        return len(self.reader)

    # ------------------------------------------------------------------ batches

    def train_batches(self, indices: np.ndarray, *, epoch: int) -> Iterator[torch.Tensor]:
        """Augmented batches of `indices` (full batches only: a ragged tail would retrace compile)."""
        indices = np.asarray(indices, dtype=np.int64)
        settings = self.settings

        def feeds():
            for number, start in enumerate(range(0, len(indices) - self.batch_size + 1, self.batch_size)):
                chunk = indices[start:start + self.batch_size]
                params = draw_params(settings, len(chunk), batch_generator(self.seed, epoch, number, self.rank))
                if self.mode == "affine":
                    geometry = (list(warp_matrices(params, load_size=settings.load_size, image_size=settings.image_size)),)
                else:
                    geometry = crop_windows(params)
                yield (*self._stored_inputs(chunk), *geometry,
                       params.contrast.numpy().astype(np.float32), params.brightness.numpy().astype(np.float32))

        yield from self._stream("train", feeds())

    def eval_batches(self, indices: np.ndarray) -> Iterator[torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)

        def feeds():
            for start in range(0, len(indices), self.batch_size):
                yield self._stored_inputs(indices[start:start + self.batch_size])

        yield from self._stream("eval", feeds())

    def _stored_inputs(self, chunk: np.ndarray) -> tuple:
        jpegs = self.reader.read(chunk)
        return (jpegs, list(self.roi_start[chunk]), list(self.roi_end[chunk])) if self.resize else (jpegs,)

    # ------------------------------------------------------------------ running the pipeline

    def _stream(self, mode: str, feeds: Iterator[tuple]) -> Iterator[torch.Tensor]:
        pipe = self._pipeline(mode)
        self._finish(mode)  # a previous pass abandoned half-way leaves batches in flight
        # The reads and parameter draws run on a reader thread, ahead of the pipeline.
        self._feeds[mode] = Prefetched(feeds, depth=self.prefetch + 1, name=f"dali-{mode}-reader")
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._running.add(mode)
        pipe.schedule_run()  # the first call fills the prefetch queue
        try:
            while True:
                try:
                    (out,) = pipe.outputs(stream) if stream is not None else pipe.outputs()
                except StopIteration:
                    break
                pipe.schedule_run()  # queue the next batch before handing this one out
                yield self._to_torch(out)
        finally:
            try:
                self._finish(mode)
            except (AttributeError, RuntimeError):
                pass  # the pipeline is already gone (a generator collected at interpreter exit)

    def _finish(self, mode: str) -> None:
        """Drop whatever is still in flight and rewind the pipeline for the next pass."""
        feed = self._feeds.get(mode)
        if isinstance(feed, Prefetched):
            feed.close()
        self._feeds[mode] = iter(())
        if mode not in self._running:
            return
        pipe = self._pipes[mode]
        while True:
            pipe.schedule_run()  # marks the end once the feed is empty
            try:
                pipe.outputs()
            except StopIteration:
                break
        pipe.reset()
        self._running.discard(mode)

    def _to_torch(self, out) -> torch.Tensor:
        images = torch.from_dlpack(out.as_tensor())  # zero-copy; CPU or this CUDA device
        if images.shape[-1] == 1:  # HWC with one channel -> [B, 1, S, S] (a view, still contiguous)
            images = images.permute(0, 3, 1, 2)
        return images

    def _pipeline(self, mode: str):
        if mode not in self._pipes:
            self._pipes[mode] = self._build(mode)
        return self._pipes[mode]

    def _build(self, mode: str):
        cuda = self.device.type == "cuda"
        load, size = self.settings.load_size, self.settings.image_size
        resize = self.resize
        geometry = ["matrix"] if self.mode == "affine" else ["crop_start", "crop_end"]
        names = (["jpegs"] + (["roi_start", "roi_end"] if resize else [])
                 + (geometry + ["contrast", "brightness"] if mode == "train" else []))

        def source() -> tuple:
            return next(self._feeds[mode])  # StopIteration ends the pass

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device.index if cuda else None,
                      prefetch_queue_depth=self.prefetch, seed=self.seed)
        def pipeline():
            inputs = fn.external_source(source=source, num_outputs=len(names), batch=True,
                                        dtype=[types.UINT8] + [types.FLOAT] * (len(names) - 1))
            given = dict(zip(names, inputs))
            images = fn.decoders.image(given["jpegs"], device="mixed" if cuda else "cpu", output_type=types.GRAY)
            if resize:
                images = fn.resize(images, size=(load, load), roi_start=given["roi_start"], roi_end=given["roi_end"],
                                   roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True,
                                   subpixel_scale=True, dtype=types.UINT8)
            if mode == "eval":
                # (L - S) // 2 exactly: truncate an anchor half a pixel past it.
                position = 0.5 if load == size else ((load - size) // 2 + 0.5) / (load - size)
                return fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=position, crop_pos_y=position,
                                                rounding="truncate", mean=[MEAN * 255], std=[STD * 255],
                                                dtype=types.FLOAT, output_layout="CHW")
            if self.mode == "affine":
                crops = fn.warp_affine(images, matrix=given["matrix"], size=(size, size), dtype=types.FLOAT,
                                       interp_type=types.INTERP_LINEAR)  # no fill_value: border clamp
            else:
                # A start past the end flips that axis; no antialias, as grid_sample/interpolate.
                crops = fn.resize(images, size=(size, size), roi_start=given["crop_start"], roi_end=given["crop_end"],
                                  roi_relative=True, interp_type=types.INTERP_LINEAR, antialias=False,
                                  dtype=types.FLOAT)
            contrast, brightness = given["contrast"], given["brightness"]
            if cuda:
                contrast, brightness = contrast.gpu(), brightness.gpu()
            # augment._jitter + normalize on 0..255 values, as one fused DALI expression.
            mean = fn.reductions.mean(crops)
            jittered = dali_math.clamp(((crops - mean) * contrast + mean) * (1 / 255) + brightness, 0.0, 1.0)
            return (jittered - MEAN) * (1 / STD)

        pipe = pipeline()
        pipe.build()
        return pipe

    def close(self) -> None:
        self._pipes.clear()
        self.reader.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _image_sizes(rows: pd.DataFrame, reader: ShardReader) -> tuple[np.ndarray, np.ndarray]:
    """Stored JPEG sizes: the manifest has them; otherwise read from each JPEG header."""
    if {"height", "width"} <= set(rows.columns):
        return rows["height"].to_numpy(dtype=np.int64), rows["width"].to_numpy(dtype=np.int64)
    import io

    from PIL import Image

    sizes = []
    for start in range(0, len(reader), 1024):
        for data in reader.read(range(start, min(start + 1024, len(reader)))):
            with Image.open(io.BytesIO(data.tobytes())) as image:
                sizes.append((image.height, image.width))
    array = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    return array[:, 0], array[:, 1]

