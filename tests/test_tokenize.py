"""Offline tokenisation at scale: pieces cover every document once, the store is the same bytes for any number of
workers / parts / array tasks, rank 0 alone builds inside a job, a cluster preset refuses to start without it."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.mix import SourceSpec, build_mix
from nemo_plugins.data.text_files import iter_documents, piece_documents, split_pieces
from nemo_plugins.data.token_store import (
    SUFFIXES,
    BuildOptions,
    TokenFile,
    build_token_file,
    store_prefix,
    tokenize_to_file,
    write_token_file,
)
from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.errors import ConfigError, DataError
from recipes._entry import compose_typed

SMOLLM2 = "embedded:smollm2"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_dir(ModelSource.parse(SMOLLM2)))


def make_corpus(root: Path) -> Path:
    """jsonl files with blank lines, non-ASCII text and a raw U+2028 inside a string; plain text files; an empty
    file; a file of another suffix (ignored)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "béta", "γάμμα", "日本語", "tab\tbed", "quote\"d", "line\u2028sep", "   "]
    for name, lines in (("a.jsonl", 120), ("sub/b.jsonl", 45)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            for i in range(lines):
                if i % 17 == 3:
                    out.write("\n")
                text = " ".join(rng.choice(words, size=int(rng.integers(0, 60))))
                out.write(json.dumps({"text": text, "id": i}, ensure_ascii=bool(i % 2)) + "\n")
    (root / "c.txt").write_text("plain text, one document\n\nwith two paragraphs\n")
    (root / "sub/d.py").write_text("def f(x):\n    return x + 1\n")
    (root / "e.txt").write_text("")
    (root / "f.csv").write_text("not,read\n")
    return root


def naive_documents(root: Path) -> list[str]:
    """The corpus's documents read the obvious way: files in sorted order, a jsonl line per document."""
    docs = []
    for file in sorted(p for p in root.rglob("*") if p.suffix in (".jsonl", ".txt", ".py")):
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".jsonl":
            docs += [json.loads(line)["text"] for line in text.split("\n") if line.strip()]
        else:
            docs.append(text)
    return [d for d in docs if d.strip()]


def store_bytes(prefix: Path) -> dict[str, bytes]:
    return {s: Path(f"{prefix}{s}").read_bytes() for s in SUFFIXES}


def test_pieces_hold_every_document_once_in_order(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    expected = naive_documents(corpus)
    assert [text for _, text in iter_documents([str(corpus)])] == expected
    for parts in (1, 2, 3, 7, 40, 400):
        split = split_pieces([str(corpus)], parts)
        assert len(split) == parts
        assert [text for pieces in split for piece in pieces for _, text in piece_documents(piece)] == expected, parts
    sizes = [sum(p.end - p.start for p in pieces) for pieces in split_pieces([str(corpus)], 4)]
    assert max(sizes) - min(sizes) < 0.2 * sum(sizes)  # jsonl files are cut, so the parts are near equal


def test_a_bad_line_in_a_later_piece_names_its_line(tmp_path):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(50)]
    lines[37] = '{"body": "no text"}'
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    pieces = [p for part in split_pieces([str(tmp_path)], 5) for p in part]
    with pytest.raises(DataError, match=r"x.jsonl:38: "):
        for piece in pieces[1:]:
            list(piece_documents(piece))


def test_parts_and_shards_merge_to_the_bytes_of_one_build(tmp_path, tokenizer):
    corpus = str(make_corpus(tmp_path / "corpus"))
    documents = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in naive_documents(Path(corpus)))
    reference = write_token_file(documents, tmp_path / "ref" / "c", len(tokenizer), tokenizer.eos_token_id,
                                 {"paths": [corpus], "key": store_prefix(tokenizer, [corpus], tmp_path, "c")[1]})
    one = build_token_file(tokenizer, [corpus], tmp_path / "one", "c").prefix
    assert store_bytes(one) == store_bytes(reference.prefix)
    # two array tasks over 5 parts, then the merge step: the same bytes
    cache = tmp_path / "array"
    first = build_token_file(tokenizer, [corpus], cache, "c", BuildOptions(parts=5, shard="0/2"))
    prefix = first.prefix
    assert first.parts_built == 3 and 0 < first.tokens_built < TokenFile(reference.prefix).metadata["tokens"]
    written = [f"{prefix.name}.part-0000{i}-of-00005.json" for i in (0, 2, 4)]
    assert sorted(p.name for p in cache.glob("*.json")) == written
    build_token_file(tokenizer, [corpus], cache, "c", BuildOptions(parts=5, shard="1/2"))
    merged = build_token_file(tokenizer, [corpus], cache, "c", BuildOptions(parts=5))
    assert merged.prefix == prefix and merged.parts_built == 0  # every part was done: only the merge
    assert store_bytes(prefix) == store_bytes(reference.prefix)
    assert sorted(p.name for p in cache.iterdir()) == sorted(prefix.name + s for s in SUFFIXES)  # parts removed


