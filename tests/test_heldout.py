"""Held-out evaluation per source equals a naive per-source recomputation, pooled figures stay the pooled ones, and
the teacher's held-out pass is computed once: cached in memory and on disk, recomputed for another teacher or rows."""

import json
import math

import numpy as np
import pytest
import torch

from nemo_plugins.data.batches import local_batch
from nemo_plugins.data.mix import DataMix, MixSource
from nemo_plugins.data.token_store import write_token_file
from nemo_plugins.distill.heldout import TeacherHeldout, evaluate_heldout, heldout_set
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.model.builder import build_model
from tests.conftest import tiny_config

SEQ = 16


def planted_mix(directory) -> DataMix:
    """Two sources of different difficulty: "easy" cycles through 4 tokens, "hard" draws from the whole vocabulary;
    held-out tails of 3 and 2 rows of SEQ (1,230 and 820 tokens, 5% held out), so one micro-batch of 2 rows holds a
    row of each."""
    rng = np.random.default_rng(0)
    easy = [[3 + (i % 4) for i in range(40)] for _ in range(30)]
    hard = [list(rng.integers(3, 128, size=40)) for _ in range(20)]
    return DataMix([MixSource(name, write_token_file(docs, directory / name, 128, 2, {}), 1.0)
                    for name, docs in (("easy", easy), ("hard", hard))], heldout_fraction=0.05)


@pytest.fixture
def models():
    torch.manual_seed(0)
    teacher = build_model(tiny_config(), ParallelConfig())
    # the teacher prefers the easy source's tokens: the two sources differ in teacher perplexity and in KL
    with torch.no_grad():
        teacher.output_weight()[3:7] *= 6.0
    student = build_model(tiny_config(hidden_size=32, ffn_hidden_size=64), ParallelConfig())
    return Teacher(teacher), student.eval()


def naive(student, teacher, tokens, positions) -> dict[str, float]:
    """Full logits of both models, torch's log_softmax / cross_entropy, mean over every next token of the rows."""
    batch = local_batch(tokens, positions)
    with torch.no_grad():
        s_logp = torch.log_softmax(student(batch["tokens"], batch["positions"]).float(), -1)
        t_logp = torch.log_softmax(teacher.model(batch["tokens"], batch["positions"]).float(), -1)
    mask = batch["mask"].bool()
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)[mask]
    labels = batch["labels"][mask]
    return {"kl": kl.mean().item(), "tokens": int(mask.sum()),
            "student_ppl": math.exp(-s_logp[mask].gather(-1, labels[:, None]).mean().item()),
            "teacher_ppl": math.exp(-t_logp[mask].gather(-1, labels[:, None]).mean().item())}


def test_each_source_equals_a_naive_recomputation_on_its_rows_and_pooled_stays_pooled(tmp_path, models):
    teacher, student = models
    mix = planted_mix(tmp_path)
    heldout = heldout_set(mix, SEQ, 4)
    assert heldout.sources == ("easy", "hard") and heldout.row_source.tolist() == [0, 0, 0, 1, 1]
    result = evaluate_heldout(student, TeacherHeldout(teacher, "tiny"), heldout, micro_batch_size=2, chunk_tokens=7)
    for k, name in enumerate(heldout.sources):
        rows = heldout.row_source == k
        want = naive(student, teacher, heldout.tokens[rows], heldout.positions[rows])
        assert result[f"{name}/tokens"] == want["tokens"] == rows.sum().item() * (SEQ - 1)
        for key in ("kl", "student_ppl", "teacher_ppl"):
            assert result[f"{name}/{key}"] == pytest.approx(want[key], rel=1e-5), (name, key)
    pooled = naive(student, teacher, heldout.tokens, heldout.positions)
    for key in ("kl", "student_ppl", "teacher_ppl", "tokens"):
        assert result[key] == pytest.approx(pooled[key], rel=1e-5), key
    assert result["easy/teacher_ppl"] < 0.9 * result["hard/teacher_ppl"], "the planted sources differ"
    assert abs(result["easy/kl"] - result["hard/kl"]) > 0.1 * result["kl"]


