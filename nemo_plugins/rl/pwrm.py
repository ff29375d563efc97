"""The pairwise reward model (PWRM): an LM fine-tuned to say which of two answers to a conversation is better,
read out as the logits of two label tokens, and the judge online DPO asks for p(A wins).

Input: the conversation and both answers written into one user message with a fixed template (``TEMPLATE``),
rendered by the model's chat format up to the assistant's generation prompt. Output: the logits of the tokens
the assistant would write for "A" and "B" at that last position (``PairTemplate.label_ids``, read from the chat
format's own rendering of the answer "A" / "B"). Only those two columns of the output layer are computed: under
tensor parallelism each rank holds a slice of the vocabulary, computes the label columns it owns (a zero where it
owns none) and the slices are summed over the TP group (megatron's ``reduce_from_tensor_model_parallel_region``;
the hidden state goes in through ``copy_to_tensor_model_parallel_region`` so its gradient is summed back).
``z = logit(first) - logit(second)`` and p(first wins) = sigmoid(z) = the softmax over the two columns.

Training: cross-entropy of that softmax against the pair's target (hard or soft: the probability that the
chosen answer is better), BOTH orders of every pair (A first with target t, B first with 1 - t, in one global
batch when it is even), on the one training loop with megatron's per-token loss path counting rows (a row is one
ordering). Scoring averages the two orders in logit space, p(A) = sigmoid((z_AB - z_BA) / (2 tau)), which
cancels an additive position bias exactly (``calibration`` says why not METHOD.md's average of the two
probabilities); the bias itself is reported (mean p(first) over both orders - 1/2). ``tau`` is fitted after
training on half the held-out pairs, on that averaged margin, and measured on the other half.

Layouts: TP, PP (the last stage's logits are shared over the pipeline group), sequence parallelism and DP; not
context parallelism (the last position would live on one CP rank).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region

from nemo_plugins.convert.sources import ModelSource, source_config, tokenizer_dir
from nemo_plugins.data.chat import ChatFormat, load_chat_format
from nemo_plugins.data.mix import Cursor
from nemo_plugins.data.pairwise import Pair, pair_stats
from nemo_plugins.data.tokenizer import same_tokenizer
from nemo_plugins.distill.stage import prepare_stage
from nemo_plugins.distill.step import mean_loss_schedule, require_per_token_loss, use_per_token_loss
from nemo_plugins.distributed import ParallelConfig, device
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.manifest import read_json, write_manifest
from nemo_plugins.parallel_ops import full_sequence, tp_group
from nemo_plugins.rl.calibration import CalibrationSettings, calibrate, probabilities, reliability_plot, top_label
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.loop import TrainingRun
from nemo_plugins.train.metrics import MetricsLog
from nemo_plugins.vision.checkpoint import load_source_model

logger = logging.getLogger(__name__)

TEMPLATE_VERSION = 1  # part of the data identity: bump when TEMPLATE or the conversation text changes
TEMPLATE = ("Below is a conversation and two candidate answers to its last message. Which answer is better: "
            "correct, complete, following the instructions, and ending properly?\n\n"
            "<conversation>\n{conversation}\n</conversation>\n\n<answer A>\n{first}\n</answer A>\n\n"
            "<answer B>\n{second}\n</answer B>\n\nReply with one letter: A or B.")
LABELS = ("A", "B")
PAIRS_SOURCE = "pairs"  # the cursor's one source: orderings read


def conversation_text(messages: Sequence[dict]) -> str:
    """The conversation as plain text inside the template: one ``[role]`` block per message."""
    return "\n\n".join(f"[{m['role']}]\n{m.get('content') or ''}" for m in messages)


class PairTemplate:
    """Renders (conversation, first, second) to the PWRM's input ids; knows the two label token ids."""

    def __init__(self, chat_format: ChatFormat) -> None:
        self.chat_format = chat_format
        probe = [{"role": "user", "content": TEMPLATE.format(conversation="?", first="?", second="?")}]
        prompt = chat_format.prompt_ids(probe)
        ids = []
        for label in LABELS:
            encoded = chat_format.encode(probe + [{"role": "assistant", "content": label}])
            start = encoded.assistant_mask.index(1)
            if encoded.tokens[:start] != prompt:
                raise ConfigError(f"{chat_format.name}: the answer {label!r} does not start right after the generation "
                                  "prompt; the PWRM reads its label at the prompt's last position")
            ids.append(encoded.tokens[start])
        if ids[0] == ids[1]:
            raise ConfigError(f"{chat_format.name}: the answers {LABELS} start with the same token {ids[0]}")
        self.label_ids: tuple[int, int] = (ids[0], ids[1])

    def ids(self, messages: Sequence[dict], first: str, second: str) -> list[int]:
        text = TEMPLATE.format(conversation=conversation_text(messages), first=first, second=second)
        return self.chat_format.prompt_ids([{"role": "user", "content": text}])


