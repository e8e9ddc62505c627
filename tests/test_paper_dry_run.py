"""The paper suite end to end at full size before anyone rents an accelerator.

`experiments/configs/paper.py:dry_run=1` through the study's command line: ViT-B/16 at 224 px
in bfloat16, loaded from a Hugging Face checkpoint with the real key names (random weights,
`b16_weights`), the six tasks with their real heads and losses on fake copies of the five
downloads in their original layouts (`jaxmerge.datasets.fakes`), prepared by the real builders;
2 training steps per task and mode, `cat` merges of every pair and triple (and `ties` of every
pair), `cat` with head refits, adapter-removed scores, similarities and the report.

Measured on the 2 CPU cores this was written on (2 XLA devices, batch 2), shared with other
jobs (load average 5 to 9): the study 6.4 to 6.9 min (training 2.5 to 2.9, merges, scoring
and the report 3.7 to 4.0), this file 7.1 min; 9.6 min for the study under heavier load.
The time goes to compiling and running ViT-B/16 in bfloat16 on CPU, not to the data.
"""

import json
import math
import os
import subprocess
import sys

import b16_weights
import pytest

from experiments import study
from experiments.configs import paper
from jaxmerge import runs as runs_lib
from jaxmerge.datasets import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Minutes on a CPU: CI runs it in its own step (`pytest -m full_size`), not in the README's.
pytestmark = pytest.mark.full_size


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(config, workdir, stdout) of one finished dry run."""
    tmp = tmp_path_factory.mktemp("paper_dry_run")
    manual_dir = fakes.write_all(tmp / "downloads", small_eval=True)
    base = b16_weights.write_hf(str(tmp / "vit-b16"), "ViTModel")
    arg = f"dry_run=1,base=hf,path={base},data_dir={tmp / 'tfds'},manual_dir={manual_dir}"
    workdir = tmp / "workdir"
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        # numpy's BLAS threads beside XLA's made each small SVD of the similarity stage take
        # a second instead of a few milliseconds on 2 cores.
        "OPENBLAS_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "experiments.study"]
    command += [f"--config={ROOT}/experiments/configs/paper.py:{arg}", f"--workdir={workdir}"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    config = paper.get_config(arg.replace("dry_run=1", "dry_run=0"))
    return config, workdir, run.stdout


def _records(workdir):
    with open(workdir / "report" / "raw.jsonl") as f:
        return [json.loads(line) for line in f]


def _finite(scores: dict) -> bool:
    """Every number of a result or score record is finite (names and counts aside)."""
    numbers = [v for v in scores.values() if isinstance(v, float)]
    return bool(numbers) and all(math.isfinite(v) for v in numbers)


def test_every_run_trained_at_full_size_and_scored_finite(dry_run):
    config, workdir, _ = dry_run
    records = _records(workdir)
    training = [r for r in records if r["kind"] == "train"]
    assert {(r["task"], r["mode"]) for r in training} == {
        (t, m) for t in config.tasks for m in ("lora", "head")
    }
    for r in training:
        assert r["result"]["step"] == 2 and r["result"]["examples"] >= 1, r
        assert _finite(r["result"]), r
    meta = records[0]
    assert meta["kind"] == "meta" and meta["steps"] == 2
    with open(workdir / "seed_0/adapters/wflw/checkpoints/2/metadata/metadata") as f:
        saved = json.load(f)
    assert saved["model"]["width"] == 768 and saved["model"]["depth"] == 12
    assert saved["model"]["image_size"] == 224 and saved["config"]["model"]["dtype"] == "bfloat16"
    assert saved["head"]["outputs"] == 196  # 98 landmarks


def test_every_pair_and_triple_is_scored(dry_run):
    config, workdir, stdout = dry_run
    merges = [r for r in _records(workdir) if r["kind"] == "merges"]
    combos = study.combinations(config.tasks, (2, 3))
    assert len(combos) == 15 + 20
    pairs = study.combinations(config.tasks, (2,))
    for method, expected in (("cat", combos), ("cat+refit", combos), ("ties", pairs)):
        scored = {tuple(r["tasks"]): r["scores"] for r in merges if r["method"] == method}
        assert set(scored) == set(expected), method
        for combo, scores in scored.items():
            assert set(scores) == set(combo)
            assert all(_finite(s) for s in scores.values()), (method, combo, scores)
    assert "main_table" in stdout
    for name in ("tables.md", "main_table.md", "heatmap_cat.png", "baselines.png"):
        assert os.path.getsize(workdir / "report" / name) > 0, name


def test_paper_adapter_config_is_the_paper_run_of_one_task():
    import importlib.util

    from jaxmerge import config_lib

    spec = importlib.util.spec_from_file_location(
        "paper_adapter", os.path.join(ROOT, "configs", "paper_adapter.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("task=expw,mode=head,path=/nowhere")
    config_lib.validate(config)
    study_run = study.run_config(paper.get_config("path=/nowhere"), "expw", "head", 0)
    assert config.to_dict() == {**study_run.to_dict(), "seed": config.seed}
    assert config.model.dtype == "bfloat16" and config.model.variant == "B/16"
    with pytest.raises(ValueError, match="task='digits'; allowed"):
        module.get_config("task=digits")


def test_refit_reads_a_seeded_subset_of_a_training_split(dry_run):
    """The paper config caps head refits at `refit_examples` per task (FireRisk's 70k training
    images at 224 px would be 42 GB of float32)."""
    import numpy as np

    from jaxmerge import training

    config, workdir, _ = dry_run
    assert config.refit_examples == 2048
    run = runs_lib.load(training.run_dir(str(workdir / "seed_0"), "lora", "galaxy10"))
    model_def, _ = runs_lib.base_of([run])
    images, targets = runs_lib.examples(run, model_def)
    subset, subset_targets = runs_lib.examples(run, model_def, count=3)
    again, _ = runs_lib.examples(run, model_def, count=3)
    assert len(images) == 16 and subset.shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(subset, again)
    for image in subset:  # each one of the split's examples
        assert any(np.array_equal(image, other) for other in images)
    assert len(targets) == 16 and subset_targets.shape == (3,)
