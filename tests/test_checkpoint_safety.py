"""Checkpoints are data, not code; a damaged newest checkpoint falls back to the one before it.

The planted pickles are live (a naive load runs them: the control at the end of each test); the project's load
refuses them in one line before anything runs. The fallback tests damage the newest checkpoint of a finished run
and check that the rerun resumes from the checkpoint before and reproduces the uninterrupted trajectory.
"""

import functools
import logging
import pickle
import random
import re

import numpy as np
import pytest
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from nemo_plugins.convert import checkpoint_pickles, megatron_checkpoint, output_dir
from nemo_plugins.data.mix import Cursor
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distill.step import train_with_distillation
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import CheckpointError
from nemo_plugins.model.builder import build_model
from nemo_plugins.train import checkpoint
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.metrics import MetricsLog
from tests.conftest import tiny_config

STUDENT = tiny_config(hidden_size=32, ffn_hidden_size=64)


class Payload:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _rng_item(data):
    """An RNG object as the training checkpoints stored it before (a pickled ShardedObject)."""
    return ShardedObject("rng_state", data, (1, 1), (0, 0), replica_id=0)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint as it comes from elsewhere: without this project's record (whose sizes would not match)."""
    config = tiny_config()
    model = build_model(config, ParallelConfig())
    ckpt = megatron_checkpoint.save_model(model, config, tmp_path / "ckpt")
    (ckpt / output_dir.RECORD).unlink()
    return model, ckpt


def _refused(load, marker, match):
    with pytest.raises(CheckpointError, match=match) as err:
        load()
    assert "\n" not in str(err.value), "one line"
    assert not marker.exists(), "the planted pickle ran"


def test_a_pickle_planted_in_the_metadata_is_refused_before_it_runs(saved, tmp_path):
    model, ckpt = saved
    metadata_file = ckpt / megatron_checkpoint.WEIGHTS_DIR / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # written by the test itself a moment ago
    marker = tmp_path / "ran"
    metadata.storage_meta.modules = [Payload(marker)]
    metadata_file.write_bytes(pickle.dumps(metadata))
    _refused(lambda: megatron_checkpoint.load_weights(model, ckpt), marker, r"\.metadata refers to builtins\.exec")
    pickle.loads(metadata_file.read_bytes())  # control: what torch's reader does with it
    assert marker.exists()


def test_a_pickle_planted_in_common_pt_is_refused_before_it_runs(saved, tmp_path):
    model, ckpt = saved
    common = ckpt / megatron_checkpoint.WEIGHTS_DIR / "common.pt"
    marker = tmp_path / "ran"
    torch.save({**torch.load(common, weights_only=True), "extra": Payload(marker)}, common)
    _refused(lambda: megatron_checkpoint.load_weights(model, ckpt), marker, r"common\.pt holds pickled builtins\.exec")
    torch.load(common, weights_only=False)  # control
    assert marker.exists()