def check_layout() -> None:
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ConfigError("the PWRM reads one position per row, which context parallelism splits over ranks: "
                          "run the PWRM with parallel.cp=1")


def label_logits(hidden: torch.Tensor, weight: torch.Tensor, label_ids: tuple[int, int]) -> torch.Tensor:
    """[b, 2] logits of the two label tokens from final-norm hidden rows [b, h] and this rank's output-layer
    slice ``weight`` [vocab / tp, h]: the columns this rank owns, summed over the TP group."""
    vocab_local = weight.shape[0]
    start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
    local = torch.tensor([i - start for i in label_ids], device=weight.device)
    owned = ((local >= 0) & (local < vocab_local)).to(hidden.dtype)
    grouped = tp_group() is not None
    rows = copy_to_tensor_model_parallel_region(hidden) if grouped else hidden
    logits = (rows @ weight[local.clamp(0, vocab_local - 1)].T) * owned  # every rank's output depends on ``rows``
    logits = logits.float()
    return reduce_from_tensor_model_parallel_region(logits) if grouped else logits


def last_hidden(output: torch.Tensor, last: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[b, h] final-norm hidden state at each row's last prompt position from the model's [s, b, h] output."""
    hidden = full_sequence(output, sequence_parallel)
    return hidden[last, torch.arange(hidden.shape[1], device=hidden.device)]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[b] cross-entropy of the softmax over (first, second) label logits against P(first is better)."""
    logp = torch.log_softmax(logits, -1)
    return -(targets * logp[:, 0] + (1 - targets) * logp[:, 1])


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of one document each (positions 0..length-1: padding only follows, causal attention
    never lets it reach a prompt position) and each row's last prompt position."""
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        tokens[r, : len(ids)] = torch.tensor(ids)
    return {"tokens": tokens, "positions": torch.arange(length).expand(len(rows), -1).contiguous(),
            "last": torch.tensor([len(ids) - 1 for ids in rows])}


# ----------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def first_wins_logits(model: torch.nn.Module, rows: Sequence[Sequence[int]], label_ids: tuple[int, int], pad_id: int,
                      micro_batch_size: int) -> torch.Tensor:
    """[n] z = logit(first label) - logit(second label) of each rendered row, on every rank of its pipeline
    (forward-only through megatron's schedule; the last stage's values summed over the pipeline group)."""
    check_layout()
    if not rows:
        return torch.zeros(0)
    multiple = parallel_state.get_tensor_model_parallel_world_size()  # sequence parallelism splits s over TP
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a micro-batch: less padding
    groups = [[rows[i] for i in order[k : k + micro_batch_size]] for k in range(0, len(rows), micro_batch_size)]
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    if pipelined:  # and of one row count: the last micro-batch is filled with copies of its last row
        groups[-1] += [groups[-1][-1]] * (micro_batch_size - len(groups[-1]))
    longest = max(len(r) for r in rows)
    # stages exchange activations of one shape: under PP every micro-batch is padded to the longest row
    lengths = [-(-(longest if pipelined else max(len(r) for r in group)) // multiple) * multiple for group in groups]
    batches = [{k: v.to(device()) for k, v in pad_rows(group, length, pad_id).items()}
               for group, length in zip(groups, lengths)]
    sequence_parallel = model.config.sequence_parallel
    was_training = model.training
    model.eval()

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = chunk(batch["tokens"], batch["positions"], return_hidden=True)

        def keep(output):
            z = label_logits(last_hidden(output, batch["last"], sequence_parallel), model.output_weight(), label_ids)
            return torch.zeros((), device=z.device), {"z": z[:, 0] - z[:, 1]}

        return output, keep

    try:
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
            seq_length=max(lengths), micro_batch_size=micro_batch_size, forward_only=True)
    finally:
        model.train(was_training)
    z = torch.zeros(len(rows), device=device())
    if parallel_state.is_pipeline_last_stage():
        scored = torch.cat([out["z"] for out in outputs])[: len(rows)]
        z[torch.tensor(order, device=device())] = scored.to(device(), torch.float32)
    if pipelined:
        dist.all_reduce(z, group=parallel_state.get_pipeline_model_parallel_group())
    return z.cpu()


@dataclass(frozen=True)
class BothOrders:
    """z of each pair read as (A, B) and as (B, A); ``ab_logits`` re-expresses both as "A wins" logits."""

    z_ab: torch.Tensor
    z_ba: torch.Tensor

    @property
    def ab_logits(self) -> torch.Tensor:
        return torch.stack([self.z_ab, -self.z_ba], -1)

    def prob_a(self, tau: float = 1.0) -> torch.Tensor:
        """p(A wins): the two orders' "A wins" logits averaged, then scaled by 1 / tau."""
        return probabilities(self.ab_logits, tau)

    def position_bias(self) -> float:
        """Mean p(the first shown wins) over both orders, minus 1/2: > 0 favours the first position."""
        return float((torch.sigmoid(self.z_ab) + torch.sigmoid(self.z_ba)).mean() / 2 - 0.5)


def score_both_orders(model: torch.nn.Module, template: PairTemplate, items: Sequence[tuple[Sequence[dict], str, str]],
                      micro_batch_size: int) -> BothOrders:
    """z_AB and z_BA of (conversation, A, B) items, one forward pass over all 2n rows."""
    rows = [template.ids(m, a, b) for m, a, b in items] + [template.ids(m, b, a) for m, a, b in items]
    z = first_wins_logits(model, rows, template.label_ids, template.chat_format.pad_id, micro_batch_size)
    return BothOrders(z[: len(items)], z[len(items) :])


class PairwiseJudge:
    """The calibrated PWRM as online DPO's judge: ``prob_first_wins`` averages both orders at temperature tau.

    A pair whose rendering is longer than ``max_tokens`` (the context the PWRM was trained at) gets p = 1/2 and
    is counted in ``too_long``: the judge cannot read it, so it prefers neither."""

    def __init__(self, model: torch.nn.Module, chat_format: ChatFormat, tau: float, max_tokens: int,
                 micro_batch_size: int = 4) -> None:
        if not tau > 0:
            raise ConfigError(f"the PWRM temperature must be > 0, got {tau}")
        self.model, self.template, self.tau = model, PairTemplate(chat_format), tau
        self.max_tokens, self.micro_batch_size = max_tokens, micro_batch_size
        self.too_long = 0

    def prob_first_wins(self, conversations: list[list[dict]], responses_a: list[str],
                        responses_b: list[str]) -> torch.Tensor:
        items = list(zip(conversations, responses_a, responses_b, strict=True))
        fits = [i for i, (m, a, b) in enumerate(items)
                if max(len(self.template.ids(m, a, b)), len(self.template.ids(m, b, a))) <= self.max_tokens]
        if len(fits) < len(items):
            self.too_long += len(items) - len(fits)
            logger.warning("PWRM: %d of %d pairs longer than its %d tokens scored 1/2 (%d so far)",
                           len(items) - len(fits), len(items), self.max_tokens, self.too_long)
        p = torch.full((len(items),), 0.5, dtype=torch.float64)
        if fits:
            scores = score_both_orders(self.model, self.template, [items[i] for i in fits], self.micro_batch_size)
            p[fits] = scores.prob_a(self.tau).double()
        return p


def check_judge_tokenizer(pwrm_dir: Path, policy_dir: Path) -> None:
    """The judge reads the policy's decoded answers in the policy's chat format: one tokenizer for both."""
    if not same_tokenizer(pwrm_dir, policy_dir):
        raise ConfigError(f"the PWRM's tokenizer ({pwrm_dir}) differs from the policy's ({policy_dir}): "
                          "train the PWRM from a model of the policy's family (recipes.pwrm source=...) "
                          "or judge with the matching PWRM")


def load_judge(manifest: str, policy: str | None = None, micro_batch_size: int = 4) -> PairwiseJudge:
    """The judge of a finished PWRM stage (its ``manifest.json``: checkpoint, chat format, context, tau), loaded in
    the running layout (``initialize`` has run); ``policy`` (a model source) must share its tokenizer. For Hydra::

        judge: {_target_: nemo_plugins.rl.pwrm.load_judge, manifest: runs/pwrm/pwrm/manifest.json, policy: ${policy}}
    """
    record = read_json(manifest)
    if record is None or "calibration" not in record:
        raise ConfigError(f"judge.manifest={manifest}: not a finished PWRM stage's manifest.json (run recipes.pwrm)")
    source = ModelSource("megatron", record["checkpoint"])
    if policy is not None:
        check_judge_tokenizer(tokenizer_dir(source), tokenizer_dir(ModelSource.parse(policy)))
    layout = ParallelConfig(tp=parallel_state.get_tensor_model_parallel_world_size(),
                            pp=parallel_state.get_pipeline_model_parallel_world_size())
    dtype = torch.bfloat16 if record["config"]["train"]["precision"] == "bfloat16" else torch.float32
    _, model = load_source_model(source, layout, dtype)
    chat_format = load_chat_format(record["chat_format"], tokenizer_dir(source))
    return PairwiseJudge(model, chat_format, record["calibration"]["tau"], record["config"]["train"]["seq_len"],
                         micro_batch_size)


# ----------------------------------------------------------------------------------------------- training
class PairStream:
    """The training pairs as rows for the loop, read in ONE pass: each pair twice (A first with target t, B first
    with 1 - t) in consecutive rows; pairs in a seeded order. The cursor's offset counts rows read. Pairs whose
    longer ordering exceeds ``seq_len`` are dropped and counted (never cut: the answer's end matters)."""

    def __init__(self, pairs: Sequence[Pair], template: PairTemplate, seq_len: int, seed: int) -> None:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
        self.rows: list[tuple[list[int], float]] = []
        self.dropped = 0
        for k in order:
            pair = pairs[k]
            first = template.ids(pair.messages, pair.chosen, pair.rejected)
            second = template.ids(pair.messages, pair.rejected, pair.chosen)
            if max(len(first), len(second)) > seq_len:
                self.dropped += 1
                continue
            self.rows += [(first, pair.target), (second, 1.0 - pair.target)]
        if not self.rows:
            raise DataError(f"no training pair fits in train.seq_len={seq_len} tokens: raise it")
        self.pad_id = template.chat_format.pad_id
        digest = hashlib.sha256(json.dumps([[r, t] for r, t in self.rows]).encode()).hexdigest()[:16]
        self._identity = {"kind": "pairs", "template": TEMPLATE_VERSION, "rows": len(self.rows), "key": digest}

    def next_rows(self, cursor: Cursor, rows: int, seq_len: int) -> tuple[torch.Tensor, ...]:
        start = cursor.offsets.get(PAIRS_SOURCE, 0)
        if start + rows > len(self.rows):
            raise DataError(f"the pair data is exhausted after {start} rows (single pass): add pairs or lower the "
                            "stage's train_tokens")
        chunk = self.rows[start : start + rows]
        batch = pad_rows([ids for ids, _ in chunk], seq_len, self.pad_id)
        nxt = Cursor({PAIRS_SOURCE: start + rows}, {PAIRS_SOURCE: cursor.rows.get(PAIRS_SOURCE, 0) + rows})
        return batch["tokens"], batch["positions"], batch["last"], torch.tensor([t for _, t in chunk]), nxt

    def rows_left(self, cursor: Cursor, seq_len: int, limit: int) -> int:
        return min(limit, len(self.rows) - cursor.offsets.get(PAIRS_SOURCE, 0))

    def identity(self) -> dict:
        return dict(self._identity)


@dataclass
class PWRMStep:
    """``step(ddp, batch) -> mean cross-entropy per row of the global batch`` for the training loop."""

    train: TrainSettings
    label_ids: tuple[int, int]

    def __call__(self, ddp: torch.nn.Module, batch: tuple) -> float:
        model = ddp.module
        require_per_token_loss(model, "row")
        check_layout()
        micro = self._micro_batches(batch)
        sequence_parallel = model.config.sequence_parallel

        def forward_step(data_iterator, chunk):
            rows = next(data_iterator)
            output = chunk(rows["tokens"], rows["positions"], return_hidden=True)

            def loss_func(output):
                hidden = last_hidden(output, rows["last"], sequence_parallel)
                z = label_logits(hidden, model.output_weight(), self.label_ids)
                loss_sum = soft_cross_entropy(z, rows["targets"]).sum()
                count = torch.tensor(z.shape[0], dtype=torch.int, device=z.device)
                return loss_sum, count, {"loss_sum": loss_sum.detach().clone(), "rows": count}

            return output, loss_func

        return mean_loss_schedule(ddp, micro, self.train, forward_step, "rows")

    def _micro_batches(self, batch: tuple) -> list[dict[str, torch.Tensor]]:
        """This data-parallel rank's rows as micro-batches on this rank's device."""
        tokens, positions, last, targets = batch
        per_rank = self.train.micro_batch_size * self.train.microbatches(parallel_state.get_data_parallel_world_size())
        dp_rank = parallel_state.get_data_parallel_rank()
        mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        size = self.train.micro_batch_size
        return [{"tokens": t.to(device()), "positions": p.to(device()), "last": la.to(device()),
                 "targets": g.to(device())}
                for t, p, la, g in zip(*(x[mine].split(size) for x in (tokens, positions, last, targets)))]


@dataclass
class PWRMStage:
    name: str
    train: TrainSettings  # global_batch_size: rows (orderings) per step; keep it even so both orders share a step
    optimizer: OptimizerSettings
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    score_micro_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.score_micro_batch_size < 1:
            raise ConfigError(f"score_micro_batch_size must be >= 1, got {self.score_micro_batch_size}")


def heldout_report(scores: BothOrders, pairs: Sequence[Pair], tau: float = 1.0) -> dict:
    """Held-out accuracy (both orders averaged), NLL of the preferred answer, position bias, accuracy per kind."""
    p_chosen = scores.prob_a(tau).double()
    targets = torch.tensor([p.target for p in pairs], dtype=torch.float64)
    _, correct = top_label(p_chosen, (targets >= 0.5).double())  # an exact tie counts 1/2
    nll = -(targets * p_chosen.clamp_min(1e-12).log() + (1 - targets) * (1 - p_chosen).clamp_min(1e-12).log())
    return {"pairs": len(pairs), "accuracy": float(correct.mean()), "nll": float(nll.mean()),
            "position_bias": scores.position_bias(),
            "accuracy_by_kind": {k: float(correct[[i for i, p in enumerate(pairs) if p.kind == k]].mean())
                                 for k in sorted({p.kind for p in pairs})}}


class HeldoutEvaluation:
    """The loop's ``evaluate``: scores the held-out pairs in both orders and keeps the latest scores, which the
    calibration then reuses (the end-of-training evaluation is the trained model's)."""

    def __init__(self, model: torch.nn.Module, template: PairTemplate, pairs: Sequence[Pair],
                 micro_batch_size: int) -> None:
        self.model, self.template, self.pairs, self.micro_batch_size = model, template, pairs, micro_batch_size
        self.latest: BothOrders | None = None

    def score(self) -> BothOrders:
        both = [(p.messages, p.chosen, p.rejected) for p in self.pairs]
        self.latest = score_both_orders(self.model, self.template, both, self.micro_batch_size)
        return self.latest

    def __call__(self) -> dict:
        return {k: v for k, v in heldout_report(self.score(), self.pairs).items() if isinstance(v, float)}


def calibration_sets(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair]]:
    """Held-out pairs split in two alternately: tau is fitted on one half, measured on the other."""
    return list(pairs[0::2]), list(pairs[1::2])


