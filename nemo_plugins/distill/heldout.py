"""Held-out teacher-student KL and both models' perplexity on the same rows, without full logits: pooled over the
mix's sources and per source (code and prose move differently under distillation), with the teacher's pass cached.

A mix with interleaved image-text sources evaluates their held-out rows too, with the images (student and teacher
each with its own projector), on text targets only (``text_target_mask``: image tokens are out of the KL and the
perplexity, as in training); a text-only mix's rows and figures are exactly as before.

Pooled figures are computed exactly as before per-source ones existed (same micro-batches, same float64 sums), so
they do not move; each source's figures come from the same per-token values, restricted to its rows.

The teacher's side of the evaluation (its final hidden states on the held-out rows) is the same at every
evaluation of a stage and for every child distilled from the same parent on the same rows, so it is computed once:
kept in memory for the stage, and written to ``cache_dir`` (atomically, one file per rank) under a key of the
teacher's identity (its source and a digest of its weights) and of the rows, micro-batch size and parallel layout.
A changed teacher, held-out set or layout misses the cache and recomputes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_plugins.data.batches import local_batch
from nemo_plugins.data.interleaved import text_target_mask
from nemo_plugins.distill.kl_loss import FusedTeacher, token_kl_and_nll
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import device
from nemo_plugins.errors import DataError
from nemo_plugins.model.forward import forward_only
from nemo_plugins.parallel_ops import flatten_tokens, full_sequence, sum_from_last_stage, tp_group

logger = logging.getLogger(__name__)

METRICS = ("kl", "student_nll", "teacher_nll")


@dataclass(frozen=True)
class HeldoutSet:
    """The evaluation rows of a mix (``tokens``, ``positions``, an optional assistant ``target_mask``) and which
    source each row comes from (``sources``: names in row order, ``row_source``: an index into them per row)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    target_mask: torch.Tensor | None
    sources: tuple[str, ...]
    row_source: torch.Tensor
    images: tuple[list, ...] | None = None  # per row, its ``RowImage`` list (a mix with interleaved sources)

    def fingerprint(self) -> str:
        """Digest of the rows' contents (tokens, positions, mask, image pixels): what the teacher's pass depends on."""
        digest = hashlib.sha256()
        pixels = [image.pixels for row in self.images or () for image in row]
        for tensor in (self.tokens, self.positions, self.target_mask, *pixels):
            if tensor is not None:
                digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
                digest.update(tensor.contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def row_images(self, rows: range) -> list:
        """The images of ``rows`` in row order: the model's ``images`` input for a micro-batch of them."""
        return [image for i in rows for image in self.images[i]]


def heldout_set(data, seq_len: int, rows_per_source: int) -> HeldoutSet:
    """``data.heldout_rows`` (a ``DataMix`` or ``ChatMix``) with each row's source: the mix's own ``heldout_rows``
    on a copy restricted to one source gives that source's row count (both mixes emit sources in order)."""
    if getattr(data, "images", None) is not None:
        return heldout_set_with_images(data, seq_len, rows_per_source)
    tokens, positions, *target_mask = data.heldout_rows(seq_len, rows_per_source)
    counts = []
    for source in data.sources:
        view = copy.copy(data)
        view.sources = [source]
        try:
            counts.append(len(view.heldout_rows(seq_len, rows_per_source)[0]))
        except DataError:  # this source's held-out split holds no row of seq_len; the others do
            counts.append(0)
    if sum(counts) != len(tokens):
        raise RuntimeError(f"held-out rows per source {counts} do not add up to the mix's {len(tokens)} rows")
    names = tuple(s.name for s in data.sources)
    row_source = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(counts))
    return HeldoutSet(tokens, positions, target_mask[0] if target_mask else None, names, row_source)


