"""Bad configs, names and folders: each refused in one line naming the field (exit 2 at the
command line) before anything is trained, written or read outside where it belongs. The
commands run in-process (`run_command`): a subprocess costs a JAX import each."""

import errno
import importlib
import os
import re
import shutil

import pytest

from jaxmerge import runs, training
from jaxmerge.commands import train as train_command
from tests.tiny import ROOT, run_command, tiny_config, train_argv

# ----------------------------------------------------------------------------- model definitions


@pytest.fixture(scope="module")
def runs_by_model(data_dir, tmp_path_factory):
    """Three 10-step digits runs on the one random base: as trained by default, with tanh GELU
    and with another LayerNorm epsilon (same parameters, so the same base fingerprint)."""
    out = {}
    for name, overrides in [
        ("plain", {}),
        ("gelu", {"model.gelu_approximate": True}),
        ("eps", {"model.layer_norm_eps": 1e-5}),
    ]:
        workdir = tmp_path_factory.mktemp(name)
        config = tiny_config(data_dir, steps=10, checkpoint_every=10, **overrides)
        training.train_and_evaluate(config, str(workdir))
        out[name] = training.run_dir(str(workdir), "lora", "digits")
    return out


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
@pytest.mark.parametrize(
    "other, message",
    [
        ("gelu", ("gelu_approximate", "False", "True")),
        ("eps", ("layer_norm_eps", "1e-06", "1e-05")),
    ],
)
def test_runs_of_different_models_are_refused_in_either_order(runs_by_model, other, message):
    """Merged or scored on one model, the result depended on the order of `--run`."""
    field, plain_value, other_value = message
    plain, changed = runs.load(runs_by_model["plain"]), runs.load(runs_by_model[other])
    assert plain.base_fingerprint == changed.base_fingerprint  # the check that let them pass
    for first, second, a, b, a_name, b_name in [
        (plain, changed, plain_value, other_value, "plain", other),
        (changed, plain, other_value, plain_value, other, "plain"),
    ]:
        expected = (
            rf"^--run: runs define different models .*: model.{field} is {a} in "
            rf"\S*{a_name}\d*/adapters/digits but {b} in \S*{b_name}\d*/adapters/digits$"
        )
        with pytest.raises(ValueError, match=expected):
            runs.base_of([first, second])
    runs.base_of([plain, runs.load(runs_by_model["plain"])])  # one model: accepted


