"""The decoded cache (written once, read by every later run) and the three loader tiers."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import shard_arguments

from cxr_fast import loading
from cxr_fast.errors import CxrError
from cxr_fast.loading import choose_loader, choose_loader_for_all, make_loader
from cxr_fast.loading import decode, decoded
from cxr_fast.loading.augment import AugmentSettings
from cxr_fast.loading.payloads import read_manifest, read_payloads

CPU = torch.device("cpu")
SETTINGS = AugmentSettings(image_size=64)  # load size 73


@pytest.fixture
def shards(phantom_shards, tmp_path):
    """A private copy of the session's shards: these tests write and damage its cache."""
    copy = tmp_path / "shards"
    shutil.copytree(phantom_shards, copy, ignore=shutil.ignore_patterns("decoded", ".lock"))
    return copy


def train_rows(shards):
    manifest = read_manifest(shards)
    return manifest[manifest["split"] == "train"].reset_index(drop=True)


def the_cache(shards):
    files = sorted((shards / "decoded").glob("*.u8"))
    assert len(files) == 1, files
    return files[0]


def stored(loader) -> torch.Tensor:
    """Every image of a resident loader's split as stored."""
    return loader.stored(torch.arange(len(loader)))


def forbid_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the cache was there")

    monkeypatch.setattr(decode, "decode_to_square", refuse)


# ------------------------------------------------------------------ written once, read after


def test_the_first_loader_writes_the_cache_and_later_ones_only_read_it(shards, monkeypatch):
    rows = train_rows(shards)
    first = make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8)
    path = the_cache(shards)
    assert path.name.startswith(f"{SETTINGS.load_size}px-")
    fresh = decode.decode_to_square(read_payloads(rows, shards), SETTINGS.load_size, CPU)
    assert torch.equal(stored(first), fresh)  # the cache holds exactly what the decoder gives
    manifest = read_manifest(shards)
    val = manifest[manifest["split"] == "val"].reset_index(drop=True)
    val_fresh = decode.decode_to_square(read_payloads(val, shards), SETTINGS.load_size, CPU)

    forbid_decoding(monkeypatch)
    for kind in ("resident", "host"):
        again = make_loader(kind, rows, shards, SETTINGS, device=CPU, batch_size=8)
        assert torch.equal(torch.cat(list(again.eval_batches(np.arange(len(rows))))),
                           torch.cat(list(first.eval_batches(np.arange(len(rows))))))
    # The validation split is served by the same file (it holds every manifest row).
    assert torch.equal(stored(make_loader("resident", val, shards, SETTINGS, device=CPU, batch_size=8)), val_fresh)
    assert the_cache(shards) == path


def test_decoded_cache_off_writes_nothing(shards):
    rows = train_rows(shards).head(20)
    loader = make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8, cache="off")
    assert len(loader) == 20 and not (shards / "decoded").exists()
    host = make_loader("host", rows, shards, SETTINGS, device=CPU, batch_size=8, cache="off")
    assert torch.equal(torch.from_numpy(host.images.gather(np.arange(20))), stored(loader))
    assert not (shards / "decoded").exists()


def test_the_name_changes_with_everything_that_decides_the_bytes(shards):
    manifest = read_manifest(shards)
    digest = decoded.cache_digest(manifest, shards, 73)
    assert decoded.cache_digest(manifest, shards, 73) == digest
    assert decoded.cache_digest(manifest, shards, 80) != digest                # load size
    moved = manifest.copy()
    moved.loc[0, "offset"] += 512
    assert decoded.cache_digest(moved, shards, 73) != digest                   # another shard layout
    meta = (shards / "meta.json").read_text()
    shard = manifest["shard"].iloc[0]
    sha = __import__("json").loads(meta)["shards"][shard]["sha256"]
    (shards / "meta.json").write_text(meta.replace(sha, "0" * 64))
    assert decoded.cache_digest(manifest, shards, 73) != digest                # a rewritten shard
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoded, "RESIZE_RULE", "another rule")
        (shards / "meta.json").write_text(meta)
        assert decoded.cache_digest(manifest, shards, 73) != digest            # another resize rule


def test_resharding_with_other_contents_deletes_the_stale_caches(phantom_root, shards):
    from cxr_fast.data import shard_dataset

    make_loader("resident", train_rows(shards).head(8), shards, SETTINGS, device=CPU, batch_size=8)
    assert the_cache(shards).is_file()
    assert shard_dataset.main(shard_arguments(phantom_root, shards, "--limit", "100")) == 0
    assert not (shards / "decoded").exists()  # its images came from shards that are gone


# ------------------------------------------------------------------ damage is found and repaired


