"""Bad inputs and faults as a new user meets them: each is refused in ONE line naming the key or the file (exit
code 2 from the recipes, no traceback), before any work, and nothing outside the run's own folders changes.

The recipe cases run ``python -m recipes.<name>`` as a user would (tiny megatron teacher / student on SmolLM2's
tokenizer); the rest call the library in-process. Every case reproduces a finding of the bad-input probe.
"""

import dataclasses
import errno
import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_plugins.cascade.plan import plan_from_config
from nemo_plugins.cascade.runner import CascadeInputs, check_data_budget_of_cascade
from nemo_plugins.config.build import build
from nemo_plugins.convert import hf_io, megatron_checkpoint
from nemo_plugins.convert.gguf_reader import read_gguf
from nemo_plugins.convert.sources import embedded_gguf
from nemo_plugins.data.chat import EncodedChat
from nemo_plugins.data.chat_mix import ChatMix, ChatSource, write_chat_tokens
from nemo_plugins.data.mix import Cursor, DataMix, MixSource, check_data_budget, cursor_from_manifest
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.token_store import TokenFile, write_token_file
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distill.stage import prepare_stage
from nemo_plugins.distill.step import train_with_distillation
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError, DataError, NonFiniteError, ResourceError
from nemo_plugins.eval.perplexity import evaluate_perplexity
from nemo_plugins.manifest import write_manifest
from nemo_plugins.model.builder import build_model
from nemo_plugins.output_lock import LOCK, output_lock
from nemo_plugins.train import disk_space, loop
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.facts import RunFacts
from nemo_plugins.train.loop import NonFiniteLossError
from nemo_plugins.train.metrics import MetricsLog
from recipes._entry import ERROR_EXIT_CODE, compose_typed
from tests.conftest import random_token_mix, save_tiny_teacher_and_student, tiny_config

STUDENT = tiny_config(hidden_size=32, ffn_hidden_size=64)
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- helpers