def heldout_set_with_images(data, seq_len: int, rows_per_source: int) -> HeldoutSet:
    """A ``DataMix`` with interleaved sources: every source's held-out rows, read by the mix itself one source at a
    time (an image source read as text, then given the images of each of its tail's windows), the text-target
    mask over all rows (all ones on text rows)."""
    tokens, positions, images, counts = [], [], [], []
    for source in data.sources:
        view = copy.copy(data)
        view.sources = [dataclasses.replace(source, images=None)]
        try:
            rows = view.heldout_rows(seq_len, rows_per_source)
        except DataError:  # this source's held-out split holds no row of seq_len; the others may
            counts.append(0)
            continue
        tokens.append(rows[0])
        positions.append(rows[1])
        counts.append(len(rows[0]))
        start = data.train_end[source.name]  # the mix's held-out windows follow each other from the split
        images += [[] if source.images is None else
                   source.images.row_images(start + i * seq_len, start + (i + 1) * seq_len) for i in range(counts[-1])]
    if not tokens:
        raise DataError(f"held-out split holds fewer than {seq_len} tokens per source: raise data.heldout_fraction")
    tokens_t = torch.cat(tokens)
    row_source = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return HeldoutSet(tokens_t, torch.cat(positions), text_target_mask(tokens_t, data.images.vision),
                      tuple(s.name for s in data.sources), row_source, tuple(images))


def teacher_digest(teacher: Teacher) -> str:
    """Digest of this rank's teacher weights (float64 sum and norm per tensor): a changed checkpoint behind the same
    source name changes it."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in teacher.model.named_parameters():
            stats = (torch.sum(p, dtype=torch.float64).item(), torch.linalg.vector_norm(p, dtype=torch.float64).item())
            digest.update(f"{name}{tuple(p.shape)}{p.dtype}{stats}".encode())
    return digest.hexdigest()


class TeacherHeldout:
    """The teacher's final hidden states on this rank's held-out micro-batches, computed once per key.

    ``identity`` names the teacher (its model source); ``cache_dir`` (optional) keeps them across stages, children
    and restarts. ``computed`` counts teacher passes run here (a cache hit leaves it unchanged)."""

    def __init__(self, teacher: Teacher, identity: str, cache_dir: Path | None = None) -> None:
        self.teacher = teacher
        self.identity = identity
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.computed = 0
        self._weights: str | None = None
        self._memory: dict[str, list[torch.Tensor]] = {}

    def key(self, heldout: HeldoutSet, micro_batch_size: int) -> str:
        if self._weights is None:
            self._weights = teacher_digest(self.teacher)
        layout = (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                  parallel_state.get_tensor_model_parallel_rank(),
                  parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_pipeline_model_parallel_rank(),
                  parallel_state.get_pipeline_model_parallel_world_size(), self.teacher.sequence_parallel)
        text = f"{self.identity}|{self._weights}|{heldout.fingerprint()}|{micro_batch_size}|{layout}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def hidden(self, heldout: HeldoutSet, batches: list[tuple], micro_batch_size: int) -> list[torch.Tensor]:
        """The teacher's hidden states per micro-batch of ``batches`` (this rank's part of ``heldout``: tokens,
        positions and, with images, the model's keyword inputs)."""
        key = self.key(heldout, micro_batch_size)
        if key in self._memory:
            return self._memory[key]
        path = None if self.cache_dir is None else self.cache_dir / f"{key}.rank{dist.get_rank()}.pt"
        if path is not None and _on_every_rank(path.exists()):  # else all ranks run the teacher's pipeline
            hidden = torch.load(path, map_location="cpu", weights_only=True)
            hidden = [h.to(device()) for h in hidden]
            logger.info("teacher held-out pass read from %s", path)
        else:
            hidden = [out.hidden for batch in batches for out in self.teacher.run([batch])]
            self.computed += 1
            if path is not None:
                _save_atomic([h.cpu() for h in hidden], path)
        self._memory[key] = hidden
        return hidden


def _on_every_rank(flag: bool) -> bool:
    agreed = torch.tensor([float(flag)], device=device())
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return bool(agreed.item())


