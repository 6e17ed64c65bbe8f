"""What "same run" means: a saved run continues only under the settings it was trained with.

`SAME_RUN_NEUTRAL` lists the settings that may differ: `epochs` and `early_stopping` (when to
stop, not what an epoch does) and knobs that change speed, logging or where files go, not what
is learnt. Imports no torch: `sweep` asks it too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cxr_fast.errors import CxrError
from cxr_fast.recipes import Config
from cxr_fast.schema import finished_status

SAME_RUN_NEUTRAL = frozenset({
    "epochs", "early_stopping",                                   # when to stop
    "loader", "decoded_cache", "decode_threads", "device_memory_budget", "compile", "channels_last", "deterministic",
    "precision",  # numerics of the same computation; the NaN-loss remedy continues with precision=fp32
    "logger", "wandb_project", "log_every", "checkpoint_every", "runs_dir", "weights_dir", "restart",
})


def changed_settings(saved: dict, config: Config) -> dict[str, tuple]:
    """{setting: (saved value, requested value)} for the settings that make `config` another run
    than the one saved. A setting the saved run predates counts at its default."""
    defaults = {field.name: field.default for field in dataclasses.fields(Config)}
    requested = config.to_dict()
    return {key: (saved.get(key, defaults[key]), value) for key, value in requested.items()
            if key not in SAME_RUN_NEUTRAL and saved.get(key, defaults[key]) != value}


def refuse_changed_settings(saved: dict, config: Config, source: Path) -> None:
    """A CxrError listing what differs between the saved run (read from `source`) and `config`."""
    changed = changed_settings(saved, config)
    if changed:
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise CxrError(f"{source}: the saved run of {config.recipe} has other settings ({listed}); "
                       f"to start fresh give another weights_dir= or restart=true (discards the saved run)")


def is_finished(config: Config) -> bool:
    """Whether training `config` would have nothing to do: the check `cxr_fast.train` makes
    (raising `epochs=` reopens a finished recipe). A saved run with other settings is not
    finished for these: train refuses it, saying why. (`sweep` and `study_status` both ask.)"""
    status = finished_status(config.weights_path, recipe=config.recipe, epochs=config.epochs)
    return status is not None and not (isinstance(status.get("config"), dict)
                                       and changed_settings(status["config"], config))
