"""The study end to end on a tiny ViT: files written, caches reused, numbers consistent; and the
paper suite's config through the same validation."""

import importlib
import json
import os

import numpy as np
import pytest

from experiments import report, study
from experiments.configs import offline, paper
from jaxmerge import runs as runs_lib
from jaxmerge import tasks

TASKS = ("digits", "digits_value", "digit_box")
METHODS = ("cat", "ties")


def tiny_config(data_dir):
    config = offline.get_config("seeds=1,steps=10,base=random")
    config.tasks = TASKS
    config.methods = {
        "cat": {},
        "ties": {"density": 0.5},
        "learned_output_match": {"steps": 5, "images": 32, "batch_size": 8},
    }
    config.method_sizes = {"learned_output_match": (2,)}  # pairs only, as in the quickstart
    config.refit_methods, config.refit_steps = ("cat",), 10
    config.fusion = {"static": {"steps": 5, "images": 32, "batch_size": 8}}
    config.fusion_sizes = (3,)
    config.main_method = "cat"
    t = config.train
    t.data_dir = str(data_dir)
    t.model.variant, t.model.image_size = "mu/4", 8
    t.model.overrides.update(width=0, depth=0, mlp_dim=0, num_heads=0)
    t.batch_size, t.eval_batch_size = 16, 512
    t.warmup_steps, t.log_every, t.checkpoint_every = 2, 10, 10
    t.head.hidden = 16
    t.crop_padding = 0
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(config, workdir, paths) of one finished tiny study."""
    workdir = tmp_path_factory.mktemp("study")
    config = tiny_config(tmp_path_factory.mktemp("tfds"))
    paths = study.run_study(config, str(workdir))
    return config, str(workdir), paths


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_report_files_are_written(finished):
    config, workdir, paths = finished
    for name in ("tables", "main_table", "raw", "baselines", "similarity", "heatmap_cat"):
        assert os.path.getsize(paths[name]) > 0, name
    with open(paths["tables"]) as f:
        text = f.read()
    for task in TASKS:
        assert task in text
    assert "Correlation of similarity and merge quality" in text
    with open(paths["raw"]) as f:
        records = [json.loads(line) for line in f]
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 2 * len(TASKS)
    # learned pairs, cat+refit and one fused triple
    assert kinds.count("merges") == len(METHODS) * (3 + 1) + 3 + 4 + 1
    merges = [r for r in records if r["kind"] == "merges"]
    learned = [r for r in merges if r["method"] == "learned_output_match"]
    assert all(r["learned"]["images_per_task"] == 32 for r in learned) and len(learned) == 3
    assert all(r["learned"]["split"] == ["train"] for r in learned)
    assert sum(r["method"] == "cat+refit" for r in merges) == 4
    assert "What each learned merge and head refit cost" in text and "cat+refit" in text
    (fused,) = [r for r in merges if r["method"] == "fused_static"]
    assert fused["tasks"] == list(TASKS) and sorted(fused["scores"]) == sorted(TASKS)
    assert fused["fusion"]["images_per_task"] == [32] * 3 and fused["fusion"]["split"] == ["train"]
    assert fused["cost"]["reads"] == "unlabeled" and fused["cost"]["fused_ms_per_image"] > 0
    assert "Fused models (adapters kept apart" in text and "| fused_static | triples |" in text
    assert kinds.count("no_adapter") == len(TASKS) and kinds.count("similarity") == 3
    meta = records[0]
    assert meta["kind"] == "meta" and meta["lora"]["rank"] == 8 and meta["steps"] == 10


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_rerun_skips_every_cached_stage(finished, monkeypatch):
    config, workdir, _ = finished
    with open(os.path.join(workdir, "merges.jsonl")) as f:
        before = f.read()

    def fail(*args, **kwargs):
        raise AssertionError("a cached stage ran again")

    monkeypatch.setattr(study.training, "train_and_evaluate", fail)
    monkeypatch.setattr(study, "merge_combo", fail)
    monkeypatch.setattr(study.fuse, "fuse_runs", fail)
    study.run_study(config, workdir)
    with open(os.path.join(workdir, "merges.jsonl")) as f:
        assert f.read() == before


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_normalised_scores_are_merged_over_single(finished):
    config, workdir, paths = finished
    with open(paths["raw"]) as f:
        records = [json.loads(line) for line in f]
    single = {
        r["task"]: r["result"] for r in records if r["kind"] == "train" and r["mode"] == "lora"
    }
    stages = {
        k: [r for r in records if r["kind"] == k] for k in ("no_adapter", "similarity", "merges")
    }
    training = [r for r in records if r["kind"] == "train"]
    scores = report.Scores(config, training, stages)
    merge = next(r for r in stages["merges"] if r["method"] == "cat" and len(r["tasks"]) == 2)
    a, b = merge["tasks"]
    expected = []
    for task in (a, b):
        metric = tasks.get(task).head_kind.main_metric
        merged, alone = merge["scores"][task][metric], single[task][metric]
        expected.append(merged / alone if metric == "accuracy" else alone / merged)
    assert scores.normalised_merge(0, "cat", (a, b)) == pytest.approx(np.mean(expected))


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_scorer_reproduces_the_training_evaluation(finished):
    """The study's cached scorer on the folded adapter gives the run's own final evaluation."""
    config, workdir, _ = finished
    from jaxmerge import lora, scoring, training

    run = runs_lib.load(training.run_dir(study.seed_dir(workdir, 0), "lora", "digits"))
    model_def, base = runs_lib.base_of([run])
    scorer = scoring.run_scorer(run, model_def)
    scores = scorer(lora.fold_into_base(base, run.adapter), run.head)
    with open(os.path.join(run.directory, "result.json")) as f:
        result = json.load(f)
    assert scores["accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_a_cat_merge_of_one_adapter_pair_equals_the_sum_of_updates(finished):
    """cat merges are exact: the merged backbone is base + dW_a + dW_b."""
    config, workdir, _ = finished
    from jaxmerge import lora, training

    runs = [
        runs_lib.load(training.run_dir(study.seed_dir(workdir, 0), "lora", t)) for t in TASKS[:2]
    ]
    model_def, base = runs_lib.base_of(runs)
    by_task = dict(zip(TASKS[:2], runs))
    merged, _ = study.merge_combo(config, by_task, TASKS[:2], "cat", model_def, base, 0, {})
    folded = lora.fold_into_base(base, merged)
    expected = lora.fold_into_base(lora.fold_into_base(base, runs[0].adapter), runs[1].adapter)
    kernel = lambda tree: np.asarray(tree["block_0"]["attention"]["query"]["kernel"])
    np.testing.assert_allclose(kernel(folded), kernel(expected), atol=1e-5)


@pytest.mark.parametrize("config_file", [offline, paper])
def test_suite_configs_validate(config_file):
    """Both suites go through the same validation; the paper's cannot train here (no data)."""
    config = config_file.get_config()
    study.validate(config)
    assert len(config.tasks) == 6 and len(config.methods) >= 7
    assert set(config.tasks) <= set(tasks.TASKS)


