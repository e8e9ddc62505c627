"""Names that become folders (task and dataset names joined into run and data paths) must be
plain path components, so no config can write or read outside its workdir or data_dir."""

from __future__ import annotations

import re


def check_field(ok: bool, field: str, value, allowed: str) -> None:
    """Raises the config's one-line error for `field` unless `ok`."""
    if not ok:
        raise ValueError(f"config.{field}: got {value!r}; allowed: {allowed}")


def check_plain_name(field: str, name) -> None:
    """Refuses a name that is not one plain path component: a task name is joined into run
    paths (`WORKDIR/adapters/<task>`), where `../x` or `/x` would write outside the workdir."""
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and name == name.strip()
    )
    check_field(plain, field, name, "a plain name: no '/', no '..', not absolute")


def check_dataset_name(name) -> None:
    """A dataset name is `builder[/config][:version]`, each part a plain name (TFDS makes
    folders of them under data_dir)."""
    text = name if isinstance(name, str) else ""
    builder_and_config, _, version = text.partition(":")
    parts = builder_and_config.split("/")
    plain = (
        isinstance(name, str)
        and len(parts) <= 2
        and (not version or re.fullmatch(r"[\w.]+", version))
    )
    if plain:
        for part in parts:
            try:
                check_plain_name("dataset.name", part)
            except ValueError:
                plain = False
    check_field(
        bool(plain),
        "dataset.name",
        name,
        "builder[/config][:version], each part a plain name (no '..', not absolute)",
    )
