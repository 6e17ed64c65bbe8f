"""What "same run" means: a saved run continues only under the settings it was trained with,
on the data it was trained on.

`SAME_RUN_NEUTRAL` lists the settings that may differ: `epochs` and `early_stopping` (when to
stop, not what an epoch does) and knobs that change speed, logging or where files go, not what
is learnt. `shards` is among them because it only lists where to look: what a run reads is
compared instead, as its data identity (`shard_folders.data_identity`: the folder resolved from
the listing and its manifest's digest). Imports no torch: `sweep` asks it too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cxr_fast.errors import CxrError
from cxr_fast.recipes import Config
from cxr_fast.schema import finished_status
from cxr_fast.shard_folders import data_identity, describe_data, resolve_shards

SAME_RUN_NEUTRAL = frozenset({
    "epochs", "early_stopping",                                   # when to stop
    "loader", "decoded_cache", "decode_threads", "device_memory_budget", "compile", "channels_last", "deterministic",
    "precision",  # numerics of the same computation; the NaN-loss remedy continues with precision=fp32
    "logger", "wandb_project", "log_every", "checkpoint_every", "runs_dir", "weights_dir", "restart",
    "shards",     # the candidates listed; the data actually read is compared (`same_data`)
})


def changed_settings(saved: dict, config: Config, *, saved_data: dict | None = None,
                     data: dict | None = None) -> dict[str, tuple]:
    """{setting: (saved value, requested value)} for the settings that make `config` another run
    than the one saved. A setting the saved run predates counts at its default. With `data` (the
    identity of what `config` reads) the saved run's data is compared too, as `data`."""
    defaults = {field.name: field.default for field in dataclasses.fields(Config)}
    requested = config.to_dict()
    changed = {key: (saved.get(key, defaults[key]), value) for key, value in requested.items()
               if key not in SAME_RUN_NEUTRAL and saved.get(key, defaults[key]) != value}
    if data is not None and not same_data(saved, saved_data, config, data):
        before = describe_data(saved_data) if saved_data else f"shards {saved.get('shards', defaults['shards'])!r}"
        changed["data"] = (before, describe_data(data))
    return changed


def same_data(saved: dict, saved_data: dict | None, config: Config, data: dict) -> bool:
    """Whether the saved run read the data `data` identifies: equal manifest digests. A run saved
    before its data identity was recorded read the folder its listing resolves to (if it still does)."""
    if saved_data:
        return saved_data.get("digest") == data["digest"]
    listed = saved.get("shards", Config.__dataclass_fields__["shards"].default)
    try:
        folder = resolve_shards(listed, config.resolved_load_size)
    except CxrError:
        return False
    return folder.resolve() == Path(data["shards_dir"]).resolve()


def refuse_changed_settings(saved: dict, config: Config, source: Path, *, saved_data: dict | None = None,
                            data: dict | None = None) -> None:
    """A CxrError listing what differs between the saved run (read from `source`) and `config`."""
    changed = changed_settings(saved, config, saved_data=saved_data, data=data)
    if changed:
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise CxrError(f"{source}: the saved run of {config.recipe} has other settings ({listed}); "
                       f"to start fresh give another weights_dir= or restart=true (discards the saved run)")


def is_finished(config: Config) -> bool:
    """Whether training `config` would have nothing to do: the check `cxr_fast.train` makes
    (raising `epochs=` reopens a finished recipe). A saved run with other settings, or of other
    data than `config` reads (or with no data to read), is not finished for these: train
    refuses it, saying why. (`sweep` and `study_status` both ask.)"""
    status = finished_status(config.weights_path, recipe=config.recipe, epochs=config.epochs)
    if status is None or not isinstance(status.get("config"), dict):
        return status is not None
    try:
        data = data_identity(resolve_shards(config.shards, config.resolved_load_size))
    except CxrError:
        return False
    return not changed_settings(status["config"], config, saved_data=status.get("data"), data=data)