def test_teacher_pass_is_cached_on_disk_for_the_next_child_and_recomputed_for_a_changed_teacher(tmp_path, models):
    teacher, student = models
    heldout = heldout_set(planted_mix(tmp_path), SEQ, 4)
    cache = tmp_path / "teacher_heldout"
    first = TeacherHeldout(teacher, "tiny", cache)
    before = evaluate_heldout(student, first, heldout, 2)
    evaluate_heldout(student, first, heldout, 2)
    assert first.computed == 1, "the stage's second evaluation reuses the first's teacher pass"
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 1
    written = files[0].stat().st_mtime_ns

    another_child = build_model(tiny_config(hidden_size=32, ffn_hidden_size=64), ParallelConfig()).eval()
    second = TeacherHeldout(Teacher(teacher.model), "tiny", cache)  # the next child's stage: a new teacher object
    again = evaluate_heldout(student, second, heldout, 2)
    evaluate_heldout(another_child, second, heldout, 2)
    assert second.computed == 0 and files[0].stat().st_mtime_ns == written
    assert again == before, "figures from the cached teacher pass are the computed ones"

    fewer_rows = heldout_set(planted_mix(tmp_path / "other"), SEQ, 2)
    evaluate_heldout(student, second, fewer_rows, 2)
    assert second.computed == 1, "other held-out rows miss the cache"

    with torch.no_grad():
        teacher.model.output_weight()[10] += 1.0  # a changed teacher behind the same source name
    changed = TeacherHeldout(Teacher(teacher.model), "tiny", cache)
    after = evaluate_heldout(student, changed, heldout, 2)
    assert changed.computed == 1 and after["teacher_ppl"] != before["teacher_ppl"]
    assert len(list(cache.glob("*.pt"))) == 3


def test_report_has_a_row_per_child_and_source_and_the_parent_per_source(tmp_path):
    from nemo_plugins.cascade.report import _per_source_section

    def evals(stage_dir, records):
        stage_dir.mkdir(parents=True)
        (stage_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "kind": "eval", **r}) + "\n"
                                                         for i, r in enumerate(records)))

    def record(code_ppl, prose_ppl, kl):
        return {"kl": kl, "student_ppl": 1.0, "teacher_ppl": 1.0, "tokens": 20,
                **{f"{s}/{k}": v for s, ppl, t in (("code", code_ppl, 4.0), ("prose", prose_ppl, 9.0))
                   for k, v in (("student_ppl", ppl), ("teacher_ppl", t), ("kl", kl), ("tokens", 10))}}

    evals(tmp_path / "a" / "distill_short", [record(300.0, 500.0, 3.0), record(30.0, 60.0, 1.5)])
    evals(tmp_path / "a" / "distill_long", [record(29.0, 59.0, 1.4), record(25.0, 55.0, 1.2)])
    evals(tmp_path / "b" / "distill_short", [{"kl": 1.0, "student_ppl": 2.0, "teacher_ppl": 1.0, "tokens": 20}] * 2)
    lines = _per_source_section({"a": {"distill_short": {}, "distill_long": {}}, "b": {"distill_short": {}}}, tmp_path)
    assert "| a | code | 10 | 300.00 | 30.00 | 3.000 -> 1.500 | 25.00 |" in lines
    assert "| a | prose | 10 | 500.00 | 60.00 | 3.000 -> 1.500 | 55.00 |" in lines
    assert "| parent (teacher) | prose | | 9.00 | 9.00 | | 9.00 |" in lines
    assert not any(line.startswith("| b |") for line in lines), "a run evaluated without sources has no rows"
    assert _per_source_section({"b": {"distill_short": {}}}, tmp_path) == []


