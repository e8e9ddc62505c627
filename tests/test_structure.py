"""The layout: no import cycle, registries in a fixed order whichever module is imported first,
thin commands that no library module imports, and a new merge method, task or model family is
one new unit that the rest picks up."""

import ast
import json
import os
import pkgutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import experiments
import jaxmerge
from jaxmerge import input_pipeline, lora, merging, models, scoring, tasks, training
from jaxmerge import runs as runs_lib
from jaxmerge.datasets import common
from jaxmerge.models.layers import LoraDense
from jaxmerge.models.names import NameMap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(
    ["jaxmerge", "experiments"]
    + [m.name for m in pkgutil.walk_packages(jaxmerge.__path__, "jaxmerge.")]
    + [m.name for m in pkgutil.walk_packages(experiments.__path__, "experiments.")]
)


def _module_file(name: str) -> str:
    path = os.path.join(ROOT, *name.split("."))
    return os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"


def _imports(name: str) -> set[str]:
    """The jaxmerge / experiments modules `name` imports anywhere, inside functions too: a
    lazy import inside a function hides a circle from Python but not from the layout."""
    tree = ast.parse(open(_module_file(name)).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycle():
    graph = {name: _imports(name) for name in MODULES}
    state: dict[str, str] = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(trail + [name])}")
        state[name] = "open"
        for child in sorted(graph[name]):
            visit(child, trail + [name])
        state[name] = "done"

    for name in MODULES:
        visit(name, [])


# ----------------------------------------------------------------------------- the commands

COMMAND_MODULES = sorted(m for m in MODULES if m.startswith("jaxmerge.commands."))
# The files that may import a command: the dispatcher. Every other file of the project (tests
# aside: they run the commands) uses the library functions under them.
DISPATCHER = "jaxmerge/__main__.py"
CODE_FOLDERS = ("jaxmerge", "experiments", "benchmarks", "scripts", "configs")
MAX_COMMAND_LINES = 150
# What a command module defines in the open: its flags, `main` and `cli`; a helper that checks
# or converts flags is private and short. Work is a library function.
COMMAND_FUNCTIONS = {"define_flags", "main", "cli"}
MAX_HELPER_LINES = 20
# A command computes nothing itself, so it needs none of these.
COMPUTE_PACKAGES = {"jax", "jaxlib", "numpy", "flax", "optax", "orbax", "tensorflow_datasets"}


def _command_imports(path: str) -> list[str]:
    """The `jaxmerge.commands` modules a file imports, by `import`, `from ... import` or
    `importlib.import_module("...")`, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        found += [
            n for n in names if n == "jaxmerge.commands" or n.startswith("jaxmerge.commands.")
        ]
    return found


def test_no_command_is_imported_as_a_library():
    importers = {}
    for folder in CODE_FOLDERS:
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, ROOT)
                if name.endswith(".py") and relative != DISPATCHER:
                    importers[relative] = _command_imports(path)
    assert {file: names for file, names in importers.items() if names} == {}


def test_every_command_is_listed_and_runs_by_its_name():
    from jaxmerge.commands import COMMANDS

    assert sorted(COMMANDS) == [m.rsplit(".", 1)[1] for m in COMMAND_MODULES]


@pytest.mark.parametrize("name", COMMAND_MODULES)
def test_a_command_module_is_thin(name):
    """Flags, their checks and `main` over library functions: a short file, no public function
    but `define_flags`, `main` and `cli`, short private helpers, no class, no array library."""
    source = open(_module_file(name)).read()
    tree = ast.parse(source)
    assert len(source.splitlines()) <= MAX_COMMAND_LINES
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    public = {f.name for f in functions if not f.name.startswith("_")}
    assert public == COMMAND_FUNCTIONS, f"{name}: work belongs in a library module"
    for helper in functions:
        if helper.name.startswith("_"):
            assert helper.end_lineno - helper.lineno < MAX_HELPER_LINES, helper.name
    assert not [node for node in tree.body if isinstance(node, ast.ClassDef)]
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & COMPUTE_PACKAGES, f"{name} imports {imported & COMPUTE_PACKAGES}"


@pytest.mark.slow  # a fresh interpreter per module (30 s): CI runs it in its own step
def test_every_module_imports_on_its_own_with_the_same_registries():
    """Each module imported first, with every jaxmerge module unloaded before it (the TFDS
    builders stay: TFDS refuses a builder name twice in one process): `METHODS`, `TASKS` and
    `FAMILIES` come out the same, in the same order."""
    script = f"""
