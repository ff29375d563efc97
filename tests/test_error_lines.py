"""Every project error class reaches the user as one line ``<Class>: <message>`` and exit code 2; anything else keeps
its traceback. The recipes' own refusals of bad config, exhausted data, a busy folder and NaN weights are run as
subprocesses in ``test_bad_inputs``; here a damaged checkpoint is, through ``recipes.convert``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_plugins.convert import hf_io, megatron_checkpoint
from nemo_plugins.errors import CheckpointError, ProjectError
from recipes import _entry, convert
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state

ROOT = Path(__file__).resolve().parents[1]


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


ERRORS = sorted(_subclasses(ProjectError), key=lambda c: c.__name__)


def test_every_kind_of_project_error_is_known():
    assert {c.__name__ for c in ERRORS} >= {"ConfigError", "DataError", "CheckpointError", "ResourceError",
                                            "NonFiniteError"}


@pytest.mark.parametrize("error", ERRORS, ids=lambda c: c.__name__)
def test_a_project_error_prints_one_line_and_exits_2(error, monkeypatch, capsys):
    monkeypatch.setattr(_entry, "shutdown", lambda: None)  # the test session keeps its process group
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop, _entry.project_errors():
        raise error("data/x.bin is short:\n  expected 8 bytes")
    assert stop.value.code == _entry.ERROR_EXIT_CODE == 2
    assert capsys.readouterr().err == f"{error.__name__}: data/x.bin is short: expected 8 bytes\n"


def test_full_error_keeps_the_traceback(monkeypatch):
    monkeypatch.setattr(_entry, "shutdown", lambda: None)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(CheckpointError), _entry.project_errors():
        raise CheckpointError("damaged")


def test_a_bug_is_not_folded_into_one_line(monkeypatch):
    monkeypatch.setattr(_entry, "shutdown", lambda: None)
    with pytest.raises(KeyError), _entry.project_errors():
        raise KeyError("a bug")


def test_a_recipe_refuses_a_damaged_checkpoint_with_one_line(tmp_path):
    config = tiny_config(tie_embeddings=False)
    src = hf_io.write_model_dir(hf_state(hf_model(config)), config, tmp_path / "hf")
    convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-megatron", str(tmp_path / "meg")]))
    victim = sorted((tmp_path / "meg" / megatron_checkpoint.WEIGHTS_DIR).glob("*.distcp"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    done = subprocess.run([sys.executable, "-m", "recipes.convert", "--src", f"megatron:{tmp_path / 'meg'}",
                           "--to-hf", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith(f"CheckpointError: {victim} has "), lines[-1]
    assert lines[-1].endswith("the checkpoint is damaged"), lines[-1]
    assert not (tmp_path / "out").exists()
