"""The pairwise reward model: label-token scoring equals a naive full-logits softmax (TP=1 and TP=2), the
training loss equals the naive soft cross-entropy, averaging both orders cancels a position bias, a tiny PWRM
learns a planted property (held-out accuracy above chance, calibrated, loadable as the judge), a PWRM with
another tokenizer than the policy's is refused, and pairs too long are dropped / scored 1/2 and counted."""

import json
import random
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from nemo_plugins.convert import megatron_checkpoint
from nemo_plugins.convert.model_io import load_hf_state
from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.mix import Cursor
from nemo_plugins.data.pairwise import Pair
from nemo_plugins.distill.step import use_per_token_loss
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.model.builder import build_model
from nemo_plugins.rl.pwrm import (
    BothOrders,
    PairStream,
    PairTemplate,
    PairwiseJudge,
    PWRMStage,
    PWRMStep,
    check_judge_tokenizer,
    first_wins_logits,
    load_judge,
    pad_rows,
    run_pwrm_stage,
    score_both_orders,
)
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.optimizer import wrap_for_training
from tests import distributed_worker
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state
from tests.recipe_runs import interrupt_after_step, recipe_env, train_records

LABELS = (5, 100)  # on different TP ranks at TP=2 (vocabulary 128: rank 0 holds 0-63)


def _rows(lengths, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _naive_first_wins(model, rows):
    """Each row alone, unpadded, through the full-vocabulary logits: softmax over the vocabulary, then the odds
    of the first label against the second at the last position."""
    z, p = [], []
    with torch.no_grad():
        for ids in rows:
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1].float()
            probs = torch.softmax(logits, -1)
            z.append(logits[LABELS[0]] - logits[LABELS[1]])
            p.append(probs[LABELS[0]] / (probs[LABELS[0]] + probs[LABELS[1]]))
    return torch.stack(z), torch.stack(p)


def test_label_token_scoring_equals_a_naive_full_logits_softmax():
    model = build_model(tiny_config(), ParallelConfig()).eval()
    rows = _rows([7, 19, 3, 12, 19])
    z = first_wins_logits(model, rows, LABELS, pad_id=0, micro_batch_size=2)
    naive_z, naive_p = _naive_first_wins(model, rows)
    assert torch.allclose(z, naive_z, atol=1e-5)
    assert torch.allclose(torch.sigmoid(z), naive_p, atol=1e-6)
    swapped = first_wins_logits(model, rows, LABELS[::-1], pad_id=0, micro_batch_size=5)
    assert torch.allclose(swapped, -z, atol=1e-5) and z.abs().min() > 0


def test_the_training_loss_is_the_mean_soft_cross_entropy_over_rows_of_the_global_batch():
    torch.manual_seed(0)
    model = build_model(tiny_config(), ParallelConfig())
    reference = build_model(tiny_config(), ParallelConfig())
    reference.load_state_dict(model.state_dict())
    rows = _rows([9, 14, 6, 11])
    batch = pad_rows(rows, 16, pad_id=0)
    targets = torch.tensor([1.0, 0.0, 0.7, 0.25])
    train = TrainSettings(seq_len=16, micro_batch_size=2, global_batch_size=4, train_tokens=64)
    use_per_token_loss(model)
    ddp, _ = wrap_for_training(model)
    loss = PWRMStep(train, LABELS)(ddp, (batch["tokens"], batch["positions"], batch["last"], targets))
    naive_z, _ = _naive_first_wins(reference.eval(), rows)
    p = torch.sigmoid(naive_z)
    expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_both_orders_averaged_removes_a_planted_position_bias():
    """A judge adding b to the first position's logit: one order's probability moves with b, the judge's (both
    orders averaged in logit space) is the unbiased judge's, and a tie stays exactly 1/2."""
    strength = torch.linspace(-3, 3, 13)
    unbiased = BothOrders(strength, -strength)
    for bias in (1.5, -2.0):
        biased = BothOrders(strength + bias, -strength + bias)
        assert biased.position_bias() == pytest.approx(float(torch.sigmoid(strength + bias).mean() / 2 +
                                                             torch.sigmoid(-strength + bias).mean() / 2 - 0.5))
        assert abs(biased.position_bias()) > 0.2 and unbiased.position_bias() == pytest.approx(0.0, abs=1e-7)
        assert not torch.allclose(torch.sigmoid(biased.z_ab), torch.sigmoid(unbiased.z_ab), atol=0.1)
        assert torch.allclose(biased.prob_a(), unbiased.prob_a(), atol=1e-7)  # averaged logits: b cancels exactly
        assert torch.allclose(biased.prob_a(0.5), torch.sigmoid(strength / 0.5), atol=1e-7)
        assert biased.prob_a()[6] == pytest.approx(0.5, abs=1e-7)  # strength 0: a tie whatever the bias


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return tokenizer_dir(ModelSource.parse("embedded:smollm2"))