import importlib, json, sys
out = {{}}
for name in {MODULES!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("jaxmerge", "experiments")]:
        if not loaded.startswith("jaxmerge.datasets"):  # TFDS registers a builder name once
            del sys.modules[loaded]
    importlib.import_module(name)
    from jaxmerge import merging, models, tasks
    out[name] = [list(merging.METHODS), list(tasks.TASKS), list(models.FAMILIES)]
print(json.dumps(out))
"""
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    orders = json.loads(done.stdout.strip().splitlines()[-1])
    expected = [list(merging.METHODS), list(tasks.TASKS), list(models.FAMILIES)]
    assert expected[0][:3] == ["cat", "linear", "ties"]  # PEFT's methods first
    for name, order in orders.items():
        assert order == expected, name


# ----------------------------------------------------------------------------- a new method


def test_a_new_merge_method_is_one_registered_function_with_its_checks():
    def check_power(field, value):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 1")

    @merging.register("sum_of_powers_test", checks={"power": check_power})
    def sum_of_powers(adapters, weights, key, *, power=1):
        """`dW = sum_i w_i^power dW_i` as a delta tree."""
        del key
        trees = [lora.delta_weights(a) for a in adapters]
        return jax.tree.map(lambda *ds: sum(w**power * d for w, d in zip(weights, ds)), *trees)

    try:
        base = models.vit.init_params(
            models.vit.ViT(**models.vit.variant("mu/4", image_size=8)), jax.random.key(0)
        )
        config = lora.LoraConfig(rank=2, targets=models.vit.TARGET_PRESETS["qv"])
        adapters = [lora.init_adapter(jax.random.key(i), base, config) for i in (1, 2)]
        adapters = [
            lora.map_targets(lambda n: {**n, "lora_b": n["lora_b"] + 0.5}, a) for a in adapters
        ]
        merged = merging.merge(adapters, "sum_of_powers_test", [2.0, 3.0], power=2)
        cat = merging.merge(adapters, "cat", [4.0, 9.0])
        for (_, got), (_, want) in zip(lora.target_items(merged), lora.target_items(cat)):
            np.testing.assert_allclose(got["delta"], lora.delta_of(want), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="power: got 0; allowed: an integer >= 1"):
            merging.merge(adapters, "sum_of_powers_test", power=0)
        with pytest.raises(ValueError, match="need exactly one check each"):

            @merging.register("unchecked_test")
            def unchecked(adapters, weights, key, *, power=1):
                return adapters[0]
    finally:
        merging.METHODS.pop("sum_of_powers_test", None)
        merging.METHODS.pop("unchecked_test", None)


# ----------------------------------------------------------------------------- a new task


def _tiny_config(tmp_path, **fields):
    """tests/test_train.py's tiny run, 5 steps, with `fields` ("model.family"-style keys)."""
    from tests.tiny import tiny_config

    short = dict(steps=5, warmup_steps=1, log_every=5, checkpoint_every=5, eval_batch_size=32)
    return tiny_config(tmp_path / "data", **{**short, "head.hidden": 8, **fields})


