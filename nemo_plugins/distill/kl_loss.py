"""Forward KL(teacher || student) on next-token distributions, fused with the student's output layer.

Why fused: at 131k vocabulary a micro-batch of 8k tokens has 4 GiB of fp32 logits per [tokens x vocab]
tensor, and the naive loss keeps several (logits, log-probabilities, their gradient). Here the student's
logits are made chunk by chunk from its final hidden states, and the gradient with respect to the hidden
states and the output weight is computed in the same pass (the loss is the last op, so nothing is
recomputed): peak extra memory is one [chunk x vocab] block, and the matmul count equals a plain output layer's
forward + backward.

Vocab-parallel: under tensor parallelism each rank holds a vocabulary shard of the output weight and of the
teacher's logits; the softmax max and sum-exp and the KL sum are all-reduced over the TP group, exactly as
megatron's ``vocab_parallel_cross_entropy`` does, and the gradient of the hidden states is summed over it.

The teacher is either its logits (``DenseTeacher``, any dtype, converted to fp32 one chunk at a time) or
its final hidden states and output weight (``FusedTeacher``): then the teacher's logits are also made
chunk by chunk and no [tokens x vocab] tensor exists at all.

Options: ``temperature`` (both distributions at z / T), ``ce_weight`` (mix in next-token cross-entropy on
``labels``, (1 - w) KL + w CE; 0 = the paper's KL alone) and ``reverse`` (KL(student || teacher), ablations).

``reduction="sum"`` returns the sum over unmasked tokens instead of their mean: the training step hands that
sum and the token count to megatron, which divides by the count of every micro-batch, DP and CP rank together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_plugins.errors import ConfigError


@dataclass
class KLOptions:
    temperature: float = 1.0
    ce_weight: float = 0.0
    reverse: bool = False
    chunk_tokens: int = 256

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ConfigError(f"distill.ce_weight must be in [0, 1], got {self.ce_weight}")
        if self.chunk_tokens < 1:
            raise ConfigError("distill.chunk_tokens must be >= 1")


@dataclass(frozen=True)
class DenseTeacher:
    """Teacher logits ``[tokens, vocab_shard]`` as the teacher model produced them."""

    logits: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.logits.shape)

    def chunk(self, rows: slice) -> torch.Tensor:
        return self.logits[rows].detach().float()


@dataclass(frozen=True)
class FusedTeacher:
    """Teacher final hidden states ``[tokens, hidden_t]`` and output weight ``[vocab_shard, hidden_t]``."""

    hidden: torch.Tensor
    weight: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hidden.shape[0], self.weight.shape[0])

    def chunk(self, rows: slice) -> torch.Tensor:
        with torch.no_grad():
            return (self.hidden[rows] @ self.weight.T).float()


# glibc hands out blocks above 32 MiB (its largest mmap threshold) as fresh mmap'd pages, zeroed and faulted in at
# every allocation; below it, freed blocks are reused. On the CPU a [chunk x vocab] fp32 block (about six per chunk)
# is therefore kept well under it: KL forward + backward on 1,024 tokens x 49,152 vocabulary took 3.04-3.12 CPU-s in
# chunks of 256 rows (48 MiB blocks), 3.06 at 160 rows (31 MiB: at the edge) and 2.81-2.83 at 128 rows (24 MiB);
# a plain full-vocabulary log_softmax KL took 3.27-3.35 (one thread, alternated medians).
CPU_BLOCK_BYTES = 24 * 2**20


def chunk_rows(chunk_tokens: int, vocab_local: int, device: torch.device) -> int:
    """Rows per chunk: ``chunk_tokens``, on the CPU at most what keeps one fp32 [rows x vocab] block under
    ``CPU_BLOCK_BYTES``; GPUs' caching allocator reuses blocks of any size."""
    if device.type != "cpu":
        return chunk_tokens
    return max(1, min(chunk_tokens, CPU_BLOCK_BYTES // (4 * vocab_local)))


def _tp_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if _tp_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _softmax(logits: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities, probabilities) over a vocabulary split across ``group`` (fp32), one exp per logit.

    A whole vocabulary on this rank takes PyTorch's fused ``log_softmax`` (one kernel in place of max, shift, exp,
    sum, log and two more passes over the [chunk x vocab] block: the KL step's elementwise time halves on the CPU)."""
    if _tp_size(group) == 1:
        logp = torch.log_softmax(logits, dim=-1)
        return logp, logp.exp()
    maximum = _all_reduce(logits.max(dim=-1, keepdim=True).values, dist.ReduceOp.MAX, group)
    shifted = logits - maximum
    exp = shifted.exp()
    sum_exp = _all_reduce(exp.sum(dim=-1, keepdim=True), dist.ReduceOp.SUM, group)
    return shifted.sub_(sum_exp.log()), exp.div_(sum_exp)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` of two [rows x vocab] blocks as one batched GEMV: no [rows x vocab] product is written.
    ``torch.linalg.vecdot`` (elementwise product, then a sum) took 21 ms on a 128 x 49,152 chunk on one CPU
    thread, this 6.7 ms: the KL's largest elementwise cost after the two ``log_softmax``."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


def _vocab_start(vocab_local: int, group) -> int:
    return (dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0) * vocab_local


def _chunk_loss_and_grad(z_student, z_teacher, mask, labels, options: KLOptions, group, vocab_start):
    """Per-token loss [c] and d(loss)/d(student logits) [c, v] for one chunk (fp32)."""
    t = options.temperature
    logp_s, p_s = _softmax(z_student / t if t != 1.0 else z_student, group)
    logp_t, p_t = _softmax(z_teacher / t if t != 1.0 else z_teacher, group)
    if options.reverse:
        log_ratio = logp_s - logp_t
        kl = _all_reduce(_row_dot(p_s, log_ratio), dist.ReduceOp.SUM, group)
        grad = p_s * log_ratio.sub_(kl[:, None]) / t
    else:
        kl = _all_reduce(_row_dot(p_t, logp_t - logp_s), dist.ReduceOp.SUM, group)
        grad = p_s.sub(p_t) if options.ce_weight > 0 else p_s.sub_(p_t)  # p_s is still needed for the CE term
        if t != 1.0:
            grad.div_(t)
    loss = kl
    if options.ce_weight > 0:
        logp_1, p_1 = (logp_s, p_s) if t == 1.0 else _softmax(z_student, group)
        local = labels - vocab_start
        here = (local >= 0) & (local < z_student.shape[-1])
        clamped = local.clamp(0, z_student.shape[-1] - 1)
        picked = torch.where(here, logp_1.gather(-1, clamped[:, None])[:, 0], torch.zeros_like(kl))
        ce = -_all_reduce(picked, dist.ReduceOp.SUM, group)
        grad_ce = p_1.clone()
        grad_ce[here, local[here]] -= 1.0
        loss = (1 - options.ce_weight) * kl + options.ce_weight * ce
        grad = (1 - options.ce_weight) * grad + options.ce_weight * grad_ce
    grad[mask == 0] = 0.0  # what multiplying by the 0/1 mask gives, without a pass over the unmasked rows
    return loss * mask, grad


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher, mask, labels, options: KLOptions, group, needs_grad: bool, mean: bool):
        tokens = hidden.shape[0]
        count = mask.sum().clamp_min(1.0) if mean else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if needs_grad:
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        vocab_start = _vocab_start(weight.shape[0], group)
        step = chunk_rows(options.chunk_tokens, weight.shape[0], hidden.device)
        for start in range(0, tokens, step):
            rows = slice(start, start + step)
            h = hidden[rows]
            z_student = (h @ weight.T).float()
            loss, grad = _chunk_loss_and_grad(z_student, teacher.chunk(rows), mask[rows].float(),
                                              None if labels is None else labels[rows], options, group, vocab_start)
            total += loss.sum()
            if needs_grad:
                grad = (grad if count is None else grad.div_(count)).to(weight.dtype)
                grad_hidden[rows] = grad @ weight
                if grad_weight.dtype == grad.dtype:  # fp32: accumulate inside the GEMM, no [vocab x hidden] temporary
                    grad_weight.addmm_(grad.T, h)
                else:
                    grad_weight += (grad.T @ h).float()
        if needs_grad:
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, group)
            ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        return total if count is None else total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None, None, None, None


def fused_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: DenseTeacher | FusedTeacher | torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    options: KLOptions = KLOptions(),
    tp_group=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean (or, with ``reduction="sum"``, sum) over unmasked tokens of KL(p_teacher || p_student), student
    logits = ``hidden @ weight.T``.

    Shapes: ``hidden`` [tokens, hidden], ``weight`` [vocab_shard, hidden], ``teacher`` a ``DenseTeacher`` /
    ``FusedTeacher`` (a plain tensor means dense logits [tokens, vocab_shard]), ``mask`` [tokens], ``labels``
    [tokens] (global ids; only with ``ce_weight > 0``). The teacher receives no gradient.
    """
    if options.ce_weight > 0 and labels is None:
        raise ValueError("kl.ce_weight > 0 needs labels")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if isinstance(teacher, torch.Tensor):
        teacher = DenseTeacher(teacher)
    if teacher.shape != (hidden.shape[0], weight.shape[0]):
        raise ConfigError(
            f"teacher logits {teacher.shape} do not match student tokens x vocab shard "
            f"({hidden.shape[0]}, {weight.shape[0]}): teacher and student need the same vocabulary and TP layout"
        )
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedKL.apply(hidden, weight, teacher, mask, labels, options, tp_group, needs_grad, reduction == "mean")


@torch.no_grad()
def token_kl_and_nll(hidden: torch.Tensor, weight: torch.Tensor, teacher: FusedTeacher, labels: torch.Tensor,
                     chunk_tokens: int = 256, tp_group=None) -> dict[str, torch.Tensor]:
    """Per-token KL(teacher || student) and both models' next-token NLL of ``labels`` (evaluation, fp32).

    Same chunking and vocab-parallel reductions as the loss, so evaluation also never holds full logits.
    """
    vocab_local = weight.shape[0]
    vocab_start = _vocab_start(vocab_local, tp_group)
    out = {name: torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
           for name in ("kl", "student_nll", "teacher_nll")}

    def nll(logp, local, here):
        picked = logp.gather(-1, local.clamp(0, vocab_local - 1)[:, None])[:, 0]
        return -_all_reduce(torch.where(here, picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, tp_group)

    step = chunk_rows(chunk_tokens, vocab_local, hidden.device)
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        logp_s, _ = _softmax((hidden[rows] @ weight.T).float(), tp_group)
        logp_t, p_t = _softmax(teacher.chunk(rows), tp_group)
        out["kl"][rows] = _all_reduce(_row_dot(p_t, logp_t - logp_s), dist.ReduceOp.SUM, tp_group)
        local = labels[rows] - vocab_start
        here = (local >= 0) & (local < vocab_local)
        out["student_nll"][rows] = nll(logp_s, local, here)
        out["teacher_nll"][rows] = nll(logp_t, local, here)
    return out


def naive_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  labels: torch.Tensor | None = None, options: KLOptions = KLOptions()) -> torch.Tensor:
    """The textbook reference on full (unsharded) logits, built on ``torch.nn.functional.kl_div``."""
    t = options.temperature
    logp_s = torch.log_softmax(student_logits.float() / t, -1)
    logp_t = torch.log_softmax(teacher_logits.float() / t, -1)
    if options.reverse:
        per_token = torch.nn.functional.kl_div(logp_t, logp_s, log_target=True, reduction="none").sum(-1)
    else:
        per_token = torch.nn.functional.kl_div(logp_s, logp_t, log_target=True, reduction="none").sum(-1)
    if options.ce_weight > 0:
        ce = torch.nn.functional.cross_entropy(student_logits.float(), labels, reduction="none")
        per_token = (1 - options.ce_weight) * per_token + options.ce_weight * ce
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
