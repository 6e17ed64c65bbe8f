"""`bench data`: images/s of augmented training batches delivered on the training device.

Loaders (see the package docstring): naive, wds, dali-stock, dali, resident, host; beside them
the decode ceiling (libjpeg-turbo per core on the shard JPEGs) and the resident loader's
start-up with the decoded cache cold and warm.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from cxr_fast.bench.machine import (command_line, machine_info, now, replace_option, spread, synchronize, timed,
                                    training_device, usable_cores)
from cxr_fast.bench.records import DataResult, DataSettings, DecodeCeiling, LoaderResult, Rate, StartupResult
from cxr_fast.errors import CxrError
from cxr_fast.loading.augment import MEAN, STD, AugmentSettings

LOADERS = ("naive", "wds", "dali-stock", "dali", "resident", "host")
WORKDIR = Path(os.environ.get("CXR_BENCH_DIR", "build/bench"))  # the phantom and its shards, cached
REFERENCE_DECODE_PER_CORE = 3800  # img/s/core, libjpeg-turbo, 256 px ~20 KB grayscale, measured on these machines


def prepare_data(images: int, *, workdir: Path = WORKDIR, source_size: int = 1024, shard_px: int = 256,
                 seed: int = 0, portrait: float = 1.0) -> Path:
    """Phantom MIMIC at `source_size` px and its shards at `shard_px` px, cached under workdir;
    with `portrait` > 1 the images are stretched to `portrait` x as many rows as columns."""
    from cxr_fast.data import shard_dataset
    from cxr_fast.data.phantom import generate_phantom

    shape = f"-portrait{portrait:g}" if portrait != 1.0 else ""
    root = workdir / f"phantom-{images}-{source_size}px-seed{seed}{shape}"
    shards = workdir / f"shards-{images}-{source_size}px-seed{seed}{shape}-{shard_px}px"
    if not (root / "phantom_truth.json").is_file():
        print(f"bench: drawing {images} phantom radiographs at {source_size} px -> {root}", file=sys.stderr)
        generate_phantom(root, n_images=images, seed=seed, image_size=source_size, workers=usable_cores())
    if not (shards / "manifest.parquet").is_file():
        if portrait != 1.0:
            stretch_to_portrait(root, portrait)
        # Several shards per split, so every DataLoader worker of the wds loader has its own.
        shard_size = max(16, math.ceil(images / (4 * usable_cores())))
        arguments = ["--source", "mimic", "--root", str(root / "mimic-cxr-jpg"), "--demographics", str(root / "mimic-iv"),
                     "--out", str(shards), "--size", str(shard_px), "--shard-size", str(shard_size),
                     "--workers", str(usable_cores()), "--no-progress"]
        if shard_dataset.main(arguments) != 0:
            raise CxrError(f"bench: sharding {root} failed")
    return shards


def stretch_to_portrait(root: Path, ratio: float) -> None:
    """Every phantom JPEG under `root` stretched to `ratio` x its width in rows (MIMIC's images
    are portrait: the ROI and crop code must meet non-square inputs). Idempotent: an image
    already at that shape is left alone, so an interrupted pass is finished by a rerun."""
    from PIL import Image

    from cxr_fast.io import atomic_path

    for path in sorted(root.rglob("*.jpg")):
        with Image.open(path) as image:
            target = (image.width, round(image.width * ratio))
            if image.size == target:
                continue
            stretched = image.resize(target, Image.Resampling.BILINEAR)
        with atomic_path(path) as tmp:
            stretched.save(tmp, format="JPEG", quality=90)


def read_rows(shards: Path):
    import pandas as pd

    from cxr_fast.loading.payloads import read_manifest

    read_manifest(shards)  # the clear error when it is missing
    return pd.read_parquet(shards / "manifest.parquet")


def decode_ceiling(rows, shards: Path, *, repeats: int, seconds: float = 1.0) -> DecodeCeiling:
    """libjpeg-turbo decode rate on one core for the shard JPEGs (and, for reference, the sources)."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from cxr_fast.loading.payloads import read_payloads

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
    payloads = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in read_payloads(rows, shards)]

    def rate(decode_one, items) -> list[float]:
        values = []
        for _ in range(repeats):
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                decode_one(items[count % len(items)])
                count += 1
            values.append(count / (time.perf_counter() - started))
        return values

    per_core = rate(lambda data: decode_jpeg(data, mode=ImageReadMode.GRAY), payloads)

    def pil_decode(path):
        with Image.open(path) as image:
            image.load()

    sources = [path for path in rows["path"].tolist()[:64] if Path(path).is_file()] if "path" in rows else []
    return DecodeCeiling(
        decoder="libjpeg-turbo via torchvision.io.decode_jpeg (GRAY), one thread",
        jpeg_kb_mean=round(float(rows["nbytes"].mean()) / 1000, 1),
        jpeg_px=f"{int(rows['height'].median())}x{int(rows['width'].median())}",
        images_per_second_per_core=spread(per_core),
        cores=usable_cores(),
        ceiling_images_per_second=round(statistics.median(per_core) * usable_cores()),
        reference_per_core=REFERENCE_DECODE_PER_CORE,
        source_images_per_second_per_core=spread(rate(pil_decode, sources)) if sources else None,
    )