def test_build_options_are_checked():
    with pytest.raises(ConfigError, match="workers=0"):
        BuildOptions(workers=0)
    with pytest.raises(ConfigError, match=r"shard='2/2' must be 'i/n'"):
        BuildOptions(shard="2/2")
    assert [BuildOptions(shard="1/3").mine(p) for p in range(7)] == [False, True, False, False, True, False, False]


@pytest.mark.slow
def test_one_and_two_worker_processes_give_the_same_bytes(tmp_path, tokenizer):
    paths = [str(make_corpus(tmp_path / "corpus")), "stdlib:json"]
    one = build_token_file(tokenizer, paths, tmp_path / "w1", "c", BuildOptions(workers=1)).prefix
    two = build_token_file(tokenizer, paths, tmp_path / "w2", "c", BuildOptions(workers=2, parts=3)).prefix
    assert one.name == two.name
    assert store_bytes(one) == store_bytes(two)
    assert TokenFile(two).metadata["documents"] == len(naive_documents(tmp_path / "corpus")) + \
        sum(1 for _ in iter_documents(["stdlib:json"]))
    assert not [p for p in (tmp_path / "w2").iterdir() if ".part-" in p.name or p.name.endswith(".partial")]


def test_a_missing_prebuilt_store_names_the_command(tmp_path, tokenizer):
    corpus = str(make_corpus(tmp_path / "corpus"))
    with pytest.raises(DataError, match=r"no prebuilt token file of source 'c' .* run: python -m recipes.tokenize x=1"):
        tokenize_to_file(tokenizer, [corpus], tmp_path / "cache", "c", prebuilt_by="python -m recipes.tokenize x=1")
    assert not (tmp_path / "cache").exists()
    built = build_token_file(tokenizer, [corpus], tmp_path / "cache", "c").prefix
    assert tokenize_to_file(tokenizer, [corpus], tmp_path / "cache", "c", prebuilt_by="unused").prefix == built


def _cascade_config(*overrides):
    return compose_typed("cascade", *overrides)


def test_ministral3_prunes_on_the_user_corpus_and_requires_prebuilt_stores():
    from omegaconf import OmegaConf

    cfg = _cascade_config("cascade=ministral3")
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert "stdlib:" not in json.dumps(resolved), "the preset reads only the user's data"
    assert resolved["stage"]["distill_long"]["long_eval"]["paths"] == resolved["stage"]["prune"]["eval"]["paths"]
    calibration = set(resolved["stage"]["prune"]["calibration"]["paths"])
    held_out = set(resolved["stage"]["prune"]["eval"]["paths"])
    training = {p for s in resolved["data"]["sources"] for p in s["paths"]}
    assert calibration and held_out and calibration <= training
    assert not any(Path(h) == Path(t) or Path(t) in Path(h).parents or Path(h) in Path(t).parents
                   for h in held_out for t in calibration | training)
    assert cfg.data.require_prebuilt and cfg.chat_data.require_prebuilt
    demo = _cascade_config()
    assert not demo.data.require_prebuilt and not demo.chat_data.require_prebuilt


