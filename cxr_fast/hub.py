"""The Hugging Face hub, asked once per process: can it be reached, and are an arch's
pretrained weights in the local cache.

Without this, every pretrained run on a machine without network spends about a minute in
huggingface_hub's retries (5 per file, two files) before its error, and an offline sweep of the
study an hour and a half. Here one request (3 s at most) decides; an unreachable hub switches
huggingface_hub to offline mode (`HF_HUB_OFFLINE=1`, inherited by the processes a sweep starts),
so cached weights still load and a run whose weights are not cached fails at once, before it
decodes any data, with the same one line.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from cxr_fast.errors import CxrError, one_line

PROBE_SECONDS = 3.0
# What timm fetches from a hub repository when its pretrained config names no file (timm/models/_hub.py).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_OFFLINE: dict[str, str | None] = {}  # "reason" -> why the hub cannot be used (None: it can), once per process


def offline_reason() -> str | None:
    """Why the hub cannot be used (`HF_HUB_OFFLINE is set`, or `<endpoint> unreachable (...)`), or None."""
    if "reason" not in _OFFLINE:
        _OFFLINE["reason"] = _probe()
        if _OFFLINE["reason"]:
            _go_offline()
    return _OFFLINE["reason"]


def _probe() -> str | None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None  # it answered, whatever it said
    except (OSError, ValueError) as error:  # URLError, refused, timed out, a malformed endpoint
        return f"{endpoint} unreachable ({one_line(getattr(error, 'reason', error), 80)})"
    return None


def _go_offline() -> None:
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at every call (constants.is_offline_mode)
    os.environ["HF_HUB_OFFLINE"] = "1"


def weights_cached(timm_name: str) -> bool | None:
    """Whether the hub weights timm would load for `timm_name` are in the local cache; None when
    timm names no hub repository for them (it then fetches a URL: not ours to judge)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else WEIGHT_FILES
    return any(isinstance(try_to_load_from_cache(hub_id, name), str) for name in files)


def require_pretrained(timm_name: str) -> None:
    """Fail at once, in one line, when `timm_name`'s pretrained weights can come from nowhere:
    the hub cannot be reached and they are not cached."""
    reason = offline_reason()
    if reason and weights_cached(timm_name) is False:
        raise CxrError(f"{timm_name}: pretrained weights are not in the local cache and the Hugging Face hub cannot "
                       f"be reached ({reason}); run with pretrained=false, or pretrained_file=/path/to/weights.safetensors")