def test_bad_study_config_names_the_field(tmp_path):
    config = tiny_config(tmp_path)
    config.methods = {"cat": {}, "nonsense": {}}
    with pytest.raises(ValueError, match="config.methods: unknown method 'nonsense'"):
        study.validate(config)


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "fusion",
            {"gated": {}},
            r"--fuse: got 'gated'; allowed: one of \['static', 'router', 'mixture'\]",
        ),
        (
            "fusion",
            {"static": {"steps": 0}},
            "--merge_param steps: got 0; allowed: an integer >= 1",
        ),
        ("fusion_sizes", (2, 7), r"config.fusion_sizes: got \(2, 7\); allowed: sizes in 2..3"),
    ],
)
def test_bad_fusion_settings_are_one_line_before_anything_trains(tmp_path, field, value, message):
    config = tiny_config(tmp_path)
    config[field] = value
    with pytest.raises(ValueError, match=message):
        study.validate(config)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_head_refit_lowers_the_training_loss_on_a_changed_backbone(finished):
    """Refit retrains only the head: on the bare base (adapter removed) its training loss ends
    below the original head's, and the backbone is left as it was."""
    import jax

    from jaxmerge import training
    from jaxmerge.learned import refit

    config, workdir, _ = finished
    run = runs_lib.load(training.run_dir(study.seed_dir(workdir, 0), "lora", "digits"))
    model_def, base = runs_lib.base_of([run])
    before = jax.tree.map(np.array, base)
    new_head = refit.refit_head(run, model_def, base, steps=200, learning_rate=3e-3)
    features, targets = refit.train_features(run, model_def, base)
    kind, spec = run.task.head_kind, run.task.loss_spec
    loss = lambda head: float(  # noqa: E731
        kind.loss(run.head_def.apply({"params": head}, features), targets, spec).mean()
    )
    assert loss(new_head) < 0.9 * loss(run.head)
    jax.tree.map(np.testing.assert_array_equal, base, before)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_a_cached_rerun_reports_the_time_the_study_took(finished):
    """A rerun that only reads the caches still reports the whole study's time."""
    config, workdir, paths = finished
    first = json.loads(open(paths["raw"]).readline())["study_seconds"]
    again = study.run_study(config, workdir)
    meta = json.loads(open(again["raw"]).readline())
    assert meta["study_seconds"] > first > meta["invocation_seconds"]
    assert f"The study took {meta['study_seconds'] / 60:.1f} min" in open(again["tables"]).read()


@pytest.mark.parametrize(
    "module, where",
    [
        ("experiments.configs.offline", "offline.py"),
        ("experiments.configs.paper", "paper.py"),
        ("experiments.configs.clip", "clip.py"),
        ("configs.paper_adapter", "configs/paper_adapter.py"),
    ],
)
def test_config_files_name_an_unknown_argument_and_the_known_ones(module, where):
    get_config = importlib.import_module(module).get_config
    with pytest.raises(ValueError) as error:
        get_config("steps=1,colour=red")
    assert str(error.value).startswith(f"{where}: unknown arguments ['colour']; known: [")
    assert "'steps'" in str(error.value)