def _forever(indices_per_pass: Callable[[int], np.ndarray]):
    """Pass numbers 0, 1, 2, ... with their index lists (long passes: no epoch-boundary stalls)."""
    number = 0
    while True:
        yield number, indices_per_pass(number)
        number += 1


def _long_order(n: int, seed: int, number: int, length: int = 200_000) -> np.ndarray:
    rng = np.random.default_rng([seed, number])
    return np.concatenate([rng.permutation(n) for _ in range(max(1, length // n))])


def torchvision_train_transform(settings: AugmentSettings):
    """The per-sample torchvision version of augment.py (PIL in, normalised [1, S, S] out)."""
    from torchvision import transforms as T

    steps = [
        T.Resize(settings.load_size),
        T.RandomResizedCrop(settings.image_size, scale=(settings.crop_scale_min, 1.0),
                            ratio=(1 / settings.crop_ratio, settings.crop_ratio)),
        T.RandomRotation(settings.rotate_degrees, interpolation=T.InterpolationMode.BILINEAR),
        T.ColorJitter(brightness=settings.brightness, contrast=settings.contrast),
    ]
    if settings.hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize([MEAN], [STD])])


class NaiveDataset(torch.utils.data.Dataset):
    """One full-resolution JPEG per item, opened with PIL, transformed per sample."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            image = image.convert("L")
        return self.transform(image), self.labels[index]


def _to_device(batches, device: torch.device) -> Iterator[torch.Tensor]:
    for images, _labels in batches:
        yield images.to(device, non_blocking=True)


def _dataloader_kwargs(device: torch.device, workers: int) -> dict:
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
            **({"prefetch_factor": 2} if workers > 0 else {})}


def build_naive(ctx: dict):
    missing = [path for path in ctx["rows"]["path"].tolist()[:8] if not Path(path).is_file()]
    if missing:
        return None, f"source JPEGs not found (e.g. {missing[0]}); the naive loader reads the MIMIC folder layout"
    dataset = NaiveDataset(ctx["rows"]["path"].tolist(), ctx["rows"]["effusion"].to_numpy(np.float32),
                           torchvision_train_transform(ctx["settings"]))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
    loader = torch.utils.data.DataLoader(dataset, batch_size=ctx["batch_size"], sampler=sampler, drop_last=True,
                                         **_dataloader_kwargs(ctx["device"], ctx["workers"]))
    return _to_device(iter(loader), ctx["device"]), None


def build_wds(ctx: dict):
    try:
        import webdataset as wds
    except ImportError:
        return None, "webdataset is not installed (pip install webdataset)"
    urls = sorted(str(path) for path in ctx["shards"].glob("*.tar"))
    transform = torchvision_train_transform(ctx["settings"])

    def label(record: dict) -> float:
        value = record["labels"]["effusion"]
        return float("nan") if value is None else float(value)

    dataset = (wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None)
               .shuffle(256)
               .decode("pill")
               .to_tuple("jpg", "json")
               .map_tuple(transform, label)
               .batched(ctx["batch_size"], partial=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, **_dataloader_kwargs(ctx["device"], ctx["workers"]))
    return _to_device(iter(loader), ctx["device"]), None


def build_dali_stock(ctx: dict):
    from cxr_fast.loading import dali_available, dali_install_hint

    if not dali_available():
        return None, dali_install_hint()
    from nvidia.dali import fn, pipeline_def, types

    settings, device = ctx["settings"], ctx["device"]
    tars = sorted(ctx["shards"].glob("*.tar"))
    cuda = device.type == "cuda"

    @pipeline_def(batch_size=ctx["batch_size"], num_threads=ctx["workers"], device_id=device.index if cuda else None,
                  prefetch_queue_depth=2, seed=ctx["seed"])
    def pipeline():
        jpegs = fn.readers.webdataset(paths=[str(tar) for tar in tars], index_paths=[str(tar.with_suffix(".idx")) for tar in tars],
                                      ext=["jpg"], random_shuffle=True, initial_fill=256, name="reader")
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if cuda else "cpu", output_type=types.GRAY,
                                               random_area=[settings.crop_scale_min, 1.0],
                                               random_aspect_ratio=[1 / settings.crop_ratio, settings.crop_ratio])
        images = fn.resize(images, size=(settings.image_size, settings.image_size))
        images = fn.rotate(images, angle=fn.random.uniform(range=(-settings.rotate_degrees, settings.rotate_degrees)),
                           keep_size=True)
        images = fn.brightness_contrast(images, brightness_shift=fn.random.uniform(range=(-settings.brightness, settings.brightness)),
                                        contrast=fn.random.uniform(range=(1 - settings.contrast, 1 + settings.contrast)))
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[MEAN * 255],
                                        std=[STD * 255], mirror=fn.random.coin_flip() if settings.hflip else 0)

    pipe = pipeline()
    pipe.build()

    def batches():
        stream = torch.cuda.current_stream(device) if cuda else None
        while True:
            (out,) = pipe.run(stream) if cuda else pipe.run()
            yield torch.from_dlpack(out.as_tensor())

    return batches(), None


def build_project_loader(kind: str):
    def build(ctx: dict):
        from cxr_fast.loading import dali_available, dali_install_hint, make_loader

        if kind == "dali" and not dali_available():
            return None, dali_install_hint()
        loader = make_loader(kind, ctx["rows"], ctx["shards"], ctx["settings"], device=ctx["device"],
                             batch_size=ctx["batch_size"], seed=ctx["seed"], threads=ctx["workers"])

        def batches():
            for number, indices in _forever(lambda number: _long_order(len(loader), ctx["seed"], number)):
                yield from loader.train_batches(indices, epoch=number)

        return batches(), None

    return build


BUILDERS = {"naive": build_naive, "wds": build_wds, "dali-stock": build_dali_stock,
            "dali": build_project_loader("dali"), "resident": build_project_loader("resident"),
            "host": build_project_loader("host")}
DESCRIPTIONS = {
    "naive": "torch Dataset + PIL on the 1,024 px source JPEGs, torchvision transforms per sample, DataLoader, 1 worker/core",
    "wds": "webdataset + torchvision transforms per sample over the 256 px shards, DataLoader, 1 worker/core",
    "dali-stock": "DALI fn.readers.webdataset + decoders.image_random_crop/resize/rotate/brightness_contrast/crop_mirror_normalize",
    "dali": "cxr_fast DaliLoader: external_source by manifest offset, DALI decode + augment with augment.py's draws",
    "resident": "cxr_fast ResidentLoader: decoded once to the device, batched gather + augmentation there",
    "host": "cxr_fast HostLoader: the mapped decoded cache on the host; each batch gathered, sent to the device, augmented",
}


def measure_stream(batches: Iterator[torch.Tensor], *, batch_size: int, device: torch.device, repeats: int,
                   warmup: int, seconds: float,
                   check: Callable[[torch.Tensor], None] | None = None) -> tuple[Rate, int]:
    """Warm up, size the timed blocks to ~`seconds` each, then time `repeats` blocks:
    images/s and the batches in each block."""
    first = None
    for _ in range(warmup):
        first = next(batches)
    if check is not None and first is not None:
        check(first)
    probe = timed(lambda: [next(batches) for _ in range(2)], device) / 2
    per_block = int(min(500, max(2, round(seconds / max(probe, 1e-6)))))
    values = []
    for _ in range(repeats):
        elapsed = timed(lambda: [next(batches) for _ in range(per_block)], device)
        values.append(per_block * batch_size / elapsed)
    return spread(values), per_block


def check_batch(settings: AugmentSettings, batch_size: int, device: torch.device):
    def check(images: torch.Tensor) -> None:
        expected = (batch_size, 1, settings.image_size, settings.image_size)
        if tuple(images.shape) != expected or images.dtype != torch.float32 or images.device.type != device.type:
            raise CxrError(f"bench: a loader delivered {tuple(images.shape)} {images.dtype} on {images.device}, "
                           f"expected {expected} float32 on {device.type}")
    return check


def bench_data(*, loaders: list[str], batch_size: int, image_size: int, repeats: int, seconds: float, warmup: int,
               shards: Path | None = None, images: int = 800, workdir: Path = WORKDIR, workers: int = 0,
               ceiling: bool = True, argv: list[str]) -> DataResult:
    """Each loader built, warmed up and timed over the same shards (`shards`, or a phantom of
    `images` drawn and cached under `workdir`). `argv`: the command's arguments, recorded."""
    unknown = sorted(set(loaders) - set(LOADERS))
    if unknown:
        raise CxrError(f"unknown loader(s) {', '.join(unknown)}; choose from {', '.join(LOADERS)}")
    device = training_device()
    shards = shards or prepare_data(images, workdir=workdir)
    rows = read_rows(shards)
    settings = AugmentSettings(image_size=image_size)
    ctx = {"rows": rows, "shards": shards, "settings": settings, "batch_size": batch_size, "device": device,
           "workers": workers or usable_cores(), "seed": 0}
    result = DataResult(
        command=command_line(argv), date=now(), machine=machine_info(),
        settings=DataSettings(images=images, shard_images=len(rows), shards=str(shards), batch_size=batch_size,
                              image_size=image_size, load_size=settings.load_size, repeats=repeats, device=str(device),
                              workers=ctx["workers"], seconds_per_repeat=seconds),
        decode_ceiling=decode_ceiling(rows, shards, repeats=repeats) if ceiling else None,
    )
    for name in loaders:
        print(f"bench data: {name} ...", file=sys.stderr, flush=True)
        entry = measure_loader(name, ctx, repeats=repeats, warmup=warmup, seconds=seconds,
                               command=command_line(replace_option(argv, "--loaders", name)))
        result.loaders[name] = entry
        _report_loader(name, entry)
    result.ratios = loader_ratios(result)
    if "resident" in loaders:
        print("bench data: start-up, decoded cache cold and warm ...", file=sys.stderr, flush=True)
        result.startup = measure_startup(ctx, repeats=repeats, command=command_line(replace_option(argv, "--loaders",
                                                                                                   "resident")))
        print(f"  start-up    cold {result.startup.cold_ms.median:.0f} ms, warm {result.startup.warm_ms.median:.0f} ms "
              f"({result.startup.speedup:.1f}x)", file=sys.stderr, flush=True)
    return result


def measure_startup(ctx: dict, *, repeats: int, command: str) -> StartupResult:
    """The resident loader built over all the shards' images, `repeats` times with the decoded
    cache deleted first (cold: decode + write) and `repeats` times with it present (warm: map +
    copy). Deletes only this shard set's cache file at this load size, which it rebuilds."""
    from cxr_fast.loading import make_loader
    from cxr_fast.schema import DECODED_CACHE_FOLDER

    load_size = ctx["settings"].load_size

    def start() -> float:
        started = time.perf_counter()
        loader = make_loader("resident", ctx["rows"], ctx["shards"], ctx["settings"], device=ctx["device"],
                             batch_size=ctx["batch_size"], threads=ctx["workers"])
        synchronize(ctx["device"])
        del loader
        return (time.perf_counter() - started) * 1000

    cold, warm = [], []
    for _ in range(repeats):
        for path in (ctx["shards"] / DECODED_CACHE_FOLDER).glob(f"{load_size}px-*.u8"):
            path.unlink()
        cold.append(start())
        warm.append(start())
    return StartupResult(images=len(ctx["rows"]), load_size=load_size, cold_ms=spread(cold), warm_ms=spread(warm),
                         speedup=round(statistics.median(cold) / statistics.median(warm), 1), command=command)


def measure_loader(name: str, ctx: dict, *, repeats: int, warmup: int, seconds: float, command: str) -> LoaderResult:
    """One loader: built (setup time apart), checked, timed; skipped or failed with the reason."""
    entry = LoaderResult(description=DESCRIPTIONS[name], command=command)
    device, batch_size = ctx["device"], ctx["batch_size"]
    started = time.perf_counter()
    batches = None
    try:
        batches, skipped = BUILDERS[name](ctx)
        if batches is None:
            entry.status, entry.reason = "skipped", skipped
            return entry
        next(batches)  # workers started, pipeline built, data decoded: setup
        synchronize(device)
        entry.setup_seconds = round(time.perf_counter() - started, 2)
        entry.images_per_second, entry.batches_per_repeat = measure_stream(
            batches, batch_size=batch_size, device=device, repeats=repeats, warmup=warmup, seconds=seconds,
            check=check_batch(ctx["settings"], batch_size, device))
    except CxrError:
        raise
    except Exception as error:  # one loader failing must not lose the others' numbers
        entry.status, entry.reason = "failed", f"{type(error).__name__}: {error}"
    finally:
        _close(batches)
    return entry


def _close(batches) -> None:
    """Stop a stream: DataLoader workers exit, DALI pipelines are released."""
    if batches is None:
        return
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    gc.collect()


def loader_ratios(result: DataResult) -> dict[str, float]:
    ratios = {}
    for name in ("naive", "dali-stock", "dali", "resident"):
        if result.rate(name) and result.rate("wds"):
            ratios[f"{name}/wds"] = round(result.rate(name) / result.rate("wds"), 2)
    if result.rate("host") and result.rate("resident"):
        ratios["host/resident"] = round(result.rate("host") / result.rate("resident"), 2)
    return ratios


def _report_loader(name: str, entry: LoaderResult) -> None:
    if entry.status == "ok":
        ips = entry.images_per_second
        print(f"  {name:<11} {ips.median:>9.0f} img/s  (min {ips.min:.0f}, max {ips.max:.0f}; "
              f"setup {entry.setup_seconds} s)", file=sys.stderr, flush=True)
    else:
        print(f"  {name:<11} {entry.status}: {entry.reason}", file=sys.stderr, flush=True)