class EnumByGetattr:
    """Pickles as early Python 3.11 pickles an enum member: ``builtins.getattr(EnumClass, name)``."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_metadata_written_by_early_python_3_11_loads_and_its_getattr_reaches_only_enum_members(saved, tmp_path):
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    model, ckpt = saved
    metadata_file = ckpt / megatron_checkpoint.WEIGHTS_DIR / ".metadata"
    original = metadata_file.read_bytes()
    metadata = pickle.loads(original)
    member = next(iter(_MEM_FORMAT_ENCODING))
    metadata.storage_meta.modules = [EnumByGetattr(_MEM_FORMAT_ENCODING, member.name)]
    metadata_file.write_bytes(pickle.dumps(metadata))
    assert checkpoint_pickles.read_metadata(metadata_file.parent).storage_meta.modules == [member]
    megatron_checkpoint.load_weights(model, ckpt)
    for owner, name in ((Metadata, "__init__"), (torch.Size, "__class__"), (_MEM_FORMAT_ENCODING, "__class__")):
        metadata.storage_meta.modules = [EnumByGetattr(owner, name)]
        metadata_file.write_bytes(pickle.dumps(metadata))
        with pytest.raises(CheckpointError, match=f"attribute '{name}'"):
            megatron_checkpoint.load_weights(model, ckpt)
    metadata_file.write_bytes(original)


def test_a_raw_pickle_as_common_pt_is_one_line_before_it_runs(saved, tmp_path):
    model, ckpt = saved
    marker = tmp_path / "ran"
    (ckpt / megatron_checkpoint.WEIGHTS_DIR / "common.pt").write_bytes(pickle.dumps({"extra": Payload(marker)}))
    _refused(lambda: megatron_checkpoint.load_weights(model, ckpt), marker, r"common\.pt")


def test_a_pickle_planted_in_an_rng_shard_is_refused_before_it_runs(tmp_path):
    config = tiny_config()
    model = build_model(config, ParallelConfig())
    marker = tmp_path / "ran"
    ckpt = megatron_checkpoint.save_model(model, config, tmp_path / "ckpt",
                                          extra_sharded={"rng": _rng_item(Payload(marker))})
    _refused(lambda: megatron_checkpoint.load_weights(model, ckpt, extra_sharded={"rng": _rng_item(None)}), marker,
             r"__0_\d\.distcp \(item rng_state/shard_0\.0_1\.1\) holds pickled builtins\.exec")
    dist_checkpointing.load({"rng": _rng_item(None)}, str(ckpt / megatron_checkpoint.WEIGHTS_DIR))  # control
    assert marker.exists()


def _train(out_dir, mix, steps):
    """A tiny distillation run saving every 2 steps and keeping 3 checkpoints; the same weights every call."""
    torch.manual_seed(0)
    teacher = Teacher(build_model(tiny_config(), ParallelConfig()))
    student = build_model(STUDENT, ParallelConfig())
    settings = TrainSettings(seq_len=32, micro_batch_size=2, global_batch_size=4, train_tokens=steps * 128,
                             eval_rows_per_source=2, save_interval=2, keep_last=3)
    run = functools.partial(train_with_distillation, student, STUDENT, teacher, mix, settings,
                            OptimizerSettings(lr=1e-2, min_lr=1e-3), KLOptions(chunk_tokens=16), out_dir)
    return run(Cursor())


def _draws() -> list:
    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3).tolist()
    return [random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist(), tracked]


def test_training_checkpoints_store_rng_as_json_and_restore_every_generator(tmp_path, mix):
    _train(tmp_path, mix, steps=2)  # the last thing it does is saving step 2
    expected = _draws()
    ckpt = checkpoint.latest_checkpoint(tmp_path / "checkpoints")
    metadata = pickle.loads((ckpt / megatron_checkpoint.WEIGHTS_DIR / ".metadata").read_bytes())
    objects = [key for key, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)]
    assert not [key for key in objects if "rng" in key], "RNG state is JSON, not a pickled object"
    assert (ckpt / checkpoint.RNG_DIR / "pp000_tp000.json").is_file()

    from nemo_plugins.train.optimizer import build_optimizer, wrap_for_training

    model = build_model(STUDENT, ParallelConfig())
    ddp, distributed = wrap_for_training(model)
    optimizer, _ = build_optimizer(ddp, OptimizerSettings(lr=1e-2, min_lr=1e-3), 2, distributed)
    assert _draws() != expected
    checkpoint.load_checkpoint(ckpt, model, optimizer)
    assert _draws() == expected


def _truncate_a_shard(ckpt):
    shard = sorted((ckpt / megatron_checkpoint.WEIGHTS_DIR).glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name


def _corrupt_train_state(ckpt):
    path = ckpt / checkpoint.TRAIN_STATE
    path.write_text(path.read_text()[:40])
    return checkpoint.TRAIN_STATE


@pytest.mark.parametrize("damage", [_truncate_a_shard, _corrupt_train_state])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_and_continues_exactly(tmp_path, mix, caplog, damage):
    _train(tmp_path, mix, steps=6)
    uninterrupted = MetricsLog.read(tmp_path / "metrics.jsonl")
    roots = tmp_path / "checkpoints"
    assert [p.name for p in checkpoint.complete_checkpoints(roots)] == [f"step_0000000{n}" for n in (2, 4, 6)]
    damaged_file = damage(roots / "step_00000006")

    with caplog.at_level(logging.INFO):
        _train(tmp_path, mix, steps=6)
    assert f"step_00000006 is damaged: {roots / 'step_00000006'}" in caplog.text and damaged_file in caplog.text
    assert "resumed from" in caplog.text and "step_00000004 (step 4/6" in caplog.text
    assert MetricsLog.read(tmp_path / "metrics.jsonl") == uninterrupted
    assert megatron_checkpoint.damage(roots / "step_00000006") is None, "step 6 saved again"
    assert len(list(roots.glob(".step_00000006.damaged-*"))) == 1, "the damaged one is set aside, not deleted"


def test_no_intact_checkpoint_is_one_line_naming_what_to_delete(tmp_path, mix):
    _train(tmp_path, mix, steps=4)
    roots = tmp_path / "checkpoints"
    for ckpt in checkpoint.complete_checkpoints(roots):
        _truncate_a_shard(ckpt)
    (roots / "step_00000002" / output_dir.RECORD).unlink()
    where = re.escape(str(roots))
    with pytest.raises(CheckpointError, match=f"no intact checkpoint under {where} \\(2 damaged; the newest: "
                                              f".*step_00000004.*\\); delete {where} to start this stage over"):
        _train(tmp_path, mix, steps=4)
    assert [p.name for p in checkpoint.complete_checkpoints(roots)] == [f"step_0000000{n}" for n in (2, 4)], "kept"
