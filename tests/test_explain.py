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
    assert choose_layer(model, 64).name == "layer2"     # 8 x 8; layer3 is 4 x 4 and layer4 2 x 2 at 64 px
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


DEMO_LIKE_IMAGES = 3000


@pytest.fixture(scope="module")
def demo_like_shards(tmp_path_factory):
    """A phantom as the demo's, smaller: 3,000 images drawn at 128 px, shards at 80 px."""
    from conftest import shard_arguments

    from cxr_fast.data import shard_dataset
    from cxr_fast.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("demo_like")
    generate_phantom(root / "phantom", n_images=DEMO_LIKE_IMAGES, seed=1, image_size=128, workers=2)
    assert shard_dataset.main(shard_arguments(root / "phantom", root / "shards")) == 0
    return root / "shards"


@pytest.mark.slow
def test_a_demo_model_points_at_its_finding_and_an_untrained_one_does_not(demo_like_shards, tmp_path):
    """The demo's recipe (edema_test_resnet, its settings, the training loop) trained on the
    demo's kind of phantom for as many steps as the demo gives it (20 epochs of 2,400 training
    images against the demo's 6 of 6,400), scored by explain's own path (score_pointing: the
    loader's square, the eval crop, the drawn regions) on the phantom's edema positives."""
    from cxr_fast.explain.run import score_pointing
    from cxr_fast.loading.augment import AugmentSettings
    from cxr_fast.loading.payloads import read_manifest
    from cxr_fast.models import build_model
    from cxr_fast.predict import load_trained
    from cxr_fast.recipes import load_config
    from cxr_fast.train import train

    recipe, weights = "edema_test_resnet", tmp_path / "weights"
    summary = train(load_config(recipe, [f"shards={demo_like_shards}", f"weights_dir={weights}",
                                         f"runs_dir={tmp_path / 'runs'}", "epochs=20", "logger=none"]), progress_bar=False)
    assert summary["best_balanced_accuracy"] >= 0.9  # it learnt the finding
    config, _, trained = load_trained(recipe, {"weights_dir": str(weights)})
    augment = AugmentSettings.from_config(config)
    manifest = read_manifest(demo_like_shards)
    positives = manifest[manifest[config.task] == 1].drop_duplicates("key").head(200)

    def score(model):
        explainer = Explainer(model.eval(), augment.image_size, config.arch)
        return score_pointing(explainer, positives, config.task, demo_like_shards, augment, torch.device("cpu"))

    torch.manual_seed(0)
    untrained = build_model(config.arch, pretrained=False, image_size=augment.image_size)
    learnt, chance = score(trained), score(untrained)
    assert learnt["n_images"] == len(positives) >= 150
    assert beats_chance(learnt), learnt
    assert not beats_chance(chance), chance
    assert learnt["hit_rate"] > chance["hit_rate"] + 0.3