# ----------------------------------------------------------------------------- the train command


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--config.lora.targets="],
            "error: config.lora.targets: got ''; allowed: a preset ['all', 'attention', 'mlp', "
            "'qkv', 'qv'] or a non-empty regex of layer paths",
        ),
        (["--config.lora.targets= "], "error: config.lora.targets: got ' '; allowed: a preset"),
    ],
    ids=["empty targets", "blank targets"],
)
def test_train_refuses_in_one_line(tmp_path, capsys, monkeypatch, extra, message):
    status, lines = run_command(train_command, train_argv(tmp_path, *extra), capsys, monkeypatch)
    assert status == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not os.path.exists(tmp_path / "adapters")  # refused before any folder is made


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("task", "../../x", "config.task: got '../../x'; allowed: a plain name"),
        ("task", "/abs", "config.task: got '/abs'; allowed: a plain name"),
        ("task", "..", "config.task: got '..'; allowed: a plain name"),
        ("dataset.name", "image_folder/../../x", "config.dataset.name: got 'image_folder/../../x'"),
        ("dataset.name", "/abs/x", "config.dataset.name: got '/abs/x'; allowed: builder[/config]"),
        ("dataset.name", "image_folder/..", "config.dataset.name: got 'image_folder/..'"),
    ],
)
def test_task_and_dataset_names_are_plain_path_components(
    data_dir, tmp_path, field, value, message
):
    """`task=../../x` wrote its run outside `--workdir`, `task=/abs` anywhere."""
    overrides = {"dataset.name": "sklearn_digits", "task": "mine", field: value}
    config = tiny_config(data_dir, **overrides)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        training.train_and_evaluate(config, str(tmp_path / "work"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=r"^config.task: got '../x'"):
        training.run_dir(str(tmp_path), "lora", "../x")


def test_a_task_named_by_path_is_refused_at_the_command_line(tmp_path, capsys, monkeypatch):
    argv = train_argv(tmp_path / "work", arg="dataset=sklearn_digits,task=../../escaped")
    status, lines = run_command(train_command, argv, capsys, monkeypatch)
    assert status == 2 and lines == [
        "error: config.task: got '../../escaped'; allowed: a plain name: no '/', no '..', "
        "not absolute"
    ]
    assert not os.path.exists(tmp_path / "escaped") and not os.path.exists(tmp_path / "work")


# ----------------------------------------------------------------------------- annotation files


@pytest.mark.parametrize("name", ["../../outside.jpg", "ABSOLUTE", "1--Event/../../../outside.jpg"])
def test_a_wflw_annotation_cannot_read_outside_the_images_folder(tmp_path, name):
    """The image named is a real, readable photo: without the check it was cropped and stored."""
    from jaxmerge.datasets import fakes, prepare, wflw

    raw = tmp_path / "deep" / "raw"
    fakes.wflw(raw, train_faces=1, test_faces=1)
    outside = tmp_path / "deep" / "outside.jpg"  # WFLW_images/../../outside.jpg
    shutil.copy(raw / "WFLW_images/1--Event/a.jpg", outside)
    name = str(outside) if name == "ABSOLUTE" else name
    line = fakes.wflw_line(fakes.wflw_landmarks(), fakes.WFLW_BOX, (0,) * 6, name)
    annotations = raw / "WFLW_annotations/list_98pt_rect_attr_train_test"
    (annotations / "list_98pt_rect_attr_test.txt").write_text(line + "\n")
    expected = (
        rf"^WFLW {re.escape(str(annotations))}/list_98pt_rect_attr_test.txt line 1: image "
        rf"{re.escape(repr(name))} is outside {re.escape(str(raw / 'WFLW_images'))}; allowed"
    )
    with pytest.raises(ValueError, match=expected):
        prepare.prepare("wflw/size32", str(tmp_path / "data"), str(raw))
    assert wflw.find_files(raw)[1] == raw / "WFLW_images"


@pytest.mark.parametrize("name", ["../../outside.jpg", "ABSOLUTE"])
def test_an_expw_label_line_cannot_read_outside_the_images_folder(tmp_path, name):
    """As for WFLW: the photo named is real and readable, so only the check stops it."""
    from jaxmerge.datasets import fakes, prepare

    raw = tmp_path / "deep" / "raw"
    fakes.expw(raw, photos=3)
    outside = tmp_path / "deep" / "outside.jpg"  # data/image/origin/../../outside.jpg
    shutil.copy(raw / "data/image/origin/0.jpg", outside)
    name = str(outside) if name == "ABSOLUTE" else name
    labels = raw / "data/label/label.lst"
    labels.write_text(labels.read_text() + f"{name} 0 10 30 40 20 0.9 3\n")
    expected = (
        rf"^ExpW label.lst: image {re.escape(repr(name))} is outside "
        rf"{re.escape(str(raw / 'data/image/origin'))}; allowed"
    )
    with pytest.raises(ValueError, match=expected):
        prepare.prepare("expw/size32", str(tmp_path / "data"), str(raw))


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--config.seed=18446744073709551616"],
            "error: config.seed: got 18446744073709551616; allowed: an integer from 0 to "
            "4294957295",
        ),
        (["--config.seed=4294967296"], "error: config.seed: got 4294967296; allowed"),
        (["--config.seed=-1"], "error: config.seed: got -1; allowed"),
    ],
    ids=["2**64", "2**32 (the same key as seed 0)", "negative"],
)
def test_a_seed_jax_cannot_keep_is_refused(tmp_path, capsys, monkeypatch, argv, message):
    status, lines = run_command(train_command, train_argv(tmp_path, *argv), capsys, monkeypatch)
    assert status == 2 and len(lines) == 1 and lines[0].startswith(message), lines


def test_a_typo_inside_the_config_argument_is_one_line(tmp_path, capsys, monkeypatch):
    status, lines = run_command(
        train_command, train_argv(tmp_path, arg="tsak=digits"), capsys, monkeypatch
    )
    assert status == 2
    assert lines == [
        f"error: flag --config={ROOT}/configs/adapter.py:tsak=digits: configs/adapter.py: "
        "unknown arguments ['tsak']; known: task, dataset, mode, base"
    ]


def test_a_read_only_workdir_is_one_line(tmp_path, capsys, monkeypatch):
    """Root writes through chmod; a read-only mount answers EROFS, which this fakes."""
    workdir = tmp_path / "mounted"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(workdir))

    monkeypatch.setattr(os, "makedirs", read_only)
    status, lines = run_command(train_command, train_argv(workdir), capsys, monkeypatch)
    assert status == 2 and lines == [
        f"error: --workdir: cannot write the run folder {workdir}/adapters/digits "
        "(Read-only file system); allowed: a writable folder"
    ]


def test_a_run_folder_without_write_permission_is_one_line(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    config = tiny_config(tmp_path)
    with pytest.raises(ValueError, match=r"^--workdir: cannot write .* \(Permission denied\)"):
        training.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
    "flag, message",
    [
        (
            "--config.crop_paddng=3",
            "error: --config.crop_paddng: unknown config field 'crop_paddng'; did you mean "
            "--config.crop_padding? (fields are listed in the config file)",
        ),
        (
            "--config.lora.rnak=3",
            "error: --config.lora.rnak: unknown config field 'lora.rnak'; did you mean "
            "--config.lora.rank? (fields are listed in the config file)",
        ),
        (
            "--config.foo=1",
            "error: --config.foo: unknown config field 'foo'; see the config file for its fields",
        ),
    ],
)
def test_a_typo_in_a_config_flag_names_the_flag_and_the_field(
    tmp_path, capsys, monkeypatch, flag, message
):
    status, lines = run_command(train_command, train_argv(tmp_path, flag), capsys, monkeypatch)
    assert status == 2 and lines == [message]