def damage(path, how: str) -> None:
    if how == "truncated":
        os.truncate(path, path.stat().st_size - 100)
        return
    with open(path, "rb") as handle:
        start = decoded.read_header(handle, path)["data_offset"]
    with open(path, "r+b") as handle:  # one pixel of the first block flipped
        handle.seek(start + 10)
        byte = handle.read(1)[0]
        handle.seek(start + 10)
        handle.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_a_damaged_cache_is_rebuilt_with_one_warning_and_never_read(shards, capsys, how):
    rows = train_rows(shards)
    good = stored(make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8))
    path = the_cache(shards)
    damage(path, how)
    capsys.readouterr()
    rebuilt = stored(make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "rebuilding" in line]
    assert len(warnings) == 1 and str(path) in warnings[0]
    assert ("truncated" if how == "truncated" else "checksum") in warnings[0]
    assert torch.equal(rebuilt, good)


def test_verify_checks_every_block_an_open_only_samples(shards, monkeypatch, capsys):
    monkeypatch.setattr(decoded, "BLOCK_BYTES", 10 * SETTINGS.load_size ** 2)  # 10 images per block
    rows = train_rows(shards)
    good = stored(make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8))
    path = the_cache(shards)
    header = decoded.read_header(open(path, "rb"), path)
    blocks = len(header["block_crc32"])
    sampled = set(np.linspace(0, blocks - 1, decoded.SAMPLED_BLOCKS).round().astype(int).tolist())
    unsampled = next(block for block in range(blocks) if block not in sampled)
    with open(path, "r+b") as handle:  # one pixel of a block an ordinary open does not check
        handle.seek(header["data_offset"] + unsampled * 10 * SETTINGS.load_size ** 2 + 5)
        handle.write(b"\x00" if handle.read(1) != b"\x00" else b"\x01")
    capsys.readouterr()
    make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8)
    assert "rebuilding" not in capsys.readouterr().err  # size + header + sampled blocks: a cheap open
    checked = stored(make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8, cache="verify"))
    assert f"block {unsampled} fails its checksum" in capsys.readouterr().err
    assert torch.equal(checked, good)


def test_the_header_has_room_for_a_checksum_per_image(shards, monkeypatch, capsys):
    monkeypatch.setattr(decoded, "BLOCK_BYTES", 1)  # one block per image: the most checksums there can be
    rows = train_rows(shards)
    first = stored(make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8))
    again = stored(make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8, cache="verify"))
    assert torch.equal(first, again) and "rebuilding" not in capsys.readouterr().err
    with open(the_cache(shards), "rb") as handle:
        assert len(decoded.read_header(handle, the_cache(shards))["block_crc32"]) == len(read_manifest(shards))


# ------------------------------------------------------------------ several processes, one build


def test_a_run_that_waits_for_the_lock_reads_what_the_holder_built(shards, monkeypatch, capsys):
    from cxr_fast.locks import exclusive_lock

    rows = train_rows(shards)
    holder = contextlib.ExitStack()
    holder.enter_context(exclusive_lock(shards, what="cache build"))
    waits = []

    def the_holder_finishes():  # what the other process does while we wait
        waits.append(1)
        make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8, cache="off")
        manifest = read_manifest(shards)
        digest = decoded.cache_digest(manifest, shards, SETTINGS.load_size)
        decoded.build_cache(decoded.cache_path(shards, SETTINGS.load_size, digest), manifest, shards,
                            SETTINGS.load_size, digest=digest, device=CPU)
        holder.close()
        forbid_decoding(monkeypatch)

    monkeypatch.setattr(decoded, "wait_a_moment", the_holder_finishes)
    loader = make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8)
    assert len(waits) == 1 and "waiting for pid" in capsys.readouterr().err
    assert len(loader) == len(rows)


def test_a_folder_that_cannot_hold_a_cache_is_decoded_in_memory(shards, monkeypatch, capsys):
    @contextlib.contextmanager
    def unwritable(folder, what):
        raise CxrError(f"{folder}: cannot write here (Permission denied)")
        yield

    monkeypatch.setattr(decoded, "exclusive_lock", unwritable)
    rows = train_rows(shards).head(10)
    loader = make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8)
    assert len(loader) == 10 and "decoding in memory" in capsys.readouterr().err


def test_a_disk_that_fills_during_the_build_falls_back_to_decoding_in_memory(shards, monkeypatch, capsys):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(decoded, "write_at", full)
    rows = train_rows(shards).head(10)
    loader = make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8)
    err = capsys.readouterr().err
    assert len(loader) == 10 and "no space left on device" in err and "decoding in memory" in err
    assert not list((shards / "decoded").glob("*.u8*"))  # no cache, no temporary


def test_a_shard_that_cannot_be_read_fails_the_build_and_leaves_no_cache(shards, capsys):
    rows = train_rows(shards)
    shard = shards / rows["shard"].iloc[-1]
    os.truncate(shard, 1000)
    with pytest.raises(CxrError, match="truncated shard"):
        make_loader("resident", rows, shards, SETTINGS, device=CPU, batch_size=8)
    assert "decoding in memory" not in capsys.readouterr().err  # a bad shard is not a full disk
    assert not [path for path in (shards / "decoded").iterdir()]  # no cache, no temporary


