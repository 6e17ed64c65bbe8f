"""Architecture registry: the study's 19 slugs (+ CPU-sized ones) -> timm models.

Every model is built with `in_chans=1, num_classes=1`: grayscale in, one logit out. timm
adapts a pretrained RGB stem to one channel by summing its filters over colour.

Everything about an arch is here, its recipe settings too (`Arch.settings`: a recipe layer
between recipes/defaults.yaml and recipes/tasks.yaml, see cxr_fast/recipes.py).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from cxr_fast.errors import CxrError, one_line

if TYPE_CHECKING:  # the registry is read without torch (the study's status view, recipe checks)
    import torch


@dataclass(frozen=True)
class Arch:
    slug: str
    timm_name: str          # current timm name with its pretrained tag (no deprecated aliases)
    image_size: int         # native input size, px
    batch_size: int         # per-GPU default that fits an 80 GB H100 at native size in bf16
    study: bool = True      # one of the 19 architectures of the study
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)  # recipe settings for this arch

    @property
    def pretrained_tag(self) -> str:
        return self.timm_name.partition(".")[2]


# Large transformers (and the largest convnets) fine-tune better with a smaller step.
_SMALLER_STEP = MappingProxyType({"lr": 5.0e-5})
# CPU-sized nets have no pretrained weights and train from scratch: a larger step and far fewer epochs.
_FROM_SCRATCH = MappingProxyType({"lr": 2.0e-3, "weight_decay": 0.01, "epochs": 30, "warmup_epochs": 0.5,
                                  "pretrained": False})

_STUDY = [
    Arch("convnext_large", "convnext_large.fb_in1k", 224, 128, settings=_SMALLER_STEP),
    Arch("convnext_base", "convnext_base.fb_in1k", 224, 192),
    # originally `convnext_base_384_in22ft1k` (deprecated alias)
    Arch("convnext_base_384", "convnext_base.fb_in22k_ft_in1k_384", 384, 64, settings=_SMALLER_STEP),
    Arch("efficientnet_b0", "efficientnet_b0.ra_in1k", 224, 256),
    # originally `resmlp_36_distilled_224` (deprecated alias)
    Arch("resmlp_36", "resmlp_36_224.fb_distilled_in1k", 224, 192),
    Arch("beit_base", "beit_base_patch16_224.in22k_ft_in22k_in1k", 224, 192, settings=_SMALLER_STEP),
    Arch("levit_256", "levit_256.fb_dist_in1k", 224, 256),
    Arch("levit_384", "levit_384.fb_dist_in1k", 224, 256),
    Arch("regnety_008", "regnety_008.pycls_in1k", 224, 256),
    Arch("densenet121", "densenet121.tv_in1k", 224, 192),
    Arch("convnext_tiny", "convnext_tiny.fb_in1k", 224, 256),
    Arch("vit_base", "vit_base_patch16_224.augreg2_in21k_ft_in1k", 224, 192, settings=_SMALLER_STEP),
    Arch("mobilevit_xs", "mobilevit_xs.cvnets_in1k", 256, 256),
    Arch("deit3_small", "deit3_small_patch16_224.fb_in1k", 224, 256),
    Arch("efficientformer_l1", "efficientformer_l1.snap_dist_in1k", 224, 256),
    Arch("mixer_b16", "mixer_b16_224.goog_in21k_ft_in1k", 224, 192),
    Arch("resnet50", "resnet50.a1_in1k", 224, 256),
    Arch("beit_large", "beit_large_patch16_224.in22k_ft_in22k_in1k", 224, 64, settings={"lr": 2.0e-5}),
    Arch("swin_base", "swin_base_patch4_window7_224.ms_in22k_ft_in1k", 224, 128, settings=_SMALLER_STEP),
]

# CPU-sized models for demos and tests: timm's `test_*` nets (a few hundred k parameters),
# trained from scratch at 64 px.
_SMALL = [
    Arch("test_resnet", "test_resnet", 64, 64, study=False, settings=_FROM_SCRATCH),
    Arch("test_convnext", "test_convnext", 64, 64, study=False, settings=_FROM_SCRATCH),
    Arch("test_efficientnet", "test_efficientnet", 64, 64, study=False, settings=_FROM_SCRATCH),
    Arch("test_vit", "test_vit", 64, 64, study=False, settings={**_FROM_SCRATCH, "lr": 1.0e-3}),
]

ARCHS: dict[str, Arch] = {arch.slug: arch for arch in _STUDY + _SMALL}
STUDY_ARCHS: tuple[str, ...] = tuple(arch.slug for arch in _STUDY)
SMALL_ARCHS: tuple[str, ...] = tuple(arch.slug for arch in _SMALL)

# Archs whose positional embeddings or attention biases are tied to the input size: they
# take `img_size` at build time so they can train at another resolution.
_SIZE_AT_BUILD = ("vit_", "deit3_", "beit_", "swin_", "mixer_", "resmlp_", "levit_", "test_vit")


def list_archs(pattern: str = "*", *, study_only: bool = False) -> list[str]:
    """Slugs matching a shell-style wildcard, e.g. `convnext_*` (timm's list_models habit)."""
    return [slug for slug, arch in ARCHS.items() if fnmatch.fnmatch(slug, pattern) and (arch.study or not study_only)]


def get_arch(slug: str) -> Arch:
    try:
        return ARCHS[slug]
    except KeyError:
        raise CxrError(f"unknown arch {slug!r}; see `python -m cxr_fast.train --list '*'` (every recipe, "
                       f"{{task}}_{{arch}})") from None


def build_model(slug: str, *, pretrained: bool, image_size: int | None = None, pretrained_file: str = "") -> torch.nn.Module:
    """The timm model for an arch, one input channel and one logit.

    Pretrained weights come from the Hugging Face hub (or `pretrained_file`, a local
    .safetensors/.pth); a failed download is a CxrError that says how to go on.
    """
    import timm

    arch = get_arch(slug)
    kwargs: dict = {"in_chans": 1, "num_classes": 1}
    if image_size and image_size != arch.image_size and slug.startswith(_SIZE_AT_BUILD):
        kwargs["img_size"] = image_size
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise CxrError(f"{pretrained_file}: pretrained_file not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
        return _model_from_file(arch, pretrained_file, kwargs)
    if pretrained:
        from cxr_fast.hub import require_pretrained

        require_pretrained(arch.timm_name)
    try:
        return timm.create_model(arch.timm_name, pretrained=pretrained, **kwargs)
    except OSError as error:
        # huggingface_hub's "not reachable / not cached" errors are OSErrors.
        raise CxrError(
            f"{arch.timm_name}: pretrained weights could not be loaded ({one_line(error)}); "
            "run with pretrained=false, or pretrained_file=/path/to/weights.safetensors"
        ) from error


def _model_from_file(arch: Arch, pretrained_file: str, kwargs: dict) -> torch.nn.Module:
    """timm's model with weights from a local file, refused unless the file fits: timm loads
    another architecture's file without a word (nothing matches, every weight stays random)."""
    import timm

    with _timm_load_report() as report:
        try:
            model = timm.create_model(arch.timm_name, pretrained=True, **kwargs)
        except Exception as error:  # shape mismatches, unreadable or non-weights files
            raise CxrError(f"{pretrained_file}: cannot be loaded into {arch.timm_name} ({one_line(error, 160)})") from error
    head = model.pretrained_cfg.get("classifier") or ()
    heads = (head,) if isinstance(head, str) else tuple(head)
    # The classifier is replaced (one logit) and BatchNorm's step counter is not a weight.
    unfitting = [key for key in report["missing"] + report["unexpected"]
                 if not key.startswith(tuple(f"{name}." for name in heads)) and not key.endswith("num_batches_tracked")]
    if unfitting:
        raise CxrError(f"{pretrained_file}: does not fit {arch.timm_name} ({len(report['missing'])} weights missing, "
                       f"{len(report['unexpected'])} unexpected, e.g. {unfitting[0]!r}); is it another architecture's?")
    return model


@contextlib.contextmanager
def _timm_load_report():
    """The keys timm's pretrained loader could not place. timm returns them to nobody; it only
    logs them ("Missing keys (a, b) ...", "Unexpected keys (...) ..."), so read its log."""
    report: dict[str, list[str]] = {"missing": [], "unexpected": []}

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            for kind, prefix in (("missing", "Missing keys ("), ("unexpected", "Unexpected keys (")):
                if text.startswith(prefix):
                    report[kind] += [key for key in text[len(prefix):].partition(")")[0].split(", ") if key]

    logger = logging.getLogger("timm.models._builder")
    handler, level, propagate = Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the INFO lines are for us, not the user's console
    try:
        yield report
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
