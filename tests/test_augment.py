"""Augmentation kernels and their random parameters."""

from __future__ import annotations

import torch

from cxr_fast.loading.augment import (
    AugmentSettings,
    batch_generator,
    draw_params,
    eval_transform,
    train_transform,
)

SETTINGS = AugmentSettings(image_size=32)


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, SETTINGS.load_size, SETTINGS.load_size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def test_draws_are_a_pure_function_of_seed_epoch_batch_and_rank():
    def draw(*key):
        return draw_params(SETTINGS, 8, batch_generator(*key)).crop_h

    assert torch.equal(draw(0, 1, 2, 0), draw(0, 1, 2, 0))
    for other in ((1, 1, 2, 0), (0, 2, 2, 0), (0, 1, 3, 0), (0, 1, 2, 1)):
        assert not torch.equal(draw(0, 1, 2, 0), draw(*other)), other


def test_draws_stay_in_their_ranges():
    params = draw_params(SETTINGS, 1000, batch_generator(0, 0, 0))
    area = params.crop_h * params.crop_w
    assert area.min() >= SETTINGS.crop_scale_min - 1e-6 and area.max() <= 1 + 1e-6
    assert (params.top >= 0).all() and (params.top + params.crop_h <= 1 + 1e-9).all()
    assert params.angle.abs().max() <= torch.pi * SETTINGS.rotate_degrees / 180 + 1e-9
    assert not params.flip.any()  # hflip is off by default: the heart stays on the left


def test_both_kernels_give_normalised_batches_of_the_model_size():
    images = _images()
    params = draw_params(SETTINGS, 4, batch_generator(0, 0, 0))
    for mode in ("affine", "crop"):
        out = train_transform(images, SETTINGS, params, mode=mode)
        assert out.shape == (4, 1, 32, 32) and out.dtype == torch.float32
        low, high = (0 - 0.449) / 0.226, (1 - 0.449) / 0.226
        assert out.min() >= low - 1e-5 and out.max() <= high + 1e-5


def test_eval_is_the_centre_crop():
    images = _images()
    out = eval_transform(images.clone(), SETTINGS)
    offset = (SETTINGS.load_size - 32) // 2
    expected = (images[..., offset:offset + 32, offset:offset + 32].float() / 255 - 0.449) / 0.226
    assert torch.allclose(out, expected)