@pytest.fixture(scope="module")
def chat_format(smollm2_tokenizer):
    return load_chat_format("hf_template", smollm2_tokenizer)


def test_the_judge_is_order_invariant_though_the_model_is_not(chat_format):
    """An untrained model has a position bias; the judge's p(A) for (A, B) and for (B, A) still sum to 1."""
    torch.manual_seed(3)
    model = build_model(tiny_config(vocab_size=49152), ParallelConfig())
    judge = PairwiseJudge(model, chat_format, tau=0.7, max_tokens=512)
    conversations = [[{"role": "user", "content": f"What is {k} + {k}?"}] for k in range(3)]
    a, b = ["It is 4.", "Answer: 2", "six"], ["Four.", "Answer: 3", "The answer is 6, since 3 + 3 = 6."]
    forward, backward = judge.prob_first_wins(conversations, a, b), judge.prob_first_wins(conversations, b, a)
    assert torch.allclose(forward + backward, torch.ones(3, dtype=torch.float64), atol=1e-6)
    scores = score_both_orders(model, judge.template, list(zip(conversations, a, b)), 4)
    assert abs(scores.position_bias()) > 1e-4, "the planted model must have some position bias to cancel"
    assert torch.allclose(forward, scores.prob_a(0.7).double(), atol=1e-7)


def test_pairs_too_long_are_dropped_in_training_and_scored_one_half_by_the_judge(chat_format):
    template = PairTemplate(chat_format)
    short = Pair("t", [{"role": "user", "content": "Hi?"}], "Hello.", "Go away.", "r",
                 {"chosen": "reference", "rejected": "perturbed"})
    long = Pair("t", [{"role": "user", "content": "Hi?"}], "Hello. " * 200, "No.", "r",
                {"chosen": "reference", "rejected": "perturbed"})
    stream = PairStream([short, long, short], template, seq_len=256, seed=0)
    assert stream.dropped == 1 and len(stream.rows) == 4
    tokens, positions, last, targets, cursor = stream.next_rows(Cursor(), 4, 256)
    assert targets.tolist() == [1.0, 0.0, 1.0, 0.0] and tokens.shape == (4, 256) and cursor.offsets == {"pairs": 4}
    assert tokens[0, last[0]].item() == template.ids(short.messages, short.chosen, short.rejected)[-1]
    assert stream.rows_left(cursor, 256, 10) == 0
    with pytest.raises(DataError, match="exhausted"):
        stream.next_rows(cursor, 2, 256)
    model = build_model(tiny_config(vocab_size=49152), ParallelConfig())
    judge = PairwiseJudge(model, chat_format, 1.0, max_tokens=256)
    p = judge.prob_first_wins([short.messages, long.messages], [short.chosen, long.chosen],
                              [short.rejected, long.rejected])
    assert p[1] == 0.5 and p[0] != 0.5 and judge.too_long == 1


def _another_tokenizer(ours, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ours, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two ids swapped: another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(spec))
    return other


def test_a_pwrm_whose_tokenizer_differs_from_the_policys_is_refused(smollm2_tokenizer, tmp_path):
    check_judge_tokenizer(smollm2_tokenizer, smollm2_tokenizer)
    with pytest.raises(ConfigError, match="PWRM's tokenizer .* differs from the policy's"):
        check_judge_tokenizer(_another_tokenizer(smollm2_tokenizer, tmp_path), smollm2_tokenizer)


def test_load_judge_refuses_a_policy_with_another_tokenizer_before_loading_weights(smollm2_tokenizer, tmp_path):
    """A finished PWRM stage's manifest whose checkpoint holds only its tokenizer (no weights): the refusal comes
    from the tokenizer check, first thing, as a ConfigError (one line from the recipe), not mid-run."""
    checkpoint = tmp_path / "pwrm_checkpoint"
    shutil.copytree(_another_tokenizer(smollm2_tokenizer, tmp_path), checkpoint / "tokenizer")
    (tmp_path / "manifest.json").write_text(json.dumps({"checkpoint": str(checkpoint), "calibration": {"tau": 1.0}}))
    policy = tmp_path / "policy"
    shutil.copytree(smollm2_tokenizer, policy / "tokenizer")
    with pytest.raises(ConfigError, match="PWRM's tokenizer .* differs from the policy's"):
        load_judge(str(tmp_path / "manifest.json"), policy=f"megatron:{policy}")


