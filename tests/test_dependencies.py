"""Merging adapters in a script needs none of the optional packages (the extras of
`pyproject.toml`); a function that needs one says which extra installs it."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxmerge import extras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")

# Installed first in the subprocess: every import of an optional package fails, as it does
# where `pip install jaxmerge` left the extras out.
BLOCK_OPTIONAL = f"""
import importlib.abc
import sys

class BlockOptional(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(extras.OPTIONAL)!r}:
            raise ImportError(f"{{name}} is blocked by the test")
        return None

sys.meta_path.insert(0, BlockOptional())
"""


def _readme_script() -> str:
    """The first Python block of the README's "Merge adapters in your own script"."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Merge adapters in your own script", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_optional_packages_are_the_extras_of_pyproject():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project["optional-dependencies"]
    for distribution, extra in extras.OPTIONAL.values():
        assert any(d.startswith(distribution + ">") for d in optional[extra]), distribution
        assert not any(d.startswith(distribution + ">") for d in project["dependencies"])
    (itself,) = [d for d in optional["test"] if d.startswith("jaxmerge[")]
    assert set(itself[len("jaxmerge[") : -1].split(",")) == {e for _, e in extras.OPTIONAL.values()}


def test_the_readme_merge_script_runs_without_the_optional_packages():
    script = (
        BLOCK_OPTIONAL
        + "import jaxmerge.interop.peft, jaxmerge.lora, jaxmerge.model_folder, jaxmerge.recipes\n"
        + _readme_script()
        + "\nassert features.shape[0] == 2, features.shape\n"
        + f"for name in {sorted(extras.OPTIONAL)!r}:\n"
        + "    try:\n"
        + "        __import__(name)\n"
        + "    except ImportError:\n"
        + "        continue\n"
        + "    raise AssertionError(f'{name} was not blocked')\n"
        + "print('merged and ran without the optional packages')\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merged and ran without" in done.stdout


def _load_photo(tmp_path):
    from jaxmerge.datasets import textures

    textures.load_photo("brick")


def _fake_galaxy10(tmp_path):
    from jaxmerge.datasets import fakes

    fakes.galaxy10(tmp_path)


def _load_tokenizer(tmp_path):
    from jaxmerge import text_heads

    text_heads.load_tokenizer(os.path.join(GOLDEN, "clip", "clip_model"))


def _save_plot(tmp_path):
    from experiments.report import plots

    plots._save(None, str(tmp_path), "nothing.png")


def _block(monkeypatch, package: str) -> None:
    """`import package` (and its modules) fails from here on, as if it were not installed."""
    for name in [m for m in sys.modules if m.split(".")[0] == package] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(
    "package, call, message",
    [
        pytest.param(
            "skimage",
            _load_photo,
            'scikit-image is not installed (needed for skimage.data): pip install "jaxmerge[data]"',
            id="textures",
        ),
        pytest.param(
            "h5py",
            _fake_galaxy10,
            'h5py is not installed (needed for h5py): pip install "jaxmerge[data]"',
            id="galaxy10",
        ),
        pytest.param(
            "tokenizers",
            _load_tokenizer,
            'tokenizers is not installed (needed for tokenizers): pip install "jaxmerge[clip]"',
            id="tokenizer",
        ),
        pytest.param(
            "matplotlib",
            _save_plot,
            "matplotlib is not installed (needed for matplotlib.pyplot): "
            'pip install "jaxmerge[plots]"',
            id="plots",
        ),
    ],
)
def test_a_function_that_needs_an_extra_names_it(package, call, message, tmp_path, monkeypatch):
    _block(monkeypatch, package)
    with pytest.raises(ImportError) as error:
        call(tmp_path)
    assert str(error.value) == message


def test_the_digits_dataset_names_its_extra(tmp_path, monkeypatch):
    from jaxmerge.datasets import prepare

    _block(monkeypatch, "sklearn")
    with pytest.raises(ImportError, match=re.escape('pip install "jaxmerge[data]"')):
        prepare.prepare("sklearn_digits", str(tmp_path))


def test_an_installed_optional_package_is_returned():
    assert extras.require("sklearn.datasets").load_digits().images.shape[1:] == (8, 8)
    assert np.asarray(extras.require("skimage.data").brick()).ndim == 2
    with pytest.raises(ValueError, match="not an optional package"):
        extras.require("numpy")
