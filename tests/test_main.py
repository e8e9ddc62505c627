"""`python -m jaxmerge COMMAND [flags]`: the dispatch to `jaxmerge.commands`, its list of
commands and its one-line errors."""

import glob
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from jaxmerge import __main__ as dispatcher
from jaxmerge.commands import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED = "allowed: prepare, train, evaluate, merge, predict, zero_shot_heads"
# Where command lines are written for users: the READMEs and results, and every docstring,
# error message and config of the code.
DOCUMENTED = ["README.md", "experiments/README.md", "benchmarks/*.md"] + [
    f"{folder}/**/*.py"
    for folder in ("jaxmerge", "experiments", "benchmarks", "configs", "scripts")
]


@pytest.mark.parametrize(
    "argv, got", [([], "no command"), (["trian", "--workdir=w"], "unknown command 'trian'")]
)
def test_no_or_an_unknown_command_is_one_line_naming_the_commands(capsys, argv, got):
    with pytest.raises(SystemExit) as exited:
        dispatcher.main(["/site-packages/jaxmerge/__main__.py", *argv])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {got}; {ALLOWED} (python -m jaxmerge --help says what each does)"
    ]


def test_help_lists_every_command(capsys):
    dispatcher.main(["/venv/bin/jaxmerge", "--help"])  # the console script
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxmerge COMMAND [flags]\n")
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  ")] == list(COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_gets_the_arguments_after_its_name(monkeypatch, name):
    command = importlib.import_module(f"jaxmerge.commands.{name}")
    seen = []
    monkeypatch.setattr(command, "cli", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", sys.argv)  # restored after the dispatch sets it
    monkeypatch.setattr(sys.modules["__main__"], "__doc__", None)
    dispatcher.main(["/x/jaxmerge/__main__.py", name, "--output=o", "a.png"])
    assert seen == [[f"python -m jaxmerge {name}", "--output=o", "a.png"]]
    assert sys.modules["__main__"].__doc__ == command.__doc__  # absl's --help prints it


def test_a_commands_help_names_it_and_lists_its_flags():
    done = subprocess.run(
        [sys.executable, "-m", "jaxmerge", "train", "--help"],
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == (
        "Train one LoRA adapter (or a head-finetuning baseline, or the full model) for one task."
    )
    assert "python -m jaxmerge train:" in lines  # the flags' heading: the command's name
    assert {"--config", "--workdir", "--[no]distributed"} <= {
        line.split(":")[0].strip() for line in lines
    }


def test_every_documented_command_line_runs_a_command():
    """`python -m jaxmerge WORD` names a command (the old `python -m jaxmerge.train` forms are
    gone); `python -m jaxmerge.a.b` a module that runs as a script."""
    bad = []
    for pattern in DOCUMENTED:
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            text = open(path).read()
            for module, word in re.findall(r"python -m\s+(jaxmerge[\w.]*)[ \t]*(\w*)", text):
                if module == "jaxmerge":  # no word: the dispatcher itself; COMMAND: a placeholder
                    runs = word in COMMANDS or not word or word.isupper()
                else:
                    spec = importlib.util.find_spec(module)
                    runs = spec is not None and "__main__" in open(spec.origin).read()
                if not runs:
                    bad.append(f"{os.path.relpath(path, ROOT)}: python -m {module} {word}")
    assert bad == []