# ------------------------------------------------------------------ host = resident, batch for batch


@pytest.mark.parametrize("mode", ["crop", "affine"])
def test_host_and_resident_give_the_same_batches_for_the_same_seed(shards, mode):
    rows = train_rows(shards)
    made = {kind: loading.make_loader(kind, rows, shards, SETTINGS, device=CPU, batch_size=8, seed=3)
            for kind in ("resident", "host")}
    for loader in made.values():
        loader.mode = mode
    indices = np.random.default_rng(0).permutation(len(rows))[:60]
    for epoch in (0, 1):
        batches = {kind: list(loader.train_batches(indices, epoch=epoch)) for kind, loader in made.items()}
        assert len(batches["host"]) == len(batches["resident"]) == 7  # full batches only
        for ours, theirs in zip(batches["host"], batches["resident"]):
            assert torch.equal(ours, theirs)
    evaluated = {kind: torch.cat(list(loader.eval_batches(indices))) for kind, loader in made.items()}
    assert evaluated["host"].shape[0] == 60 and torch.equal(evaluated["host"], evaluated["resident"])


# ------------------------------------------------------------------ auto: each tier, or a refusal


@pytest.mark.parametrize("budget, host, dali, expected", [
    (10**12, 10**12, True, "resident"), (1, 10**12, True, "host"), (1, 1, True, "dali"),
    (10**12, 1, False, "resident"), (1, 10**12, False, "host")])
def test_auto_picks_the_first_tier_that_fits(monkeypatch, budget, host, dali, expected):
    monkeypatch.setattr(loading, "dali_available", lambda: dali)
    assert choose_loader("auto", n_images=1000, settings=SETTINGS, budget_bytes=lambda: budget,
                         host_bytes=lambda: host) == expected


def test_auto_refuses_in_one_line_with_the_bytes_needed(monkeypatch):
    monkeypatch.setattr(loading, "dali_available", lambda: False)
    with pytest.raises(CxrError) as error:
        choose_loader("auto", n_images=1000, settings=SETTINGS, budget_bytes=lambda: 1000, host_bytes=lambda: 2000)
    message = str(error.value)
    assert "\n" not in message and f"{1000 * 73 * 73:,} bytes" in message and "pip install nvidia-dali" in message


def test_a_split_that_fits_nowhere_is_refused_before_any_decoding(shards, tmp_path, monkeypatch):
    from cxr_fast import train as training
    from cxr_fast.recipes import load_config

    monkeypatch.setattr(loading, "dali_available", lambda: False)
    monkeypatch.setattr(loading, "available_host_bytes", lambda: 1000)
    monkeypatch.setattr(training, "loader_budget_bytes", lambda *args, **kwargs: 1000)
    forbid_decoding(monkeypatch)
    config = load_config("effusion_test_resnet", {
        "shards": str(shards), "weights_dir": str(tmp_path / "weights"), "runs_dir": str(tmp_path / "runs"),
        "image_size": 64, "batch_size": 16, "epochs": 1, "logger": "none", "pretrained": False, "loader": "auto"})
    with pytest.raises(CxrError, match=r"loader=auto: \d+ images at 73 px need .* bytes"):
        training.train(config, progress_bar=False)
    assert not (shards / "decoded").exists()


def test_one_process_keeps_its_own_choice_and_refusal():
    alone = SimpleNamespace(num_processes=1, process_index=0, device=CPU)
    assert choose_loader_for_all(lambda: "host", alone) == "host"
    with pytest.raises(CxrError, match="nothing fits"):
        choose_loader_for_all(lambda: (_ for _ in ()).throw(CxrError("nothing fits")), alone)


def _agree(rank: int, store: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    process = SimpleNamespace(num_processes=2, process_index=rank, device=CPU)
    # Each process would choose differently (their free memory differs): rank 0's choice wins.
    first = choose_loader_for_all(lambda: ("resident", "host")[rank], process)
    try:
        choose_loader_for_all(lambda: "host" if rank else (_ for _ in ()).throw(CxrError("fits nowhere")), process)
        second = "ran"
    except CxrError as error:
        second = str(error)
    world = dist.get_world_size()
    dist.destroy_process_group()
    with open(f"{results}.{rank}", "w") as handle:
        handle.write(f"{world}|{first}|{second}")


@pytest.mark.slow
def test_under_two_processes_every_process_uses_the_main_process_tier(tmp_path):
    torch.multiprocessing.spawn(_agree, args=(str(tmp_path / "store"), str(tmp_path / "result")), nprocs=2,
                                join=True)
    assert (tmp_path / "result.0").read_text() == "2|resident|fits nowhere"  # the world size each process got
    assert (tmp_path / "result.1").read_text() == ("2|resident|the main process found no loader that fits "
                                                   "(its message says why)")
