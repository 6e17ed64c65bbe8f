"""explain: Grad-CAM for every study arch family, one-line refusals, the pointing score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_fast.explain.cam import Explainer, Layer, Unexplainable, choose_layer, to_map
from cxr_fast.explain.pointing import beats_chance, crop_window, image_scores, pointing_score

# One arch of every study family, as tiny untrained timm models of the same classes (the
# registry's names with small settings): (timm name, settings, input px).
FAMILIES = {
    "resnet": ("test_resnet", {}, 64),
    "densenet": ("densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1)), 64),
    "efficientnet": ("test_efficientnet", {}, 64),
    "regnet": ("regnetx_002", {}, 64),
    "convnext": ("test_convnext", {}, 64),
    "vit": ("test_vit", {}, 64),
    "deit3": ("deit3_small_patch16_224", dict(img_size=64, depth=2, embed_dim=32, num_heads=2), 64),
    "beit": ("beit_base_patch16_224", dict(img_size=64, depth=2, embed_dim=32, num_heads=2), 64),
    "swin": ("swin_base_patch4_window7_224", dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1),
                                                  num_heads=(1, 1, 1, 1), window_size=2), 64),
    "mixer": ("mixer_s32_224", dict(img_size=64), 64),
    "resmlp": ("resmlp_12_224", dict(img_size=64), 64),
    "levit": ("levit_128s", dict(img_size=64), 64),
    "mobilevit": ("mobilevit_xxs", {}, 64),
    # its attention biases are built for 7 x 7 final tokens: 224 px, with tiny widths
    "efficientformer": ("efficientformer_l1", dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_vit=1), 224),
}


def _tiny(name: str, settings: dict) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=1, **settings).eval()
    # timm zero-initialises some heads (Mixer, ResMLP): a zero head has zero gradients everywhere.
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == 1:
            torch.nn.init.normal_(module.weight, std=0.2)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_study_family_gets_a_heatmap_of_the_image_shape(family):
    name, settings, size = FAMILIES[family]
    model = _tiny(name, settings)
    explainer = Explainer(model, size, family)
    images = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(1))
    maps = explainer.heatmaps(images)
    assert maps.shape == (4, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    if maps.max() == 0:
        # Grad-CAM keeps positive evidence only, and a random head may see none: the opposite
        # head then sees the negated evidence, which a working map shows.
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == 1:
                module.weight.data.neg_()
        maps = explainer.heatmaps(images)
    assert maps.reshape(4, -1).std(axis=1).max() > 0, f"{family}: flat heatmaps from layer {explainer.layer.name}"
    assert explainer.layer.grid[0] >= 2


def test_token_maps_are_laid_back_on_their_grid_without_prefix_tokens():
    layer = Layer(name="blocks.1", channels=3, grid=(2, 2))
    cls = torch.full((1, 1, 3), 99.0)
    patches = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)
    mapped = to_map(torch.cat([cls, patches], dim=1), layer)
    assert mapped.shape == (1, 3, 2, 2)
    assert torch.equal(mapped[0, :, 0, 1], patches[0, 1]) and (mapped != 99).all()
    nhwc = patches.reshape(1, 2, 2, 3)
    assert torch.equal(to_map(nhwc, layer), nhwc.permute(0, 3, 1, 2))
    with pytest.raises(Unexplainable, match=r"blocks\.1: output of shape \(1, 5, 4\)"):
        to_map(torch.zeros(1, 5, 4), layer)


def test_the_layer_is_the_deepest_with_a_fine_enough_grid():
    model = _tiny("test_resnet", {})
    assert choose_layer(model, 64).name == "layer3"     # layer4 is 2 x 2 at 64 px
    assert choose_layer(model, 224).name == "layer4"    # 7 x 7 at the study's size
    vit = _tiny("test_vit", {})
    assert choose_layer(vit, 64).name.endswith(".norm1")  # class-token pooling: the last block's input


def test_an_arch_it_cannot_explain_is_named_in_one_line():
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    with pytest.raises(Unexplainable) as caught:
        Explainer(plain, 8, "my_mlp")
    message = str(caught.value)
    assert message.startswith("my_mlp: cannot be explained") and "\n" not in message


def test_image_scores_hit_mass_and_chance():
    region = np.zeros((10, 10), dtype=bool)
    region[2:4, 2:7] = True  # 10% of the image
    peak = np.zeros((10, 10), dtype=np.float32)
    peak[3, 4] = 1.0
    peak[8, 8] = 0.5
    hit, mass, share = image_scores(peak, region)
    assert (hit, share) == (1.0, 0.1) and mass == pytest.approx(1 / 1.5)
    assert image_scores(np.ones((10, 10)), region) == (0.1, 0.1, 0.1)  # flat: chance
    assert image_scores(peak[::-1, ::-1].copy(), region)[0] == 0.0
    score = pointing_score([peak, peak], [region, np.zeros_like(region)])  # empty regions are skipped
    assert score["n_images"] == 1 and score["hit_rate"] == 1.0 and score["chance"] == pytest.approx(0.1)
    assert crop_window(np.arange(16).reshape(4, 4), 2).tolist() == [[5, 6], [9, 10]]


def _edema_set(n: int, seed: int, size: int = 64):
    """Frontal phantom images, every other one with edema, and each image's drawn edema region."""
    from cxr_fast.data.phantom.drawing import draw_radiograph_with_regions
    from cxr_fast.loading.augment import MEAN, STD

    images, regions = [], []
    for index in range(n):
        findings = {"Edema": True} if index % 2 == 0 else {}
        pixels, drawn = draw_radiograph_with_regions(findings, rng=np.random.default_rng([seed, index]), size=size)
        images.append(pixels)
        regions.append(drawn.get("Edema", np.zeros((size, size), dtype=bool)))
    x = (torch.from_numpy(np.stack(images)).float()[:, None] / 255 - MEAN) / STD
    return x, np.stack(regions), torch.tensor([index % 2 == 0 for index in range(n)], dtype=torch.float32)


@pytest.mark.slow
def test_a_model_that_learnt_the_finding_points_at_it_and_an_untrained_one_does_not():
    import timm

    x, _, y = _edema_set(320, seed=1)
    test_x, test_regions, test_y = _edema_set(64, seed=2)
    positives = test_y.numpy() == 1

    def score(model):
        maps = Explainer(model.eval(), 64).heatmaps(test_x[positives])
        return pointing_score(list(maps), list(test_regions[positives]))

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=1)
    untrained = score(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            batch = order[start:start + 32]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[batch])[:, 0], y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float(((model.eval()(test_x)[:, 0] > 0).float() == test_y).float().mean())
    trained = score(model)
    assert accuracy >= 0.85, accuracy  # it learnt the finding
    assert beats_chance(trained), trained
    assert not beats_chance(untrained), untrained
    assert trained["hit_rate"] > untrained["hit_rate"] + 0.3
