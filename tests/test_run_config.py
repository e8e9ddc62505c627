"""A config resolved once into typed parts: validating reads no data, each part is the
owner's, and a run's saved config resolves to the parts it trained with."""

import dataclasses
import json

import ml_collections
import pytest

from jaxmerge import config_lib, input_pipeline, models, run_config
from jaxmerge.input_pipeline import sources
from tests.tiny import tiny_config


@pytest.fixture
def no_data_access(monkeypatch):
    """Any preparing or reading of a dataset fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a dataset was prepared or read: {args}")

    monkeypatch.setattr(input_pipeline, "ensure_prepared", refuse)
    monkeypatch.setattr(sources, "open_source", refuse)
    monkeypatch.setattr(sources, "builder", refuse)


def test_validating_a_dataset_task_reads_and_writes_no_data(tmp_path, no_data_access):
    missing = tmp_path / "never_made"
    config = tiny_config(missing, task="my_digits", **{"dataset.name": "sklearn_digits"})
    config_lib.validate(config)
    config.dataset.outputs = -1
    with pytest.raises(ValueError, match=r"config.dataset.outputs: got -1"):
        config_lib.validate(config)
    config.dataset.outputs, config.dataset.norm_points = 0, "a"
    with pytest.raises(ValueError, match=r"config.dataset.norm_points: got 'a'"):
        config_lib.validate(config)
    assert not missing.exists()


def test_resolving_a_registered_task_reads_and_writes_no_data(tmp_path, no_data_access):
    missing = tmp_path / "never_made"
    parts = run_config.resolve(tiny_config(missing))
    assert parts.task.name == "digits" and parts.data.data_dir == str(missing)
    assert not missing.exists()


def test_each_owner_gets_its_part():
    config = tiny_config("", **{"lora.rank": 4, "lora.dropout": 0.1, "learning_rate": 0.5})
    parts = run_config.resolve(config)
    assert parts.model.kwargs == models.get("vit").variant(
        "mu/4", image_size=8, pool="cls", pooler=False, layer_norm_eps=1e-6, gelu_approximate=False
    )
    assert (parts.model.lora_dropout, parts.model.dtype) == (0.1, "float32")
    assert parts.lora.rank == 4 and parts.lora.targets == models.get("vit").target_regex("qv")
    assert parts.optimizer.learning_rate == 0.5 and parts.optimizer.steps == config.steps
    assert (parts.data.batch_size, parts.data.mean, parts.data.std) == (16, (0.5,), (0.5,))
    assert (parts.head.type, parts.head.hidden) == ("mlp", 16)
    assert parts.base == run_config.BaseSettings("random", "", config.seed + 10_000)
    config.mode = "head"
    assert run_config.resolve(config).lora is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        parts.model.family = "clip"


def test_a_family_reads_only_its_own_model_fields():
    """CLIP's variant never sees the ViT-only knobs of the shared config.model."""
    config = tiny_config("", **{"model.family": "clip", "model.pooler": True, "model.pool": "mean"})
    kwargs = run_config.resolve(config).model.kwargs
    assert kwargs == models.get("clip").variant("mu/4", image_size=8, layer_norm_eps=1e-6)
    assert kwargs["pool"] == "cls" and "pooler" not in kwargs and "gelu_approximate" not in kwargs


def test_a_saved_config_resolves_to_the_parts_it_trained_with(tmp_path):
    config = tiny_config(tmp_path, **{"model.family": "clip"})
    parts = run_config.resolve(config)
    saved = ml_collections.ConfigDict(json.loads(json.dumps(parts.record)))
    again = run_config.of_saved(saved, parts.task)
    assert again == parts  # the record itself is not compared
    assert parts.record["model"]["pixel_mean"] == list(models.get("clip").pixel_mean)


def test_an_old_saved_config_takes_the_defaults_its_run_ran_with():
    """Configs saved before model families, LoRA compute, kernels and data threads."""
    old = config_lib.base_config().to_dict()
    for field in ("family", "lora_compute", "kernels", "pixel_mean", "pixel_std"):
        del old["model"][field]
    del old["data_threads"]
    parts = run_config.of_saved(ml_collections.ConfigDict(old))
    assert (parts.model.family, parts.model.lora_compute, parts.model.kernels) == (
        "vit", "branch", "auto"
    )  # fmt: skip
    assert parts.data.threads >= 1 and parts.data.mean == (0.5,)
