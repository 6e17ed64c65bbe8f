"""Loader plumbing that matters on a GPU node: thread shares, decode order, the reader thread."""

from __future__ import annotations

import threading

import pytest
import torch

from cxr_fast.loading import decode, workers
from cxr_fast.loading.prefetch import Prefetched


@pytest.mark.parametrize("cores, local_ranks, expected", [(192, 8, workers.MAX_DECODE_THREADS), (16, 8, 2),
                                                          (4, 8, 1), (2, 1, 2)])
def test_decode_threads_are_this_processes_share_of_its_cores(monkeypatch, cores, local_ranks, expected):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(workers.os, "cpu_count", lambda: cores)  # an unbound process: its mask is the machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert workers.decode_threads(0) == expected
    assert workers.decode_threads(5) == 5  # an explicit setting wins


@pytest.mark.parametrize("machine, mask, local_ranks, expected",
                         [(16, 2, 8, 2), (192, 24, 8, workers.MAX_DECODE_THREADS), (64, 6, 8, 6)])
def test_a_process_bound_to_its_own_cores_uses_all_of_them(monkeypatch, machine, mask, local_ranks, expected):
    # accelerate launch --enable_cpu_affinity gives each rank its own cores: dividing those by the
    # ranks again would leave one thread (16 cores, 8 ranks: 2 cores each -> 2 // 8 -> 1).
    monkeypatch.setattr(workers.os, "cpu_count", lambda: machine)
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(mask)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert workers.decode_threads(0) == expected


def test_on_cuda_every_decode_chunk_waits_for_the_stream_first(monkeypatch):
    calls = []
    monkeypatch.setattr(decode, "synchronize_stream", lambda device: calls.append("sync"))
    chunks = [range(0, 2), range(2, 4), range(4, 5)]
    decode.run_chunks(lambda chunk: calls.append(chunk), chunks, torch.device("cuda"))
    assert calls == ["sync", chunks[0], "sync", chunks[1], "sync", chunks[2]]


def test_prefetched_items_come_in_order_from_another_thread():
    producers = set()

    def items():
        for number in range(50):
            producers.add(threading.get_ident())
            yield number

    assert list(Prefetched(items(), depth=3)) == list(range(50))
    assert producers and threading.get_ident() not in producers


def test_a_producer_error_is_raised_at_its_place_and_close_stops_the_producer():
    def failing():
        yield 1
        raise ValueError("truncated shard")

    feed = Prefetched(failing())
    assert next(feed) == 1
    with pytest.raises(ValueError, match="truncated shard"):
        next(feed)
    with pytest.raises(StopIteration):
        next(feed)

    produced = []

    def endless():
        while True:
            produced.append(1)
            yield len(produced)

    feed = Prefetched(endless(), depth=2)
    assert next(feed) == 1
    feed.close()
    assert not feed._thread.is_alive()
    count = len(produced)
    assert count <= 5  # bounded by the queue, not run ahead without limit
    with pytest.raises(StopIteration):
        next(feed)