@pytest.mark.parametrize(
    "command", ["jaxmerge.commands.train", "jaxmerge.commands.evaluate", "experiments.study"]
)
def test_a_multi_host_flag_without_distributed_is_one_line(tmp_path, capsys, monkeypatch, command):
    argv = train_argv(tmp_path) if command == "jaxmerge.commands.train" else ["--run=x"]
    if command == "experiments.study":
        argv = [f"--config={ROOT}/experiments/configs/offline.py", f"--workdir={tmp_path}"]
    module = importlib.import_module(command)
    status, lines = run_command(module, [*argv, "--process_id=1"], capsys, monkeypatch)
    assert status == 2 and lines == [
        "error: --process_id: given without --distributed; allowed: only with --distributed"
    ]


# ----------------------------------------------------------------------------- folders given


def test_a_folder_that_is_not_a_run_lists_the_runs_under_it(
    digit_runs, tmp_path, capsys, monkeypatch
):
    from jaxmerge.commands import evaluate, merge

    workdir = str(tmp_path / "work")
    run = os.path.join(workdir, "adapters", "digits")
    shutil.copytree(digit_runs[0][0], run)  # the session's run, in a workdir of its own
    os.makedirs(os.path.join(workdir, "notes"))  # a folder that is no run
    expected = (
        f"error: --run: {workdir!r} is not a run folder (it holds no checkpoints/); the runs "
        "under it: adapters/digits; allowed: a run folder WORKDIR/<mode>/<task>, e.g. "
        "WORKDIR/adapters/digits"
    )
    for module in (evaluate, merge):
        argv = ["--run", run, "--run", workdir]
        if module is not evaluate:
            argv += ["--method", "task_arithmetic", f"--output={workdir}/merged"]
        status, lines = run_command(module, argv, capsys, monkeypatch)
        assert status == 2 and lines == [expected], lines
    assert not os.path.exists(f"{workdir}/merged")


@pytest.mark.parametrize("where", ["missing", "file", "empty"])
def test_a_run_folder_that_is_missing_or_empty_says_so(tmp_path, where):
    target = tmp_path / where
    if where == "file":
        target.write_text("")
    if where == "empty":
        target.mkdir()
    message = {
        "missing": "does not exist$",
        "file": "is a file, not a run folder$",
        "empty": r"is not a run folder \(it holds no checkpoints/\); no run folder is under it",
    }[where]
    with pytest.raises(ValueError, match=f"^--run: {re.escape(repr(str(target)))} {message}"):
        runs.load(str(target))


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (
            "jaxmerge.commands.merge",
            ["--run=r1", "--fuse=moe", "--output=OUT"],
            "error: --fuse: got 'moe'; allowed: one of ['static', 'router', 'mixture']",
        ),
        (
            "jaxmerge.commands.merge",
            ["--run=r1", "--fuse=static", "--fold", "--output=OUT"],
            "error: --fold: got True with --fuse static; allowed: --fuse alone",
        ),
        (
            "jaxmerge.commands.merge",
            ["--run=r1", "--output=OUT"],
            "error: --method: none given; allowed:",
        ),
        (
            "jaxmerge.commands.evaluate",
            ["--model=OUT", "--run=r1"],
            "error: --run: got ['r1'] with --model; allowed: --model alone",
        ),
    ],
    ids=["bad --fuse", "--fuse with --fold", "neither --method nor --fuse", "--model with --run"],
)
def test_fuse_and_model_flags_are_refused_in_one_line(
    tmp_path, capsys, monkeypatch, module, argv, message
):
    argv = [arg.replace("OUT", str(tmp_path / "out")) for arg in argv]
    status, lines = run_command(importlib.import_module(module), argv, capsys, monkeypatch)
    assert status == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not os.path.exists(tmp_path / "out")


def test_a_missing_model_folder_says_it_does_not_exist(tmp_path, capsys, monkeypatch):
    from jaxmerge.commands import predict
    from jaxmerge.datasets import fakes

    missing, image = str(tmp_path / "no_such_model"), tmp_path / "x.png"
    fakes.save_image(image, fakes.solid(8, 8, (10, 20, 30)), "PNG")
    status, lines = run_command(predict, ["--model", missing, str(image)], capsys, monkeypatch)
    assert status == 2 and lines == [f"error: --model: {missing!r} does not exist"], lines
