"""Model registry, recipe composition and validation."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from cxr_fast.errors import CxrError
from cxr_fast.loading.augment import AugmentSettings
from cxr_fast.models import ARCHS, STUDY_ARCHS, build_model, get_arch, list_archs
from cxr_fast.recipes import Augmentation, Config, all_recipes, load_config, recipe_from_legacy, split_recipe
from cxr_fast.tasks import TASKS


# ------------------------------------------------------------------ registry

def test_registry_has_the_19_study_archs_and_small_ones():
    assert len(STUDY_ARCHS) == 19
    assert set(STUDY_ARCHS) >= {"convnext_large", "convnext_base_384", "resmlp_36", "mobilevit_xs", "swin_base"}
    assert get_arch("convnext_base_384").timm_name == "convnext_base.fb_in22k_ft_in1k_384"
    assert get_arch("resmlp_36").timm_name == "resmlp_36_224.fb_distilled_in1k"
    assert get_arch("mobilevit_xs").image_size == 256
    assert len([a for a in ARCHS.values() if not a.study]) >= 2
    assert list_archs("convnext_*", study_only=True) == ["convnext_large", "convnext_base", "convnext_base_384", "convnext_tiny"]


def test_registry_names_are_current_timm_names_with_pretrained_tags():
    import timm

    pretrained = set(timm.list_pretrained())
    for slug in STUDY_ARCHS:
        assert get_arch(slug).timm_name in pretrained, slug


@pytest.mark.slow
@pytest.mark.parametrize("slug", STUDY_ARCHS)
def test_every_study_arch_builds_and_runs_at_native_size(slug, recwarn):
    arch = get_arch(slug)
    model = build_model(slug, pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, arch.image_size, arch.image_size))
    assert out.shape == (1, 1)
    assert not [w for w in recwarn if "deprecat" in str(w.message).lower()], "deprecated timm name"


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(CxrError, match="unknown arch 'resnet5'"):
        get_arch("resnet5")


def test_unreachable_hub_says_how_to_go_on(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise FileNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CxrError, match="pretrained=false.*pretrained_file="):
        build_model("resnet50", pretrained=True)


# ------------------------------------------------------------------ recipes

def test_every_recipe_resolves_to_a_valid_config():
    names = all_recipes()
    assert len(all_recipes(study_only=True)) == 114
    for name in names:
        config = load_config(name)
        assert config.recipe == name and f"{config.task}_{config.arch}" == name
        assert config.resolved_image_size > 0 and config.resolved_batch_size > 0


def test_study_defaults_follow_the_original_study():
    config = load_config("effusion_convnext_large")
    assert config.epochs == 500 and config.early_stopping == 0 and config.pretrained
    assert config.lr == 5e-5  # the arch's settings in cxr_fast/models.py


def test_recipe_layers_compose_in_order(tmp_path):
    (tmp_path / "defaults.yaml").write_text("epochs: 10\nlr: 0.1\nseed: 3\nweight_decay: 0.2\n")
    (tmp_path / "tasks.yaml").write_text("edema: {lr: 0.3}\n")
    (tmp_path / "edema_test_resnet.yaml").write_text("weight_decay: 0.5\n")
    config = load_config("edema_test_resnet", ["seed=7"], recipes_dir=tmp_path)
    assert (config.epochs, config.lr, config.weight_decay, config.seed) == (30, 0.3, 0.5, 7)
    other = load_config("effusion_test_resnet", recipes_dir=tmp_path)  # the arch's settings beat defaults.yaml
    assert (other.epochs, other.lr, other.weight_decay, other.pretrained) == (30, 2e-3, 0.01, False)
    assert load_config("effusion_resnet50", recipes_dir=tmp_path).lr == 0.1


def test_every_arch_setting_is_a_known_setting_and_an_archs_file_is_refused(tmp_path):
    for arch in ARCHS.values():
        assert set(arch.settings) <= {spec.name for spec in dataclasses.fields(Config)}, arch.slug
    (tmp_path / "archs.yaml").write_text("resnet50: {lr: 0.2}\n")
    with pytest.raises(CxrError, match="archs.yaml: per-arch settings live in cxr_fast/models.py"):
        load_config("edema_resnet50", recipes_dir=tmp_path)


@pytest.mark.parametrize(("override", "message"), [
    (["lerning_rate=1"], "unknown setting 'lerning_rate'"),
    (["lr=fast"], "setting 'lr' expects float"),
    (["epochs=2.5"], "setting 'epochs' expects int"),
    (["hflip=maybe"], "setting 'hflip' expects bool"),
    (["loader=ram"], "setting 'loader' must be one of"),
    (["epochs=0"], "'epochs' must be > 0"),
    (["image_size=7"], r"^setting 'image_size' must be >= 32 \(or 0\), got 7$"),
    (["image_size=1"], "setting 'image_size' must be >= 32"),
    (["lr=nan"], r"^setting 'lr' must be a finite number, got nan$"),
    (["lr=-inf"], "setting 'lr' must be a finite number"),
    (["warmup_epochs=inf"], "setting 'warmup_epochs' must be a finite number"),
    (["device_memory_budget=nan"], "setting 'device_memory_budget' must be a finite number"),
    (["crop_scale_min=0"], r"setting 'crop_scale_min' must be in \(0, 1\], got 0.0"),
    (["min_lr_ratio=1.5"], r"setting 'min_lr_ratio' must be in \[0, 1\]"),
    (["seed=-1"], "setting 'seed' must be >= 0"),
    (["task=edema"], "set by the recipe name"),
    (["lr"], "expected key=value"),
])
def test_config_errors_name_the_setting(override, message):
    with pytest.raises(CxrError, match=message) as error:
        load_config("edema_resnet50", override)
    assert "\n" not in str(error.value)


def test_every_float_setting_refuses_nan_and_infinity():
    floats = [spec.name for spec in dataclasses.fields(Config) if typing.get_type_hints(Config)[spec.name] is float]
    assert len(floats) >= 10
    for key in floats:
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(CxrError, match=f"^setting '{key}' must be a finite number"):
                load_config("edema_resnet50", [f"{key}={value}"])


def test_image_size_zero_is_the_native_size_and_32_is_the_smallest():
    assert load_config("edema_test_resnet", ["image_size=0"]).resolved_image_size == 64
    assert load_config("edema_test_resnet", ["image_size=32"]).resolved_image_size == 32


def test_augment_settings_take_every_augmentation_setting_from_the_config():
    config = load_config("edema_test_resnet", ["crop_ratio=1.3", "hflip=true", "eval_crop=0.5", "image_size=48"])
    settings = AugmentSettings.from_config(config)
    assert (settings.crop_ratio, settings.hflip, settings.eval_crop, settings.image_size) == (1.3, True, 0.5, 48)
    defaults = AugmentSettings(image_size=48)
    for spec in dataclasses.fields(Augmentation):
        assert getattr(defaults, spec.name) == getattr(load_config("edema_test_resnet"), spec.name), spec.name


def test_bad_yaml_names_the_file(tmp_path):
    (tmp_path / "defaults.yaml").write_text("epochs: [1,\n")
    with pytest.raises(CxrError, match="defaults.yaml: not valid YAML"):
        load_config("edema_resnet50", recipes_dir=tmp_path)


def test_recipe_names_and_the_original_cli_form():
    assert split_recipe("no_finding_convnext_base_384") == ("no_finding", "convnext_base_384")
    assert recipe_from_legacy("1", "convnext_large") == "effusion_convnext_large"
    assert recipe_from_legacy("5", "resnet50") == "no_finding_resnet50"
    for bad in ("effusion_resnet5", "lungs_resnet50", "effusion"):
        with pytest.raises(CxrError, match="unknown recipe"):
            split_recipe(bad)
    with pytest.raises(CxrError, match="out of range"):
        recipe_from_legacy("6", "resnet50")


def test_tasks_keep_the_original_label_index_order():
    assert TASKS == ("cardiomegaly", "effusion", "edema", "fracture", "pneumonia", "no_finding")