def _tiny_digits():
    """(images (96, 8, 8, 1) uint8, labels) of scikit-learn's digits 0, 1 and 2: the first 64
    train the new task, the last 32 test it."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.flatnonzero(digits.target < 3)[:96]
    images = np.round(digits.images[keep] * 255 / 16).astype(np.uint8)[..., None]
    return images, digits.target[keep]


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_a_new_task_is_one_builder_and_one_task(tmp_path):
    class TinyDigitsTest(tfds.core.GeneratorBasedBuilder):
        """64 scikit-learn digits of 0, 1 and 2, as a builder a user would write for a new task."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": common.image_feature(8, 1),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            images, labels = _tiny_digits()
            return {
                "train": self._generate_examples(images[:64], labels[:64]),
                "test": self._generate_examples(images[64:], labels[64:]),
            }

        def _generate_examples(self, images, labels):
            for index, (image, label) in enumerate(zip(images, labels)):
                yield index, {"image": common.encode(image), "label": int(label)}

    common.register(TinyDigitsTest)
    task = tasks.register(tasks.Task("tiny_digits_test", "tiny_digits_test", "classification", 3))
    try:
        config = _tiny_config(tmp_path, task=task.name)
        result = training.train_and_evaluate(config, str(tmp_path))
        assert result["task"] == task.name and result["examples"] == 32
        # The accuracy again, from the builder's own test digits and the saved run, without
        # TFDS, the eval batches or the scorer: the new task's data reached the score intact.
        run = runs_lib.load(training.run_dir(str(tmp_path), "lora", task.name))
        model_def, base = runs_lib.base_of([run])
        prepare = input_pipeline.preprocess(
            task, config.model.image_size, False, **run.parts.data.normalization
        )
        images, labels = _tiny_digits()
        rng = np.random.default_rng(0)
        test = np.stack([prepare({"image": i, "label": 0}, rng)["image"] for i in images[64:]])
        logits = scoring.forward(
            model_def, run.head_def, {"lora": run.adapter, "head": run.head}, base, test, False
        )
        logits, targets = np.asarray(logits, np.float64), labels[64:]
        cross_entropy = np.log(np.exp(logits).sum(-1)) - logits[np.arange(32), targets]
        assert result["accuracy"] == pytest.approx(np.mean(np.argmax(logits, -1) == targets))
        assert result["loss"] == pytest.approx(cross_entropy.mean(), rel=1e-4)
    finally:
        tasks.TASKS.pop(task.name)
        common.BUILDERS.pop(TinyDigitsTest.name)


# ----------------------------------------------------------------------------- a new family


