"""`python -m jaxmerge COMMAND [flags]`: the dispatch to `jaxmerge.commands`, its list of
commands and its one-line errors."""

import importlib
import os
import subprocess
import sys

import pytest

from jaxmerge import __main__ as dispatcher
from jaxmerge.commands import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED = "allowed: prepare, train, evaluate, merge, predict, zero_shot_heads"


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