def snapshot(*roots: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every file under ``roots`` (but not under ``skip``) with a digest of its bytes."""
    found = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and not any(path.is_relative_to(s) for s in skip):
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def recipe(name: str, *overrides: str, tmp: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m recipes.<name>`` with Hydra's own output inside the test's temp dir."""
    return subprocess.run([sys.executable, "-m", f"recipes.{name}", *overrides, f"hydra.run.dir={tmp / 'hydra'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "CASCADE_CACHE_DIR": str(tmp / "cache"),
                               **(env or {})})


def refused(done: subprocess.CompletedProcess, kind: str, *fragments: str) -> str:
    """The run exited with code 2 and its stderr ends with one line ``<kind>: ...`` holding every fragment."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == ERROR_EXIT_CODE, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "HYDRA_FULL_ERROR" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith(f"{kind}: "), lines[-1]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def distill(root: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["model=tiny", f"model.source=megatron:{root / 'teacher'}", "model.architecture=null",
            f"student=megatron:{root / 'student'}", f"data.cache_dir={root / 'tokens'}",
            "data.sources=[{name: json, paths: ['stdlib:json'], weight: 1.0}]", "stage.distill.train.seq_len=64",
            "stage.distill.train.micro_batch_size=2", "stage.distill.train.global_batch_size=2",
            "stage.distill.train.train_tokens=256", "stage.distill.train.eval_rows_per_source=1",
            "stage.distill.optimizer.lr=3e-3", f"output_dir={out_dir}", *extra]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny teacher and student on SmolLM2's tokenizer as megatron checkpoints, and one finished distill stage."""
    root = tmp_path_factory.mktemp("bad_inputs")
    save_tiny_teacher_and_student(root)
    done = recipe("distill", *distill(root, root / "finished"), tmp=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture
def mix(tmp_path):
    return random_token_mix(tmp_path, {"key": "k1"})


def _training(out_dir, mix, steps=2, facts=None, optimizer=None, **train):
    torch.manual_seed(0)
    teacher = Teacher(build_model(tiny_config(), ParallelConfig()))
    student = build_model(STUDENT, ParallelConfig())
    settings = TrainSettings(**{"seq_len": 32, "micro_batch_size": 2, "global_batch_size": 4,
                                "train_tokens": steps * 128, "eval_rows_per_source": 2, **train})
    run = functools.partial(train_with_distillation, student, STUDENT, teacher, mix, settings,
                            optimizer or OptimizerSettings(lr=1e-2, min_lr=1e-3), KLOptions(chunk_tokens=16), out_dir,
                            Cursor(), facts=facts)
    return student, run


# ------------------------------------------------------------------------ fail early, in one line (CLI)


@pytest.mark.slow
def test_a_wrong_type_is_named_by_key_in_one_line_before_any_work(models, tmp_path):
    before = snapshot(models)
    done = recipe("distill", *distill(models, tmp_path / "run", "parallel.tp=two"), tmp=tmp_path)
    refused(done, "ConfigError", "parallel.tp: Value 'two' of type 'str' could not be converted to Integer")
    assert not (tmp_path / "run").exists() and snapshot(models) == before


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(models, tmp_path):
    done = recipe("distill", *distill(models, tmp_path / "run", "parallel.tp=two"), tmp=tmp_path,
                  env={"HYDRA_FULL_ERROR": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "full_key: parallel.tp" in done.stderr


@pytest.mark.slow
def test_a_corpus_smaller_than_the_stage_is_refused_before_the_first_step(models, tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 10)
    before = snapshot(models)
    done = recipe("distill", *distill(models, tmp_path / "run", f"data.cache_dir={tmp_path / 'tokens'}",
                                      f"data.sources=[{{name: small, paths: ['{corpus}'], weight: 1.0}}]"),
                  tmp=tmp_path)
    refused(done, "DataError", "more training rows of 64 tokens", "the stage needs 4", "lower the train_tokens")
    assert not (tmp_path / "run").exists(), "a refused run leaves no output folder behind"
    assert snapshot(models) == before


@pytest.mark.slow
def test_rerunning_a_finished_stage_with_a_changed_lr_is_refused_and_writes_nothing(models, tmp_path):
    finished = models / "finished"
    before = snapshot(models, skip=(finished / LOCK,))
    done = recipe("distill", *distill(models, finished, "stage.distill.optimizer.lr=1e-3"), tmp=tmp_path)
    refused(done, "ConfigError", f"{finished} was finished with a different stage config",
            "optimizer.lr: 0.003 -> 0.001", "resume_with_changes=true")
    assert snapshot(models, skip=(finished / LOCK,)) == before


@pytest.mark.slow
def test_resume_with_changes_on_a_finished_stage_retrains_nothing_and_keeps_its_manifest(models, tmp_path):
    finished = models / "finished"
    before = snapshot(models, skip=(finished / LOCK,))
    done = recipe("distill", *distill(models, finished, "stage.distill.optimizer.lr=1e-3", "resume_with_changes=true"),
                  tmp=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nothing is retrained" in done.stderr and "optimizer.lr: 0.003 -> 0.001" in done.stderr
    assert snapshot(models, skip=(finished / LOCK,)) == before, "the manifest keeps the settings it was trained with"


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused(models, tmp_path):
    out = tmp_path / "busy"
    with output_lock(out):
        (out / "metrics.jsonl").write_text("")  # the first run's work in progress
        done = recipe("distill", *distill(models, out), tmp=tmp_path)
        refused(done, "ResourceError", f"{out} is in use by pid {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "metrics.jsonl"]


@pytest.mark.slow
def test_evaluate_refuses_an_unwritable_output_before_loading_the_model(models, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    before = snapshot(models, tmp_path, skip=(tmp_path / "hydra",))
    done = recipe("evaluate", "model=tiny", f"model.source=megatron:{models / 'teacher'}", "model.architecture=null",
                  f"output={blocker / 'ppl.json'}", tmp=tmp_path)
    refused(done, "ConfigError", f"output={blocker / 'ppl.json'}: cannot write there")
    assert snapshot(models, tmp_path, skip=(tmp_path / "hydra",)) == before


@pytest.mark.slow
def test_evaluate_with_nan_weights_is_an_error_and_writes_no_nan(models, tmp_path):
    config = tiny_config(vocab_size=49152)
    model = build_model(config, ParallelConfig())
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.weight[0, 0] = float("nan")
    megatron_checkpoint.save_model(model, config, tmp_path / "nan", tokenizer_dir=models / "teacher" / "tokenizer")
    done = recipe("evaluate", "model=tiny", f"model.source=megatron:{tmp_path / 'nan'}", "model.architecture=null",
                  "data.paths=[stdlib:json]", "data.seq_len=32", "data.max_windows=2",
                  f"output={tmp_path / 'ppl.json'}", tmp=tmp_path)
    refused(done, "NonFiniteError", "non-finite weights (decoder.layers.1.mlp.linear_fc2.weight")
    assert not (tmp_path / "ppl.json").exists()


@pytest.mark.slow
def test_a_refused_cascade_rerun_leaves_resolved_config_yaml_as_it_was(models, tmp_path):
    run = tmp_path / "cascade"
    cascade = [
        f"model.source=megatron:{models / 'teacher'}", "model.architecture=null", "posttrain=false",
        "data.sources=[{name: json, paths: ['stdlib:json'], weight: 1.0}]", f"data.cache_dir={models / 'tokens'}",
        "cascade.children=[{name: a, num_layers: 1, hidden_size: 32, ffn_hidden_size: 64, tie_embeddings: false}]",
        "stage.prune.calibration.tokens=128", "stage.prune.calibration.seq_len=64", "stage.prune.eval.seq_len=64",
        "stage.prune.eval.max_windows=1", "stage.distill_short.train.seq_len=64",
        "stage.distill_short.train.train_tokens=512", "stage.distill_long.train.seq_len=128",
        "stage.distill_long.train.train_tokens=512", "stage.distill_long.context.original_context=64",
        "stage.distill_long.context.yarn_factor=2.0", "until=a/prune", f"output_dir={run}",
    ]
    first = recipe("cascade", *cascade, tmp=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = (run / "resolved_config.yaml").read_text()
    before = snapshot(run, skip=(run / LOCK,))
    done = recipe("cascade", *cascade, "stage.prune.options.hidden_method=magnitude", tmp=tmp_path)
    refused(done, "ConfigError", f"{run / 'a' / 'prune'} was finished with a different stage config",
            "stage.options.hidden_method: 'pca' -> 'magnitude'")
    assert snapshot(run, skip=(run / LOCK,)) == before and (run / "resolved_config.yaml").read_text() == recorded


# ------------------------------------------------------------------------------ typed configs, in-process


@pytest.mark.parametrize("cls,key,values,message", [
    (ParallelConfig, "parallel", {"tp": "two"},
     "parallel.tp: Value 'two' of type 'str' could not be converted to Integer"),
    (ParallelConfig, "parallel", {"sequence_parallel": "maybe"},
     "parallel.sequence_parallel: Value 'maybe' is not a valid bool"),
    (ParallelConfig, "parallel", {"tp": True},
     "parallel.tp: Value 'True' of type 'bool' could not be converted to Integer"),
    (TrainSettings, "train", {"frozen_parameters": "vision.*"},
     r"train.frozen_parameters: Invalid value assigned: .* is not a ListConfig, list or tuple"),
    (TrainSettings, "train", {"fp8": [8]}, r"train.fp8: Cannot convert 'ListConfig' to string"),
    (OptimizerSettings, "optimizer", {"lr": "fast"},
     "optimizer.lr: Value 'fast' of type 'str' could not be converted to Float"),
])
def test_a_value_of_the_wrong_type_is_named_by_its_key(cls, key, values, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        build(cls, values, key)


def test_the_full_path_is_named_inside_nested_settings_and_integers_stand_for_floats():
    stage = compose_typed("distill", "stage.distill.optimizer.lr=1", "stage.distill.kl.temperature=2").stage.distill
    assert stage.optimizer.lr == 1.0 and isinstance(stage.optimizer.lr, float)
    assert isinstance(stage.kl.temperature, float)
    with pytest.raises(ConfigError, match=r"^stage.distill.train.seq_len: Value '1k' of type 'str' could not be"):
        compose_typed("distill", "stage.distill.train.seq_len=1k")
    with pytest.raises(ConfigError, match=r"^stage.distill.optimizer.lrr: unknown key \(allowed here: lr, min_lr,"):
        compose_typed("distill", "stage.distill.optimizer.lrr=1")
    with pytest.raises(ConfigError, match=r"^stage.distill.optimizer.lrr: unknown key"):
        compose_typed("distill", "+stage.distill.optimizer.lrr=1")  # added past the schema: refused all the same


# ----------------------------------------------------------------------- the data: budget, cursor, parsing


def _drain(data, cursor, seq_len):
    rows = 0
    with pytest.raises(DataError, match="exhausted"):
        while True:
            *_, cursor = data.next_rows(cursor, 1, seq_len)
            rows += 1
    return rows


def test_rows_left_of_a_text_mix_is_exactly_what_reading_can_take(tmp_path):
    rng = np.random.default_rng(1)
    files = [write_token_file([list(rng.integers(3, 128, size=int(rng.integers(5, 60)))) for _ in range(n)],
                              tmp_path / name, 128, 2, {}) for name, n in (("a", 50), ("b", 17))]
    mix = DataMix([MixSource("a", files[0], 3.0), MixSource("b", files[1], 1.0)], heldout_fraction=0.1)
    for seq_len in (16, 48):
        *_, midway = mix.next_rows(Cursor(), 5, seq_len)
        for cursor in (Cursor(), midway):
            assert mix.rows_left(cursor, seq_len) == _drain(mix, cursor, seq_len)


def test_rows_left_of_a_chat_mix_is_exactly_what_packing_can_take(tmp_path):
    rng = np.random.default_rng(2)

    def chats(n):
        for _ in range(n):
            length = int(rng.choice([6, 11, 19, 40]))  # 40 never fits a row of 24 and is skipped
            yield EncodedChat(list(rng.integers(3, 128, size=length)), [0, 0] + [1] * (length - 2))

    sources = [ChatSource(name, write_chat_tokens(chats(n), tmp_path / name, 128, 2, {"key": name}), w)
               for name, n, w in (("a", 40, 2.0), ("b", 15, 1.0))]
    chat = ChatMix(sources, heldout_fraction=0.2, pad_id=2)
    *_, midway = chat.next_rows(Cursor(), 4, 24)
    for cursor in (Cursor(), midway):
        available = _drain(chat, cursor, 24)
        assert chat.rows_left(cursor, 24, 10_000) == available
        assert chat.rows_left(cursor, 24, 3) == 3, "counting stops at the limit"


def test_a_stage_whose_data_runs_out_is_refused_before_anything_is_loaded_or_written(tmp_path, mix):
    started = []
    held = int(len(mix.sources[0].file) * 0.9) // 32  # whole rows in the training split (the last 10% is held out)
    train = TrainSettings(seq_len=32, micro_batch_size=2, global_batch_size=4, train_tokens=200 * 128)
    with pytest.raises(DataError, match=rf"holds {held} more training rows of 32 tokens .* the stage needs 800 .*"
                                        "lower the train_tokens of stage distill_short"):
        prepare_stage("distill_short", train, OptimizerSettings(), {}, mix, Cursor(), tmp_path / "run", False,
                      lambda: started.append(1))
    assert not started and not (tmp_path / "run").exists()
    check_data_budget(mix, Cursor(), held, 32, "train_tokens")  # exactly what the mix holds is enough
    with pytest.raises(DataError):
        check_data_budget(mix, Cursor(), held + 1, 32, "train_tokens")


def test_the_cascade_checks_what_all_its_stages_read_before_the_first(mix):
    plan = plan_from_config(compose_typed("cascade", "posttrain=false", "stage.distill_short.train.seq_len=32",
                                     "stage.distill_short.train.train_tokens=2048",
                                     "stage.distill_long.train.seq_len=64",
                                     "stage.distill_long.context.original_context=32",
                                     "stage.distill_long.train.train_tokens=2048"))
    inputs = CascadeInputs(None, mix, None, None, None, None, None, Path("unused"), torch.float32, "", 0, 0)
    held = mix.train_tokens_left(Cursor())
    assert 4096 <= held < 3 * 4096
    with pytest.raises(DataError, match=f"read 12288 training tokens but the data mix's training split holds {held}"):
        check_data_budget_of_cascade(inputs, plan)  # three children x (2048 + 2048): more than the mix holds
    check_data_budget_of_cascade(inputs, dataclasses.replace(plan, until=("child_14b_like", "distill_long")))


def test_a_cursor_from_another_data_mix_is_refused(tmp_path, mix):
    identity = mix.identity()
    here = write_manifest(tmp_path / "here", {"cursor_end": {"offsets": {"a": 256}, "rows": {"a": 8}},
                                              "fingerprint": {"data": identity}})
    assert cursor_from_manifest(str(here), identity).offsets == {"a": 256}
    other = json.loads(json.dumps(identity))
    other["sources"]["b"] = other["sources"].pop("a")
    elsewhere = write_manifest(tmp_path / "elsewhere", {"cursor_end": {"offsets": {"b": 256}, "rows": {"b": 8}},
                                                        "fingerprint": {"data": other}})
    with pytest.raises(DataError, match=r"cursor=.*elsewhere.* another data mix \(sources.a.key: '<absent>' -> 'k1'"):
        cursor_from_manifest(str(elsewhere), identity)
    unrecorded = write_manifest(tmp_path / "old", {"cursor_end": {"offsets": {"a": 256}, "rows": {"a": 8}}})
    with pytest.raises(DataError, match="records no data mix"):
        cursor_from_manifest(str(unrecorded), identity, "chat_cursor")


def test_damaged_json_files_are_named(tmp_path, mix):
    prefix = mix.sources[0].file.prefix
    meta = prefix.with_name(prefix.name + ".json")
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(DataError, match=rf"^{meta}: not valid JSON"):
        TokenFile(prefix)
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"cursor_end": {"offsets"')
    with pytest.raises(DataError, match=rf"^{manifest}: not valid JSON"):
        cursor_from_manifest(str(manifest), {})
    readers = ((tmp_path / "hf", "config.json", hf_io.read_config),
               (tmp_path / "megatron", megatron_checkpoint.CONFIG_NAME, megatron_checkpoint.read_config))
    for directory, name, read in readers:
        directory.mkdir()
        (directory / name).write_text('{"hidden_size": 5')
        with pytest.raises(DataError, match=rf"^{directory / name}: not valid JSON"):
            read(directory)


def test_a_truncated_token_file_is_named_with_the_fix(mix):
    prefix = mix.sources[0].file.prefix
    data = prefix.with_name(prefix.name + ".bin")
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"token file {prefix} is truncated: 50 tokens, .*delete {prefix}\.\*"):
        TokenFile(prefix)


def test_a_truncated_gguf_is_named(tmp_path):
    truncated = tmp_path / "model.gguf"
    with open(embedded_gguf("smollm2"), "rb") as source:
        truncated.write_bytes(source.read(200_000))
    with pytest.raises(DataError, match=rf"^{truncated}: not a readable GGUF file .*200000 bytes"):
        read_gguf(truncated)


def test_bytes_that_are_not_utf8_are_counted(tmp_path, caplog):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\u00e9 \ufffd ok\n".encode() + b"na\xefve \xff\xfe end\n")
    [(_, document)] = list(iter_documents([str(text)]))
    assert document.count("\ufffd") == 4  # one that was in the file, three replaced
    assert f"{text}: 3 byte sequence(s) that are not UTF-8 replaced" in caplog.text


# ----------------------------------------------------------------------------- configs are facts (loop)


def test_resuming_with_changed_settings_is_refused_naming_the_keys(tmp_path, mix):
    _, first = _training(tmp_path, mix, steps=2, save_interval=1)
    first()
    _, changed = _training(tmp_path, mix, steps=4, optimizer=OptimizerSettings(lr=5e-3, min_lr=1e-3))
    with pytest.raises(ConfigError, match=r"step_00000002 \(step 2\) was written with other settings than this run's "
                                          r"\(optimizer.lr: 0.01 -> 0.005; train.train_tokens: 256 -> 512\)"):
        changed()
    assert MetricsLog.read(tmp_path / "metrics.jsonl")[-1]["step"] == 2, "a refused resume writes nothing"


def test_resume_with_changes_applies_them_from_that_step_and_records_the_history(tmp_path, mix):
    new = OptimizerSettings(lr=5e-3, min_lr=1e-3)
    _, first = _training(tmp_path / "resumed", mix, steps=2, save_interval=1)
    first()
    _, resumed = _training(tmp_path / "resumed", mix, steps=4, optimizer=new, facts=RunFacts({}, True))
    result = resumed()
    _, reference = _training(tmp_path / "reference", mix, steps=4, optimizer=new)
    reference()
    lr = {name: [r["lr"] for r in MetricsLog.read(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"]
          for name in ("resumed", "reference")}
    assert lr["resumed"][2:] == lr["reference"][2:], "steps 3-4 follow the new schedule (lr, decay over 4 steps)"
    assert lr["resumed"][:2] != lr["reference"][:2]
    assert result["history"] == [{"step": 2, "changes": {"optimizer.lr": [0.01, 0.005],
                                                         "train.train_tokens": [256, 512]}}]
    assert result["fingerprint"]["optimizer"]["lr"] == 0.005


def test_the_nan_stop_names_what_is_left_never_none(tmp_path, mix):
    student, run = _training(tmp_path, mix, steps=4, max_nonfinite_steps=2)
    with torch.no_grad():
        student.decoder.layers[0].mlp.linear_fc1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError) as stop:
        run()
    assert "no checkpoint was written yet (the stage's input model is unchanged)" in str(stop.value)
    assert "None" not in str(stop.value)


def test_a_non_finite_perplexity_is_an_error_naming_the_weights():
    model = build_model(tiny_config(), ParallelConfig())
    windows = torch.randint(0, 128, (2, 17))
    assert np.isfinite(evaluate_perplexity(model, windows, progress=False).perplexity)
    with torch.no_grad():
        model.embedding.word_embeddings.weight[3, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"non-finite weights \(embedding.word_embeddings.weight\)"):
        evaluate_perplexity(model, torch.full((2, 17), 3), progress=False)


# --------------------------------------------------------------------------- the output folder and the disk


def test_the_output_lock_refuses_a_second_holder_and_leaves_no_trace_of_a_refused_run(tmp_path):
    out = tmp_path / "run"
    with output_lock(out):
        assert (out / LOCK).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(ResourceError, match=rf"^{out} is in use by pid {os.getpid()} on "):
            with output_lock(out):
                pass
    assert not out.exists(), "a folder the lock created for a run that wrote nothing is removed"
    with output_lock(out):
        (out / "manifest.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "manifest.json"]
    with output_lock(out):  # released when the holder ended
        pass


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (we run as root in CI); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_too_small_for_a_checkpoint_is_refused_before_the_save(small_disk, mix):
    _, run = _training(small_disk / "run", mix, steps=1)
    with pytest.raises(ResourceError, match=rf"^no space left on {small_disk / 'run' / 'checkpoints'} for a checkpoint "
                                            r"\(about 1 MiB needed, 0 MiB free\)"):
        run()


def test_a_disk_that_fills_up_during_the_save_is_reported_as_full(small_disk, mix, monkeypatch):
    monkeypatch.setattr(loop, "checkpoint_bytes", lambda *args: 0)  # pass the check: the real write hits ENOSPC
    _, run = _training(small_disk / "run", mix, steps=1)
    with pytest.raises(ResourceError, match=rf"^no space left on {small_disk / 'run' / 'checkpoints'}"):
        run()


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598"),
])
def test_a_save_that_fails_for_lack_of_space_says_so(tmp_path, mix, monkeypatch, failure):
    def full(*args, **kwargs):
        monkeypatch.setattr(disk_space, "free_bytes", lambda path: 0)  # what the failed write left free
        raise failure

    monkeypatch.setattr(loop, "save_checkpoint", full)
    _, run = _training(tmp_path, mix, steps=1)
    with pytest.raises(ResourceError, match=f"^no space left on {tmp_path / 'checkpoints'}"):
        run()


def test_a_save_that_fails_for_another_reason_keeps_its_own_error(tmp_path, mix, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(loop, "save_checkpoint", broken)
    _, run = _training(tmp_path, mix, steps=1)
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        run()