class PatchMlp(nn.Module):
    """A family other than the ViT: patches, then residual LoRA-capable MLP blocks, mean-pooled."""

    width: int = 16
    depth: int = 2
    patch_size: int = 4
    image_size: int = 8
    channels: int = 3
    dtype: object = None
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, images, train: bool = False):
        batch, side, _, channels = images.shape
        p = self.patch_size
        patches = images.reshape(batch, side // p, p, side // p, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, p * p * channels)
        dense = lambda n_in, n_out, name: LoraDense(  # noqa: E731
            n_in, n_out, self.lora_dropout, self.lora_compute, dtype=self.dtype, name=name
        )
        x = dense(p * p * channels, self.width, "embed")(patches, train)
        for i in range(self.depth):
            x = x + dense(self.width, self.width, f"mix_{i}")(jax.nn.gelu(x), train)
        return {"pooled": x.mean(1).astype(jnp.float32), "tokens": x.astype(jnp.float32)}


def _patch_mlp_variant(name, **overrides):
    width, patch = name.split("/")
    return {"width": int(width), "patch_size": int(patch), **overrides}


def _patch_mlp_init(model, key):
    images = jnp.zeros((1, model.image_size, model.image_size, model.channels))
    return model.init(key, images)["params"]


# The family's names in a made-up torch library: Linear layers "embed", "mixers.N".
PATCH_MLP_NAMES = NameMap(
    layers={"v5": "mixers"},
    blocks={},
    top={"embed": "embed", "mix_0": "mixers.0", "mix_1": "mixers.1"},
    peft_targets=r"mix_\d+",
)


def _patch_mlp_load(source, path, model):
    """A pretrained base: config.json and model.safetensors of torch Linear weights (out, in),
    named by `PATCH_MLP_NAMES`."""
    from jaxmerge.interop import files

    kwargs = files.read_json(os.path.join(path, "config.json"))
    params = {}
    for name, value in files.read_safetensors(path).items():
        module, _, leaf = name.rpartition(".")
        params = lora.set_at(
            params,
            f"{PATCH_MLP_NAMES.ours(module)}/{'kernel' if leaf == 'weight' else 'bias'}",
            value.T if leaf == "weight" else value,
        )
    return kwargs, params


def _write_patch_mlp_base(folder, kwargs, params):
    from safetensors.numpy import save_file

    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(kwargs, f)
    state = {}
    for path, layer in params.items():
        module = PATCH_MLP_NAMES.theirs(path, "v5")
        state[f"{module}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
        state[f"{module}.bias"] = np.asarray(layer["bias"])
    save_file(state, os.path.join(folder, "model.safetensors"))


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_a_new_model_family_is_one_module(tmp_path):
    """A family registered with its loader of pretrained weights and its name map trains from
    its own checkpoint format and exports its merged adapter to PEFT under its own names."""
    from safetensors.numpy import load_file

    from jaxmerge import evaluation, merge_folder
    from jaxmerge.interop import peft

    family = models.register(
        models.Family(
            "patch_mlp_test",
            PatchMlp,
            _patch_mlp_variant,
            ("width", "depth", "patch_size", "image_size", "channels"),
            {"mixers": r"mix_\d+$"},
            _patch_mlp_init,
            names=PATCH_MLP_NAMES,
            sources=("hf",),
            load_pretrained=_patch_mlp_load,
        )
    )
    try:
        kwargs = {"width": 16, "depth": 2, "patch_size": 4, "image_size": 8, "channels": 3}
        pretrained = _patch_mlp_init(PatchMlp(**kwargs), jax.random.key(5))
        _write_patch_mlp_base(str(tmp_path / "base"), kwargs, pretrained)
        config = _tiny_config(
            tmp_path,
            task="digits",
            **{
                "model.family": family.name,
                "model.variant": "16/4",
                "lora.targets": "mixers",
                "base.source": "hf",
                "base.path": str(tmp_path / "base"),
            },
        )
        result = training.train_and_evaluate(config, str(tmp_path))
        assert result["examples"] == 359
        run = training.run_dir(str(tmp_path), "lora", "digits")
        loaded = runs_lib.load(run)
        assert set(lora.ranks(loaded.adapter)) == {"mix_0", "mix_1"}
        _, base = runs_lib.base_of([loaded])
        jax.tree.map(np.testing.assert_array_equal, base, pretrained)  # the family's loader
        again = evaluation.evaluate_runs([run])["digits"]
        assert again["accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)

        exported = str(tmp_path / "peft")
        merge_folder.merge_to_folder(
            [run], "cat", str(tmp_path / "model"), weights=[1.0], export_peft=exported
        )
        names = sorted(load_file(os.path.join(exported, "adapter_model.safetensors")))
        assert names == [
            f"base_model.model.mixers.{i}.lora_{f}.weight" for i in (0, 1) for f in "AB"
        ]
        read_back, _, _ = peft.load_peft_adapter(exported, names=family.names)
        want = dict(lora.target_items(loaded.adapter))
        assert set(lora.ranks(read_back)) == set(want)
        for path, got in lora.target_items(read_back):
            np.testing.assert_allclose(lora.delta_of(got), lora.delta_of(want[path]), atol=1e-6)
    finally:
        models.FAMILIES.pop(family.name)


def test_a_task_can_bring_its_own_preprocessing():
    from jaxmerge import input_pipeline
    from jaxmerge.input_pipeline import ops

    def inverted(task, image_size, train, crop_padding):
        default = input_pipeline.default_preprocess(task, image_size, train, crop_padding)
        return ops.compose(default, lambda ex, rng: {**ex, "image": -ex["image"]})

    plain = tasks.get("digits")
    own = tasks.Task(
        "digits_inverted_test", plain.dataset, "classification", 10, preprocess=inverted
    )
    example = {"image": np.full((8, 8, 1), 255, np.uint8), "label": 3}
    rng = np.random.default_rng(0)
    default_out = input_pipeline.preprocess(plain, 8, train=False)(example, rng)
    own_out = input_pipeline.preprocess(own, 8, train=False)(example, rng)
    np.testing.assert_array_equal(own_out["image"], -default_out["image"])
    assert default_out["image"].shape == (8, 8, 3) and float(default_out["image"].max()) == 1.0
