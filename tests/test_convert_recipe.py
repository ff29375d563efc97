"""recipes.convert both ways through a megatron dist checkpoint is bitwise lossless; bad input is named."""

import json

import pytest
import torch

from nemo_plugins.convert import hf_io, megatron_checkpoint
from nemo_plugins.errors import CheckpointError, ConfigError
from recipes import convert
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state


@pytest.fixture
def tiny_hf_dir(tmp_path):
    config = tiny_config(tie_embeddings=False)
    state = hf_state(hf_model(config))
    return hf_io.write_model_dir(state, config, tmp_path / "hf"), state


def test_hf_to_megatron_to_hf_is_bitwise(tiny_hf_dir, tmp_path):
    src, state = tiny_hf_dir
    convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-megatron", str(tmp_path / "meg")]))
    assert megatron_checkpoint.read_config(tmp_path / "meg") == hf_io.read_config(src)
    convert.run(convert.parse_args(["--src", f"megatron:{tmp_path / 'meg'}", "--to-hf", str(tmp_path / "back")]))
    back = hf_io.read_state(tmp_path / "back")
    assert sorted(back) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert not list(tmp_path.glob(".*partial")), "no temp dir left behind"


def test_missing_shard_is_named(tiny_hf_dir, tmp_path):
    src, state = tiny_hf_dir
    sharded = hf_io.write_model_dir(state, hf_io.read_config(src), tmp_path / "sharded", max_shard_bytes=20_000)
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        hf_io.read_state(sharded)


def test_corrupt_shard_is_named(tiny_hf_dir):
    src, _ = tiny_hf_dir
    shard = src / hf_io.SINGLE_NAME
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        hf_io.read_state(src)


@pytest.mark.parametrize("damage,found", [
    (lambda f: f.unlink(), "is missing"),
    (lambda f: f.write_bytes(f.read_bytes()[:-10]), r"has \d+ bytes, \d+ when saved"),
])
def test_missing_or_truncated_megatron_shard_is_named(tiny_hf_dir, tmp_path, damage, found):
    src, _ = tiny_hf_dir
    convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-megatron", str(tmp_path / "meg")]))
    weights = tmp_path / "meg" / megatron_checkpoint.WEIGHTS_DIR
    victim = sorted(weights.glob("*.distcp"))[0]
    damage(victim)
    with pytest.raises(CheckpointError, match=f"^{victim} {found}: the checkpoint is damaged$"):
        convert.run(convert.parse_args(["--src", f"megatron:{tmp_path / 'meg'}", "--to-hf", str(tmp_path / "x")]))


def test_checkpoint_from_newer_megatron_is_named(tiny_hf_dir, tmp_path):
    from nemo_plugins.convert.megatron_checkpoint import _megatron_version

    if _megatron_version() >= (0, 19):
        pytest.skip("megatron-core >= 0.19 reads both layouts")
    src, _ = tiny_hf_dir
    convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-megatron", str(tmp_path / "meg")]))
    (tmp_path / "meg" / megatron_checkpoint.WEIGHTS_DIR / "common.pt").unlink()
    with pytest.raises(ConfigError, match="megatron-core >= 0.19"):
        convert.run(convert.parse_args(["--src", f"megatron:{tmp_path / 'meg'}", "--to-hf", str(tmp_path / "x")]))


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_onto_a_folder_it_did_not_write_is_refused_and_every_file_survives(tiny_hf_dir, tmp_path):
    """The issue's reproduction: ``--src megatron:RUN/x/megatron --to-hf RUN`` deleted RUN, source included."""
    src, _ = tiny_hf_dir
    run = tmp_path / "RUN"
    convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-megatron", str(run / "x" / "megatron")]))
    (run / "manifest.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    before = _files(run)
    for target, extra in (("--to-hf", []), ("--to-hf", ["--overwrite"]), ("--to-megatron", ["--overwrite"])):
        with pytest.raises(ConfigError, match=f"^{run} exists and is not a .* written by this project") as err:
            convert.run(convert.parse_args(["--src", f"megatron:{run / 'x' / 'megatron'}", target, str(run), *extra]))
        assert "\n" not in str(err.value)
        assert _files(run) == before
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ConfigError, match="is not a Hugging Face export"):
        convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-hf", str(tmp_path / "a_file")]))
    assert (tmp_path / "a_file").read_text() == "mine"


def test_an_earlier_export_is_replaced_only_with_overwrite_and_only_by_the_same_kind(tiny_hf_dir, tmp_path):
    src, state = tiny_hf_dir
    other = hf_io.write_model_dir(hf_state(hf_model(tiny_config(tie_embeddings=False, hidden_size=32))),
                                  tiny_config(tie_embeddings=False, hidden_size=32), tmp_path / "other")
    out = tmp_path / "export"
    out.mkdir()  # an empty directory holds nothing to lose
    convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-hf", str(out)]))
    with pytest.raises(ConfigError, match="holds an earlier Hugging Face export: nothing was written; pass --over"):
        convert.run(convert.parse_args(["--src", f"hf:{other}", "--to-hf", str(out)]))
    with pytest.raises(ConfigError, match="holds a Hugging Face export, not a megatron checkpoint"):
        convert.run(convert.parse_args(["--src", f"hf:{other}", "--to-megatron", str(out), "--overwrite"]))
    assert all(torch.equal(hf_io.read_state(out)[name], tensor) for name, tensor in state.items())
    convert.run(convert.parse_args(["--src", f"hf:{other}", "--to-hf", str(out), "--overwrite"]))
    assert hf_io.read_config(out).hidden_size == 32
    assert not list(tmp_path.glob(".*partial")) and not list(tmp_path.glob(".*replaced")), "nothing left beside it"


def test_a_failure_while_replacing_leaves_the_earlier_output_intact(tiny_hf_dir, tmp_path, monkeypatch):
    src, state = tiny_hf_dir
    convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-megatron", str(tmp_path / "meg")]))
    before = {"hf": _files(src), "meg": _files(tmp_path / "meg")}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_io, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        hf_io.write_model_dir(state, hf_io.read_config(src), src, overwrite=True)
    monkeypatch.setattr(megatron_checkpoint.dist_checkpointing, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-megatron", str(tmp_path / "meg"), "--overwrite"]))
    assert {"hf": _files(src), "meg": _files(tmp_path / "meg")} == before
    assert not list(src.parent.glob(".hf.*partial")), "the HF writer removes its temp dir"