def _rank_body(tok_dir: str, corpus: str, cache: str, out: str) -> None:
    """One rank of a 2-process job opening a mix whose cache is empty: first with a prebuilt store required (every
    rank must refuse), then built on first use; every file publication is recorded."""
    import torch.distributed as dist

    from nemo_plugins.data import token_store
    from nemo_plugins.distributed import ParallelConfig, initialize

    initialize(ParallelConfig())
    rank = dist.get_rank()
    published = []
    publish = token_store._publish
    token_store._publish = lambda partial, prefix, write: (published.append(prefix.name),
                                                           publish(partial, prefix, write))
    tokenizer = load_tokenizer(tok_dir)
    try:
        build_mix(tokenizer, [SourceSpec("c", [corpus])], cache, 0.1, prebuilt_by="python -m recipes.tokenize x=1")
        refused = None
    except DataError as err:
        refused = str(err)
    mix = build_mix(tokenizer, [SourceSpec("c", [corpus])], cache, 0.1)
    Path(f"{out}.{rank}.json").write_text(json.dumps({"published": published, "refused": refused,
                                                      "tokens": mix.sources[0].file.tokens.tolist()}))


@pytest.mark.distributed
def test_two_ranks_with_an_empty_cache_write_it_once(tmp_path):
    from tests import distributed_worker
    from tests.test_distributed import _port

    corpus = str(make_corpus(tmp_path / "corpus"))
    tok_dir = str(tokenizer_dir(ModelSource.parse(SMOLLM2)))
    out = str(tmp_path / "rank")
    mp.spawn(distributed_worker.run, args=(2, _port(), _rank_body, (tok_dir, corpus, str(tmp_path / "cache"), out)),
             nprocs=2, join=True)
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["published"]) for r in ranks] == [2, 0]  # rank 0: its one part, then the store; rank 1: nothing
    assert all("run: python -m recipes.tokenize x=1" in r["refused"] for r in ranks)
    assert ranks[0]["tokens"] == ranks[1]["tokens"] and len(ranks[0]["tokens"]) > 1000
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def _recipe(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "CASCADE_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", module, *overrides, f"hydra.run.dir={cwd / 'hydra'}"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_stage_without_its_prebuilt_store_prints_the_command_that_builds_it(tmp_path, tokenizer):
    from tests.conftest import save_tiny_teacher_and_student

    models = save_tiny_teacher_and_student(tmp_path / "models")
    corpus = make_corpus(tmp_path / "corpus")
    data = [f"data.sources=[{{name: c, paths: ['{corpus}'], weight: 1.0}}]", f"data.cache_dir={tmp_path / 'tokens'}"]
    refused = _recipe("recipes.distill", f"model.source=megatron:{models / 'teacher'}", "model.architecture=null",
                      f"student=megatron:{models / 'student'}", "data.require_prebuilt=true", *data, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    command = re.search(r"run: `(python -m recipes\.tokenize [^`]*)`", refused.stderr.strip().splitlines()[-1])
    assert command, refused.stderr[-2000:]
    args = shlex.split(command.group(1).replace("workers=<cpus>", "workers=1"))[3:]
    assert "student" not in command.group(1) and "data.require_prebuilt=true" in args
    built = _recipe("recipes.tokenize", *args, "parts=2", cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    # what the stage will open now exists: the same tokenizer, sources and cache directory, hence the same key
    job_tokenizer = load_tokenizer(tokenizer_dir(ModelSource.parse(f"megatron:{models / 'teacher'}")))
    opened = tokenize_to_file(job_tokenizer, [str(corpus)], tmp_path / "tokens", "c", prebuilt_by="must not build")
    assert opened.metadata["documents"] == len(naive_documents(corpus))


def test_prebuilt_chat_data_is_screened_as_the_stage_that_reads_it_screens_it(tmp_path):
    """``recipes.sft stage@stage.sft_kd=reasoning_sft chat_data.require_prebuilt=true`` opens the files rendered
    with the stage's filters and system prompt: the command it prints keeps the overrides that decide the screen,
    and that command renders exactly those files (and the cascade's reasoning mixes with reasoning=true)."""
    from nemo_plugins.data.from_config import data_overrides, load_chat_data
    from recipes.tokenize import run as tokenize

    small = ["data@chat_data=reasoning_demo", f"chat_data.cache_dir={tmp_path / 'chat'}",
             "chat_data.sources=[{name: reasoning_math, paths: ['builtin:reasoning_math?count=40'], weight: 1.0}]"]
    screen = ["stage@stage.sft_kd=reasoning_sft", "stage.sft_kd.filters.max_repetition=0.4"]
    asked = [*small, *screen, "stage.sft_kd.optimizer.lr=1", "student=x", "+stage.reasoning_sft.name=r"]
    assert data_overrides(asked) == [*small, *screen]
    corpus = make_corpus(tmp_path / "corpus")
    text = [f"data.sources=[{{name: c, paths: ['{corpus / 'a.jsonl'}'], weight: 1.0}}]",
            f"data.cache_dir={tmp_path / 'tok'}"]
    built = tokenize(compose_typed("tokenize", "model.source=embedded:smollm2", *small, *screen, *text, "chat=true",
                              "posttrain=false"))
    sft = compose_typed("sft", *small, *screen, "chat_data.require_prebuilt=true")
    stage = sft.stage.sft_kd
    _, chat = load_chat_data(sft, tokenizer_dir(ModelSource.parse("embedded:smollm2")), stage.data_screen())
    assert str(chat.sources[0].data.file.prefix) == built["chat_data:reasoning_math"]["prefix"]
    assert chat.sources[0].data.file.metadata["screen"] == stage.data_screen().fingerprint()

    reasoning = [f"reasoning_data.cache_dir={tmp_path / 'r'}", f"problem_data.cache_dir={tmp_path / 'r'}",
                 *(f"{g}.sources=[{{name: reasoning_math, paths: ['builtin:reasoning_math?count=40'], weight: 1.0}}]"
                   for g in ("reasoning_data", "problem_data"))]
    cfg = compose_typed("tokenize", "model.source=embedded:smollm2", *text, *reasoning, "chat=false", "reasoning=true")
    built = tokenize(cfg)
    stage = cfg.stage.reasoning_sft
    screens = {group: json.loads(Path(built[f"{group}:reasoning_math"]["prefix"] + ".json").read_text()).get("screen")
               for group in ("reasoning_data", "problem_data")}
    assert screens == {"reasoning_data": stage.data_screen().fingerprint(),
                       "problem_data": stage.prompt_screen().fingerprint()}


def _tokenize_interleaved(tmp_path, *overrides: str) -> dict:
    from recipes.tokenize import run as tokenize

    captions = ("data.sources=[{name: captions, kind: interleaved, paths: ['builtin:captions?count=4&size=56'], "
                "weight: 1.0}]")
    return tokenize(compose_typed("tokenize", captions, f"data.cache_dir={tmp_path / 'tok'}", "posttrain=false",
                                  *overrides))


def test_interleaved_sources_need_a_vision_parent_and_a_valid_max_image_side(tmp_path):
    """A text-only parent cannot tokenise image records (no text rows are built out of them), and the data config's
    largest image side is checked by name; nothing is written either way."""
    with pytest.raises(ConfigError, match=r"'captions' is interleaved \(images\) but the model has no vision part"):
        _tokenize_interleaved(tmp_path, "model.source=embedded:smollm2")
    for bad in ("0", "-5", "big"):
        refusal = rf"data.max_image_side={bad} must be a positive|data.max_image_side: Value '{bad}'"
        with pytest.raises(ConfigError, match=refusal):
            _tokenize_interleaved(tmp_path, "model.source=embedded:smollm2", f"data.max_image_side={bad}")
    assert not (tmp_path / "tok").exists()
