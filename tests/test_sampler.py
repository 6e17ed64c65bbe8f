"""The class-balanced epoch list: exact balance, every minority image, a pure function of
(seed, epoch), and equal disjoint shares per rank."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_fast.loading.sampler import balanced_epoch, rank_share


def _labels(n_pos: int, n_neg: int, seed: int = 0) -> np.ndarray:
    labels = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    np.random.default_rng(seed).shuffle(labels)
    return labels


def test_sampler_is_exactly_balanced_with_every_minority_image():
    labels = _labels(37, 400)
    epoch = balanced_epoch(labels, seed=1, epoch=0)
    assert len(epoch) == 74 and len(set(epoch)) == 74
    assert labels[epoch].sum() == 37
    assert set(np.flatnonzero(labels == 1)) <= set(epoch)


def test_sampler_balances_when_positives_are_the_majority():
    labels = _labels(300, 20)
    epoch = balanced_epoch(labels, seed=0, epoch=3)
    assert (labels[epoch] == 0).sum() == 20 and (labels[epoch] == 1).sum() == 20


def test_sampler_is_a_pure_function_of_seed_and_epoch():
    labels = _labels(50, 500)
    assert np.array_equal(balanced_epoch(labels, seed=4, epoch=2), balanced_epoch(labels, seed=4, epoch=2))
    assert not np.array_equal(balanced_epoch(labels, seed=4, epoch=2), balanced_epoch(labels, seed=4, epoch=3))
    assert not np.array_equal(balanced_epoch(labels, seed=4, epoch=2), balanced_epoch(labels, seed=5, epoch=2))


def test_rank_shares_are_disjoint_equal_and_cover_the_epoch():
    epoch = balanced_epoch(_labels(51, 500), seed=0, epoch=0)  # 102 images, 4 ranks
    shares = [rank_share(epoch, rank=r, world_size=4) for r in range(4)]
    assert {len(share) for share in shares} == {25}
    together = np.concatenate(shares)
    assert len(set(together)) == 100 and set(together) <= set(epoch)


def test_sampler_covers_the_majority_over_epochs():
    labels = _labels(40, 400)
    seen = set()
    for epoch in range(150):  # each epoch draws 10% of the majority: 0.9**150 ~ 1e-7 per image
        seen |= set(balanced_epoch(labels, seed=0, epoch=epoch))
    assert seen == set(range(len(labels)))


def test_sampler_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        balanced_epoch(np.ones(10), seed=0, epoch=0)