def run_pwrm_stage(stage: PWRMStage, source: ModelSource, pairs: Sequence[Pair], chat_format: ChatFormat,
                   chat_format_spec: str, tokenizer_path: Path, out_dir: Path, parallel: ParallelConfig,
                   manifest_extra: dict | None = None, resume_with_changes: bool = False,
                   before_work: Callable[[], None] | None = None) -> dict:
    """Train a PWRM from ``source`` on the training pairs, evaluate and calibrate it on the held-out ones; returns
    the stage's manifest (``checkpoint``, ``calibration.tau``, held-out accuracy before/after, position bias)."""
    started = time.monotonic()
    dtype = torch.bfloat16 if stage.train.precision == "bfloat16" else torch.float32
    config = source_config(source)
    if chat_format.vocab_size > config.vocab_size:
        raise ConfigError(f"the chat format {chat_format.name} emits ids up to {chat_format.vocab_size} "
                          f"but the model's vocabulary has {config.vocab_size}: "
                          "set pairs.format to the model's own (hf_template)")
    template = PairTemplate(chat_format)
    train_pairs, heldout = [p for p in pairs if p.split == "train"], [p for p in pairs if p.split == "heldout"]
    fit_set, test_set = calibration_sets(heldout)
    if not fit_set or not test_set:
        raise DataError(f"{len(heldout)} held-out pairs: calibration needs at least 2 (raise pairs.heldout_fraction)")
    stream = PairStream(train_pairs, template, stage.train.seq_len, stage.train.seed)
    facts = {"stage": {"name": stage.name, "calibration": dataclasses.asdict(stage.calibration)}, "source": str(source),
             "chat_format": chat_format.name, "data": stream.identity()}
    run_facts, done = prepare_stage(stage.name, stage.train, stage.optimizer, facts, stream, Cursor(), out_dir,
                                    resume_with_changes, before_work)
    if done is not None:
        return done
    _, model = load_source_model(source, parallel, dtype, speed=stage.train.speed)
    evaluate = HeldoutEvaluation(model, template, fit_set + test_set, stage.score_micro_batch_size)
    use_per_token_loss(model)
    run = TrainingRun(model, config, stage.train, stage.optimizer, Path(out_dir), tokenizer_path, stage.name, run_facts)
    result = run.run(PWRMStep(stage.train, template.label_ids), stream, evaluate, Cursor())
    scores = evaluate.latest if evaluate.latest is not None else evaluate.score()  # None: resumed at the last step
    fit = BothOrders(scores.z_ab[: len(fit_set)], scores.z_ba[: len(fit_set)])
    test = BothOrders(scores.z_ab[len(fit_set) :], scores.z_ba[len(fit_set) :])
    outcomes = torch.tensor([float(p.target >= 0.5) for p in test_set], dtype=torch.float64)
    fit_targets = torch.tensor([p.target for p in fit_set], dtype=torch.float64)
    report = calibrate(fit.ab_logits, fit_targets, test.ab_logits, outcomes, stage.calibration)
    records = MetricsLog.read(Path(out_dir) / "metrics.jsonl")
    first = next((r for r in records if r["kind"] == "eval" and r["step"] == 0), {})
    manifest = {**(manifest_extra or {}), "stage": stage.name, "config": dataclasses.asdict(stage),
                "source": str(source), "chat_format": chat_format_spec, "label_ids": list(template.label_ids),
                **result, "pairs": pair_stats(pairs), "pairs_dropped_too_long": stream.dropped,
                "heldout": {"before": {k: first.get(k) for k in ("accuracy", "nll", "position_bias")},
                            "after": heldout_report(scores, fit_set + test_set, report.tau)},
                "calibration": report.to_dict(), "wall_seconds": time.monotonic() - started}
    if dist.get_rank() == 0:
        reliability_plot({"before (tau = 1)": (test.prob_a(), outcomes),
                          f"after (tau = {report.tau:.3g})": (test.prob_a(report.tau), outcomes)},
                         Path(out_dir) / "reliability.png", stage.calibration.bins)
        write_manifest(out_dir, manifest)
        logger.info("%s done: held-out accuracy %.3f (before %s), position bias %.3f, tau %.3g, ECE %.3f -> %.3f, "
                    "%.0f s", stage.name, manifest["heldout"]["after"]["accuracy"],
                    manifest["heldout"]["before"]["accuracy"], manifest["heldout"]["after"]["position_bias"],
                    report.tau, report.ece_before, report.ece_after, manifest["wall_seconds"])
    dist.barrier()
    return manifest
