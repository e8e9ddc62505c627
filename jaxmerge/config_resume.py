"""Whether a run may resume under a config: the fields that change a run's result must match
the checkpoint's (a resume under another config would mix two runs in one adapter)."""

from __future__ import annotations

# Fields that cannot change a run's result: they may differ between a run and its resume.
RESULT_NEUTRAL = (
    "log_every",
    "checkpoint_every",
    "eval_batch_size",
    "data_dir",
    "manual_dir",
    "resume_with_changed_config",
    "tensorboard",
    "data_threads",
    "data_workers",
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_unchanged(saved: dict, current: dict, where: str) -> None:
    """Raises ValueError naming every field (but RESULT_NEUTRAL ones) whose value differs
    between the checkpoint's config `saved` and the `current` one (both as JSON dicts)."""
    old, new = _flatten(saved), _flatten(current)
    changed = [
        f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
        for k in sorted(old.keys() | new.keys())
        # Fields absent from the saved config did not exist when it was written.
        if k in old and k not in RESULT_NEUTRAL and old[k] != new.get(k)
    ]
    if changed:
        raise ValueError(
            f"{where}: resuming under a config that differs from the checkpoint's in "
            f"{'; '.join(changed)}; use the same config, another --workdir, or "
            f"--config.resume_with_changed_config=true"
        )