GOOD, BAD = ("yes", "correct", "right", "true"), ("no", "wrong", "false", "incorrect")


def planted_pairs(count: int, split: str, seed: int) -> list[Pair]:
    """Answers from a 'good' word list beat answers from a 'bad' one, whatever the question."""
    rng = random.Random(seed)
    words = "apple river stone cloud green table seven music paper light".split()
    return [Pair("planted", [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(3)) + "?"}],
                 rng.choice(GOOD), rng.choice(BAD), "planted: the good word list",
                 {"chosen": "reference", "rejected": "perturbed"}, 1.0, split)
            for _ in range(count)]


@pytest.mark.slow
def test_a_tiny_pwrm_learns_a_planted_property_and_serves_as_the_calibrated_judge(smollm2_tokenizer, chat_format,
                                                                                   tmp_path):
    config = tiny_config(vocab_size=49152)
    torch.manual_seed(0)
    megatron_checkpoint.save_model(build_model(config, ParallelConfig()), config, tmp_path / "init",
                                   tokenizer_dir=smollm2_tokenizer)
    steps, rows = 24, 16
    stage = PWRMStage("pwrm", TrainSettings(seq_len=128, micro_batch_size=8, global_batch_size=rows,
                                            train_tokens=steps * rows * 128),
                      OptimizerSettings(lr=1e-2, min_lr=0.0, warmup_fraction=0.0, weight_decay=0.0,
                                        decay_style="constant"),
                      score_micro_batch_size=24)
    pairs = planted_pairs(steps * rows // 2, "train", 0) + planted_pairs(24, "heldout", 1)
    out = tmp_path / "pwrm"
    manifest = run_pwrm_stage(stage, ModelSource("megatron", str(tmp_path / "init")), pairs, chat_format, "hf_template",
                              smollm2_tokenizer, out, ParallelConfig())
    assert manifest["heldout"]["after"]["accuracy"] >= 0.75, manifest["heldout"]
    assert manifest["heldout"]["after"]["nll"] < manifest["heldout"]["before"]["nll"]
    calibration = manifest["calibration"]
    assert calibration["fit_pairs"] == calibration["test_pairs"] == 12
    assert calibration["nll_after"] <= calibration["nll_before"]
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"

    judge = load_judge(str(out / "manifest.json"), policy=f"megatron:{tmp_path / 'init'}")
    heldout = [p for p in pairs if p.split == "heldout"]
    p = judge.prob_first_wins([x.messages for x in heldout], [x.chosen for x in heldout], [x.rejected for x in heldout])
    assert judge.tau == calibration["tau"]
    assert float((p > 0.5).double().mean()) == pytest.approx(manifest["heldout"]["after"]["accuracy"])
    initialize(ParallelConfig())


# ----------------------------------------------------------------------------------------------- TP = 2
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_scores(config, state_path: str, out_path: str) -> None:
    """Worker: label-token scores and one PWRM step's loss at TP=2."""
    parallel = ParallelConfig(tp=2)
    initialize(parallel)
    model = build_model(config, parallel)
    load_hf_state(model, torch.load(state_path), config)
    rows, targets = torch.load(out_path + ".inputs")
    z = first_wins_logits(model, rows, LABELS, pad_id=0, micro_batch_size=2)
    use_per_token_loss(model)
    ddp, _ = wrap_for_training(model)
    batch = pad_rows(rows, 24, 0)
    train = TrainSettings(seq_len=24, micro_batch_size=2, global_batch_size=len(rows), train_tokens=24 * len(rows))
    loss = PWRMStep(train, LABELS)(ddp, (batch["tokens"], batch["positions"], batch["last"], targets))
    grads = {name: p.main_grad.clone() for name, p in model.named_parameters() if "final_layernorm" in name}
    if torch.distributed.get_rank() == 0:
        torch.save({"z": z, "loss": loss, "grads": grads}, out_path)


@pytest.mark.distributed
def test_tensor_parallel_2_scores_and_trains_as_1(tmp_path):
    config = tiny_config()
    state = hf_state(hf_model(config))
    torch.save(state, tmp_path / "state.pt")
    rows, targets = _rows([9, 17, 4, 24]), torch.tensor([1.0, 0.0, 0.8, 0.3])
    torch.save((rows, targets), str(tmp_path / "tp2.pt") + ".inputs")
    single = build_model(config, ParallelConfig())
    load_hf_state(single, state, config)
    z = first_wins_logits(single, rows, LABELS, pad_id=0, micro_batch_size=2)
    use_per_token_loss(single)
    ddp, _ = wrap_for_training(single)
    batch = pad_rows(rows, 24, 0)
    train = TrainSettings(seq_len=24, micro_batch_size=2, global_batch_size=4, train_tokens=96)
    loss = PWRMStep(train, LABELS)(ddp, (batch["tokens"], batch["positions"], batch["last"], targets))
    grads = {name: p.main_grad for name, p in single.named_parameters() if "final_layernorm" in name}
    mp.spawn(distributed_worker.run, nprocs=2, join=True,
             args=(2, _port(), tp_scores, (config, str(tmp_path / "state.pt"), str(tmp_path / "tp2.pt"))))
    result = torch.load(tmp_path / "tp2.pt")
    assert torch.allclose(result["z"], z, atol=1e-5)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert grads and all(torch.allclose(result["grads"][name], grad, atol=1e-6) for name, grad in grads.items())


# ----------------------------------------------------------------------------------------------- the recipe
@pytest.mark.slow
def test_the_recipe_trains_calibrates_reports_and_skips_a_finished_stage(tmp_path):
    from tests.conftest import save_tiny_teacher_and_student

    save_tiny_teacher_and_student(tmp_path)
    out = tmp_path / "pwrm"
    command = [sys.executable, "-m", "recipes.pwrm", "model=tiny", f"source=megatron:{tmp_path / 'teacher'}",
               f"pairs.cache_dir={tmp_path / 'pairs'}", "pairs.counts={arithmetic: 8, code: 0, loops: 8, format: 8}",
               f"pairs.sample_from=megatron:{tmp_path / 'student'}", "pairs.sampling.max_new_tokens=8",
               "stage.pwrm.train.seq_len=256", "stage.pwrm.train.global_batch_size=8",
               "stage.pwrm.train.micro_batch_size=4", "stage.pwrm.train.train_tokens=6144", f"output_dir={out}"]
    subprocess.run(command, check=True, env=recipe_env(), capture_output=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 3 and manifest["pair_data"]["sample_from"].startswith("megatron:")
    assert sum(k["rejected_sampled"] for k in manifest["pairs"].values()) > 0, "the student's samples are used"
    assert set(manifest["heldout"]["after"]["accuracy_by_kind"]) == {"arithmetic", "loops", "format"}
    assert manifest["calibration"]["tau"] > 0 and (out / "reliability.png").is_file()
    again = subprocess.run(command, check=True, env=recipe_env(), capture_output=True, text=True)
    rerun = json.loads((out / "manifest.json").read_text())
    assert rerun["wall_seconds"] == manifest["wall_seconds"], again.stderr[-500:]


def _recipe_command(root, out_dir, steps):
    return [sys.executable, "-m", "recipes.pwrm", "model=tiny", f"source=megatron:{root / 'teacher'}",
            f"pairs.cache_dir={root / 'pairs'}", "pairs.counts={arithmetic: 12, code: 0, loops: 12, format: 12}",
            "stage.pwrm.train.seq_len=512", "stage.pwrm.train.global_batch_size=4",
            "stage.pwrm.train.micro_batch_size=2",
            f"stage.pwrm.train.train_tokens={512 * 4 * steps}", "stage.pwrm.train.save_interval=1",
            "stage.pwrm.optimizer.lr=1e-3", f"output_dir={out_dir}"]


@pytest.mark.slow
def test_a_sigkilled_pwrm_run_resumes_bit_identically(tmp_path):
    """Killed after a random step and run again: the same losses, held-out scores, tau and calibration figures as
    the uninterrupted run (the pair order is seeded, the cursor counts rows read)."""
    from tests.conftest import save_tiny_teacher_and_student

    save_tiny_teacher_and_student(tmp_path)
    steps = 5
    reference = tmp_path / "uninterrupted"
    subprocess.run(_recipe_command(tmp_path, reference, steps), check=True, env=recipe_env(), capture_output=True)
    kill_after = random.randrange(1, steps - 1)
    interrupted = tmp_path / "interrupted"
    code, _ = interrupt_after_step(_recipe_command(tmp_path, interrupted, steps), interrupted, kill_after + 1,
                                   signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the job finished before the kill after step {kill_after + 1}"
    subprocess.run(_recipe_command(tmp_path, interrupted, steps), check=True, env=recipe_env(), capture_output=True)
    assert len(train_records(reference)) == steps
    assert train_records(interrupted) == train_records(reference), f"killed after step {kill_after + 1}"
    resumed, whole = (json.loads((d / "manifest.json").read_text()) for d in (interrupted, reference))
    assert resumed["cursor_end"] == whole["cursor_end"]
    assert resumed["heldout"]["after"] == whole["heldout"]["after"] and resumed["calibration"] == whole["calibration"]