def _save_atomic(value, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(value, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate_heldout(student: torch.nn.Module, teacher: TeacherHeldout, heldout: HeldoutSet, micro_batch_size: int,
                     chunk_tokens: int = 256) -> dict[str, float]:
    """Mean KL(teacher || student) per token and student / teacher perplexity, pooled (``kl``, ``student_ppl``,
    ``teacher_ppl``, ``tokens``) and per source (``<source>/kl``, ...); DP ranks split the rows.

    With a ``target_mask`` (a chat mix's assistant targets) only those tokens count: assistant-token KL and perplexity.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    extra = [] if heldout.target_mask is None else [heldout.target_mask]
    rows = [t[dp_rank::dp_size] for t in (heldout.tokens, heldout.positions, *extra)]
    # each token's source, laid out as local_batch lays out the tokens (context-parallel parts included)
    token_sources = heldout.row_source[dp_rank::dp_size, None].expand(rows[0].shape)
    starts = range(0, len(rows[0]), micro_batch_size)
    locals_ = [local_batch(*(t[start : start + micro_batch_size] for t in rows)) for start in starts]
    sources_ = [local_batch(token_sources[start : start + micro_batch_size], rows[1][start : start + micro_batch_size])
                ["tokens"].reshape(-1) for start in starts]
    my_rows = range(dp_rank, len(heldout.tokens), dp_size)
    model_inputs = [{"images": heldout.row_images(my_rows[start : start + micro_batch_size])} if heldout.images
                    else {} for start in starts]  # the teacher's third micro-batch item, the student's keywords
    batches = [(local["tokens"], local["positions"], *([kw] if kw else [])) for local, kw in zip(locals_, model_inputs)]
    last_stage = parallel_state.is_pipeline_last_stage()
    teacher_hidden = teacher.hidden(heldout, batches, micro_batch_size)  # every stage: the teacher's pipeline
    if not last_stage:
        teacher_hidden = [None] * len(batches)
    weight = teacher.teacher.model.output_weight() if last_stage else None
    sequence_parallel = student.config.sequence_parallel
    n_sources = len(heldout.sources)
    totals = torch.zeros(1 + n_sources, 4, dtype=torch.float64)  # row 0 pooled, then one row per source
    for local, token_source, batch, kw, hidden_t in zip(locals_, sources_, batches, model_inputs, teacher_hidden):
        labels, mask = local["labels"].reshape(-1), local["mask"].reshape(-1)

        def reduce(hidden, hidden_t=hidden_t, labels=labels, mask=mask, token_source=token_source):
            student_hidden = flatten_tokens(full_sequence(hidden, sequence_parallel))
            per_token = token_kl_and_nll(student_hidden, student.output_weight(), FusedTeacher(hidden_t, weight),
                                         labels, chunk_tokens, tp_group())
            pooled = {name: (value * mask).double().sum().cpu() for name, value in per_token.items()}
            by_source = torch.stack([torch.stack([(per_token[name] * mask * (token_source == k)).double().sum().cpu()
                                                  for name in METRICS]) for k in range(n_sources)])
            return {**pooled, "by_source": by_source}

        for out in forward_only(student, [(*batch[:2], None)], reduce, forward_kwargs={"return_hidden": True, **kw}):
            totals[0] += torch.stack([out["kl"], out["student_nll"], out["teacher_nll"], mask.double().sum().cpu()])
            counts = [(mask * (token_source == k)).double().sum().cpu() for k in range(n_sources)]
            totals[1:] += torch.cat([out["by_source"], torch.stack(counts)[:, None]], dim=1)
    totals = sum_from_last_stage(totals)
    result = _figures(totals[0].tolist())
    for k, name in enumerate(heldout.sources):
        if totals[1 + k, 3] > 0:
            result.update({f"{name}/{key}": value for key, value in _figures(totals[1 + k].tolist()).items()})
    return result


def _figures(totals: list[float]) -> dict[str, float]:
    kl, student_nll, teacher_nll, count = totals
    return {
        "kl": kl / count,
        "student_ppl": math.exp(student_nll / count),
        "teacher_ppl": math.exp(teacher_nll / count),
        "tokens": int(count),
    }