def test_interleaved_sources_are_evaluated_with_their_images_on_text_targets(tmp_path):
    """A mix with an image source: its held-out rows carry their images (teacher and student each with its own
    projector) and count text targets only, equal to a naive recomputation with full logits; the text source's
    figures are the text-only evaluation's, and only the image source's move when the student's projector does."""
    from nemo_plugins.convert.sources import ModelSource
    from nemo_plugins.data.mix import SourceSpec, build_mix
    from nemo_plugins.data.tokenizer import load_tokenizer
    from nemo_plugins.vision.checkpoint import load_vision_language_model
    from tests.test_interleaved_data import PX, inputs, jsonl, picture
    from tests.test_mistral3_source import TEXT, mistral3_model, save

    source = ModelSource.parse(f"hf:{save(mistral3_model(TEXT['mistral']), tmp_path / 'm3')}")
    _, _, teacher = load_vision_language_model(source, ParallelConfig())
    _, _, student = load_vision_language_model(source, ParallelConfig(), fresh_projector=True)
    with torch.no_grad():
        student.output_weight().mul_(1.5)  # the student's text model differs too: the text source has a KL
    tokenizer = load_tokenizer(tmp_path / "m3")
    names = [picture(tmp_path / f"{i}.png", PX, 2 * PX, i) for i in range(80)]
    pics = jsonl(tmp_path / "pics.jsonl", [{"parts": [{"text": f"w{40 + i % 7}"}, {"image": n}, {"text": "w42 w43"}]}
                                           for i, n in enumerate(names)])
    text = jsonl(tmp_path / "text.jsonl", [{"text": " ".join(f"w{20 + (i * j) % 50}" for j in range(30))}
                                           for i in range(40)])
    mix = build_mix(tokenizer, [SourceSpec("pics", [str(pics)], 1.0, "interleaved"), SourceSpec("text", [str(text)])],
                    str(tmp_path / "cache"), 0.2, images=inputs())
    heldout = heldout_set(mix, SEQ, 3)
    assert heldout.sources == ("pics", "text") and heldout.row_source.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(heldout.images[r] for r in range(3)) and not any(heldout.images[3:])
    result = evaluate_heldout(student, TeacherHeldout(Teacher(teacher), "m3"), heldout, micro_batch_size=2)
    for k, name in enumerate(heldout.sources):
        rows = torch.nonzero(heldout.row_source == k).flatten().tolist()
        batch = local_batch(heldout.tokens[rows], heldout.positions[rows], heldout.target_mask[rows])
        images = heldout.row_images(rows)
        with torch.no_grad():
            s_logp = torch.log_softmax(student(batch["tokens"], batch["positions"], images=images).float(), -1)
            t_logp = torch.log_softmax(teacher(batch["tokens"], batch["positions"], images=images).float(), -1)
        mask = batch["mask"].bool()
        labels = batch["labels"][mask]
        assert result[f"{name}/tokens"] == int(mask.sum())
        assert result[f"{name}/kl"] == pytest.approx((t_logp.exp() * (t_logp - s_logp)).sum(-1)[mask].mean().item(),
                                                     rel=1e-5)
        assert result[f"{name}/student_ppl"] == pytest.approx(
            math.exp(-s_logp[mask].gather(-1, labels[:, None]).mean().item()), rel=1e-5)
    assert result["pics/tokens"] < 3 * (SEQ - 1), "image-token targets are out of the evaluation"
    assert result["text/kl"] > 0 and result["pics/kl"] > 0
    text_only = heldout_set(DataMix([mix.sources[1]], 0.2), SEQ, 3)
    alone = evaluate_heldout(student, TeacherHeldout(Teacher(teacher), "m3"), text_only, micro_batch_size=2)
    assert {k: v for k, v in result.items() if k.startswith("text/")} == {k: v for k, v in alone.items() if "/" in k}
    with torch.no_grad():
        student.multi_modal_projector.linear_2.weight.mul_(3.0)
    moved = evaluate_heldout(student, TeacherHeldout(Teacher(teacher), "m3"), heldout, micro_batch_size=2)
    assert moved["pics/kl"] != pytest.approx(result["pics/kl"], rel=1e-3) and moved["text/kl"] == result["text/kl"]
