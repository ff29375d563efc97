"""GPU validation of the 24B path in one command and one table (issue 13, item 7).

    python bench/gpu_validate.py                 # a GPU node; the TE rows need Transformer Engine
    python bench/gpu_validate.py --cpu           # reduced: tiny models, local spec, a few tokens (the test suite)
    python bench/gpu_validate.py --peak-tflops 989   # MFU against this dense bf16 peak (else from the GPU's name)

Rows (each "ok", "FAIL", "measured" or "skipped: <why>"; the exit status is 1 when a row fails):
- local spec == transformers: our megatron model on rows of packed documents against transformers run on each
  document alone (what the block-diagonal mask must reproduce).
- TE spec == local spec: the same weights and packed rows through Transformer Engine's THD path.
- THD + attention temperature == local block-diagonal: the same with the long-context config (YaRN + Ministral 3's
  position-dependent query scale, which must follow each document's own positions).
- KD step loss == plain loop: our distillation step (megatron schedules, fused vocab-chunked KL) against a plain
  transformers + PyTorch KD loop (full logits, torch ``kl_div``) on the same models and batch, first step.
- tokens/s of both loops in this run and their ratio; MFU of our step in bf16 and, where TE supports it, FP8.
- peak GPU memory of our step against ``nemo_plugins.cascade.memory.estimate_memory``.

Tolerances: logits against transformers are compared in fp32 (relative L2 error <= 1e-4). TE runs in bf16 only
(its fused THD attention has no fp32 kernel), so both specs run in bf16 and are measured against the local spec in
fp32: TE passes when its error is at most twice the local spec's own bf16 error (floor 1e-3). The KD losses agree
to 1e-5 in fp32 and 1e-2 in bf16 (relative). The long-context row uses beta = 1 so that a temperature computed on
the row's positions instead of each document's would change the logits far beyond bf16 noise.

MFU = step FLOPs / (step time x the GPU's dense bf16 peak; FP8 runs are measured against the same bf16 peak):
    step FLOPs = 6 N_s T + 2 N_t T + 2 (3 L_s d_s + L_t d_t) sum_rows(s^2)
where N = matmul parameters (layers + output layer; the input embedding is a lookup), T = tokens per step, L the
layer count, d = heads x head_dim, s the row length (one document per row in the KD rows). 6 N T is the student's
forward + backward, 2 N T the teacher's forward; causal attention costs 2 s^2 d per layer forward (QK^T and AV,
half of the square), three times that with the backward.

Simplifications: random weights (this checks arithmetic and speed, not quality); one GPU (TP = PP = CP = 1);
the plain loop trains every parameter with torch AdamW in the model's dtype (ours keeps fp32 main weights).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemo_plugins import cpu_compat
from nemo_plugins.bridges import config_to_hf
from nemo_plugins.cascade.memory import GIB, estimate_memory
from nemo_plugins.convert.model_io import gather_hf_state, load_hf_state
from nemo_plugins.distill.context import ContextExtension
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distill.step import DistillationStep, use_per_token_loss
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig, device, initialize
from nemo_plugins.model.builder import build_model, transformer_engine_usable
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.model.fast_path import SpeedOptions
from nemo_plugins.train.checkpoint import load_checkpoint, save_checkpoint
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.optimizer import build_optimizer, wrap_for_training

FP32_TOLERANCE = 1e-4  # relative L2 error of fp32 logits computed two ways
RUN_TO_RUN_FACTOR = 4  # see checkpoint_resume
KD_CHUNK = 1024  # the fused KL's rows per chunk in these runs (the memory model is told the same)
BF16_FLOOR = 1e-3  # the TE-vs-local bound never goes below this (bf16 has 8 significant bits)
# dense bf16 peak FLOP/s by GPU name (NVIDIA data sheets, SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}


@dataclass(frozen=True)
class Scale:
    student: MistralConfig
    teacher: MistralConfig
    rows: int  # rows per KD step
    seq_len: int
    micro_batch_size: int
    timed_steps: int  # after the first (warm-up, loss-check) step
    dtype: torch.dtype
    loss_tolerance: float  # relative difference of two computations of the same KD loss in ``dtype``


GPU = Scale(
    student=MistralConfig(num_layers=16, hidden_size=2048, num_attention_heads=16, num_kv_heads=8, head_dim=128,
                          ffn_hidden_size=6144, vocab_size=131072, tie_embeddings=True),  # 1.07B
    teacher=MistralConfig(num_layers=20, hidden_size=2560, num_attention_heads=20, num_kv_heads=4, head_dim=128,
                          ffn_hidden_size=8192, vocab_size=131072, tie_embeddings=True),  # 1.91B
    rows=8, seq_len=4096, micro_batch_size=1, timed_steps=3, dtype=torch.bfloat16, loss_tolerance=1e-2,
)
CPU = Scale(
    student=MistralConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                          ffn_hidden_size=64, vocab_size=256, max_position_embeddings=256),
    teacher=MistralConfig(num_layers=2, hidden_size=48, num_attention_heads=4, num_kv_heads=2, head_dim=16,
                          ffn_hidden_size=96, vocab_size=256, max_position_embeddings=256),
    rows=4, seq_len=32, micro_batch_size=2, timed_steps=1, dtype=torch.float32, loss_tolerance=1e-5,
)


@dataclass(frozen=True)
class Row:
    name: str
    result: str  # ok | FAIL | measured | skipped: <why>
    detail: str = ""


@dataclass(frozen=True)
class KDRun:
    loss: float  # the first step's loss (weights as given)
    seconds: float  # mean time of the timed steps
    peak_gib: float | None = None


def packed_documents(rows: int, seq_len: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of random documents (lengths seq_len/8 .. seq_len/2), positions restarting at each document."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq_len), generator=g)
    positions = torch.empty(rows, seq_len, dtype=torch.long)
    for row in range(rows):
        start = 0
        while start < seq_len:
            length = int(torch.randint(seq_len // 8, seq_len // 2 + 1, (1,), generator=g))
            end = min(seq_len, start + length)
            positions[row, start:end] = torch.arange(end - start)
            start = end
    return tokens, positions


def documents(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document of packed rows."""
    spans = []
    for row, pos in enumerate(positions.tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        spans += [(row, a, b) for a, b in zip(starts, starts[1:])]
    return spans


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def megatron_model(config: MistralConfig, state: dict | None, dtype: torch.dtype, use_te: bool,
                   fp8: str | None = None) -> torch.nn.Module:
    model = build_model(config, ParallelConfig(), dtype, use_te=use_te, speed=SpeedOptions(fp8=fp8))
    if state is not None:
        load_hf_state(model, state, config)
    return model


def hf_twin(config: MistralConfig, state: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The transformers model of ``config`` holding ``state`` (HF names), on this rank's device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = config_to_hf(config)
    model_type = values.pop("model_type")
    for key in ("architectures", "torch_dtype"):
        values.pop(key)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values), attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state does not fit transformers' model: missing {missing}, unexpected {unexpected}")
    return model.to(device(), dtype)


def random_states(scale: Scale) -> dict[str, dict[str, torch.Tensor]]:
    """HF-named weights of a randomly initialised student and teacher (megatron's initialisation)."""
    return {name: gather_hf_state(megatron_model(config, None, scale.dtype, use_te=False), config)
            for name, config in (("student", scale.student), ("teacher", scale.teacher))}


@torch.no_grad()
def local_vs_transformers(scale: Scale, state: dict) -> Row:
    """Packed rows through the local spec against transformers on each document alone, both in fp32."""
    tokens, positions = packed_documents(2, scale.seq_len, scale.student.vocab_size)
    ours = megatron_model(scale.student, state, torch.float32, use_te=False).eval()
    logits = ours(tokens.to(device()), positions.to(device())).float()
    reference = hf_twin(scale.student, state, torch.float32).eval()
    expected = torch.empty_like(logits)
    for row, start, end in documents(positions):
        expected[row, start:end] = reference(tokens[row : row + 1, start:end].to(device())).logits[0].float()
    error = relative_error(logits, expected)
    return Row("local spec == transformers (packed documents, fp32)", "ok" if error <= FP32_TOLERANCE else "FAIL",
               f"relative L2 error {error:.1e} (tolerance {FP32_TOLERANCE:.0e})")


@torch.no_grad()
def te_vs_local(name: str, config: MistralConfig, scale: Scale, state: dict) -> Row:
    """The same packed rows through the TE spec (THD) and the local spec (block-diagonal mask), in bf16, both
    against the local spec in fp32: TE must be no further from it than twice the local spec's own bf16 error."""
    if not transformer_engine_usable():
        return Row(name, "skipped: needs Transformer Engine on a GPU")
    tokens, positions = (t.to(device()) for t in packed_documents(2, scale.seq_len, config.vocab_size, seed=1))

    def logits(dtype: torch.dtype, use_te: bool) -> torch.Tensor:
        return megatron_model(config, state, dtype, use_te).eval()(tokens, positions).float()

    reference = logits(torch.float32, use_te=False)
    local_error = relative_error(logits(torch.bfloat16, use_te=False), reference)
    te_error = relative_error(logits(torch.bfloat16, use_te=True), reference)
    bound = max(2 * local_error, BF16_FLOOR)
    return Row(name, "ok" if te_error <= bound else "FAIL",
               f"relative L2 error to fp32 local: TE bf16 {te_error:.1e}, local bf16 {local_error:.1e} "
               f"(bound {bound:.1e})")


def _synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kd_batch(scale: Scale) -> tuple[torch.Tensor, torch.Tensor]:
    """One document per row, so transformers' plain causal attention computes what ours does."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, scale.student.vocab_size, (scale.rows, scale.seq_len), generator=g)
    return tokens, torch.arange(scale.seq_len).expand(scale.rows, -1).contiguous()


def kd_training(scale: Scale, states: dict, use_te: bool, fp8: str | None = None):
    """Student (DDP-wrapped), optimizer, scheduler and our distillation step on ``states``, as a stage builds them."""
    teacher = Teacher(megatron_model(scale.teacher, states["teacher"], scale.dtype, use_te))
    student = megatron_model(scale.student, states["student"], scale.dtype, use_te, fp8)
    use_per_token_loss(student)
    ddp, distributed = wrap_for_training(student)
    optimizer, scheduler = build_optimizer(ddp, OptimizerSettings(lr=1e-5, min_lr=1e-6), scale.timed_steps + 1,
                                           distributed)
    train = TrainSettings(seq_len=scale.seq_len, micro_batch_size=scale.micro_batch_size,
                          global_batch_size=scale.rows, train_tokens=scale.rows * scale.seq_len)
    return student, ddp, optimizer, scheduler, DistillationStep(teacher, KLOptions(chunk_tokens=KD_CHUNK), train)


def train_step(ddp, optimizer, scheduler, step, batch) -> float:
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = step(ddp, batch)
    optimizer.step()
    scheduler.step(1)
    return loss


def our_kd(scale: Scale, states: dict, batch: tuple, use_te: bool, fp8: str | None = None) -> KDRun:
    """Our distillation step with megatron's optimizer: the first step's loss, then the mean time of the others."""
    _, ddp, optimizer, scheduler, step = kd_training(scale, states, use_te, fp8)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(scale.timed_steps + 1):
        _synchronise()
        start = time.perf_counter()
        losses.append(train_step(ddp, optimizer, scheduler, step, batch))
        _synchronise()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    return KDRun(losses[0], sum(times[1:]) / scale.timed_steps, peak)


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a)


def checkpoint_resume(scale: Scale, states: dict, use_te: bool) -> Row:
    """Two KD steps straight through against one step, ``save_checkpoint``, a fresh model and optimizer restored by
    ``load_checkpoint`` and the second step. On a GPU this is megatron's distributed optimizer writing and reading its
    sharded state (CPU runs have the plain optimizer). Where two straight runs agree bit for bit (the CPU) the
    resumed weights must too; where the GPU's kernels are not deterministic (atomics in backward passes) they must
    be no further from the straight run than RUN_TO_RUN_FACTOR times the two straight runs are from each other: a
    resume that loses the optimizer's moments is off by ~lr, far beyond that spread."""
    batch = kd_batch(scale)

    def straight_run() -> dict[str, torch.Tensor]:
        student, *training = kd_training(scale, states, use_te)
        for _ in range(2):
            train_step(*training, batch)
        return gather_hf_state(student, scale.student)

    straight, again = straight_run(), straight_run()
    with tempfile.TemporaryDirectory() as root:
        student, ddp, optimizer, scheduler, step = kd_training(scale, states, use_te)
        train_step(ddp, optimizer, scheduler, step, batch)
        saved = save_checkpoint(root, 1, student, optimizer, scale.student,
                                {"scheduler": scheduler.state_dict()}, None, keep_last=1)
        student, ddp, optimizer, scheduler, step = kd_training(scale, states, use_te)
        scheduler.load_state_dict(load_checkpoint(saved, student, optimizer)["scheduler"])
        train_step(ddp, optimizer, scheduler, step, batch)
        resumed = gather_hf_state(student, scale.student)
    spread, error = largest_difference(straight, again), largest_difference(straight, resumed)
    optimizer_kind = type(optimizer.chained_optimizers[0] if hasattr(optimizer, "chained_optimizers")
                          else optimizer).__name__
    bound = RUN_TO_RUN_FACTOR * spread
    return Row(f"checkpoint save -> resume == straight run ({optimizer_kind})", "ok" if error <= bound else "FAIL",
               f"largest weight difference after the resumed step {error:.1e} (two straight runs: {spread:.1e}; "
               f"bound {bound:.1e})")


def plain_kd(scale: Scale, states: dict, batch: tuple) -> KDRun:
    """The plain loop: transformers models, full fp32 logits, torch's kl_div, mean over targets, AdamW."""
    teacher = hf_twin(scale.teacher, states["teacher"], scale.dtype).eval().requires_grad_(False)
    student = hf_twin(scale.student, states["student"], scale.dtype).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    tokens, positions = (t.to(device()) for t in batch)
    mask = torch.ones(tokens.shape, device=device())
    mask[:, -1] = 0.0  # the last position has no next token
    targets = mask.sum()
    losses, times = [], []
    for _ in range(scale.timed_steps + 1):
        _synchronise()
        start = time.perf_counter()
        total = 0.0
        for rows in torch.arange(scale.rows).split(scale.micro_batch_size):
            with torch.no_grad():
                teacher_logp = F.log_softmax(teacher(tokens[rows], position_ids=positions[rows]).logits.float(), -1)
            student_logp = F.log_softmax(student(tokens[rows], position_ids=positions[rows]).logits.float(), -1)
            kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
            loss = (kl * mask[rows]).sum() / targets
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        _synchronise()
        times.append(time.perf_counter() - start)
        losses.append(total)
    return KDRun(losses[0], sum(times[1:]) / scale.timed_steps)


def matmul_parameters(config: MistralConfig) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding (a lookup) and the norms."""
    embedding = 0 if config.tie_embeddings else config.vocab_size * config.hidden_size
    norms = config.num_layers * 2 * config.hidden_size + config.hidden_size
    return config.num_parameters() - embedding - norms


def step_flops(scale: Scale) -> float:
    """The module docstring's formula for one KD step of ``scale`` (one document per row)."""
    tokens = scale.rows * scale.seq_len
    s, t = scale.student, scale.teacher
    attention = 2 * (3 * s.num_layers * s.num_attention_heads * s.head_dim
                     + t.num_layers * t.num_attention_heads * t.head_dim) * scale.rows * scale.seq_len ** 2
    return 6 * matmul_parameters(s) * tokens + 2 * matmul_parameters(t) * tokens + attention


def peak_flops(override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    if not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, name
    return None, f"unknown peak for {name}: pass --peak-tflops"


def fp8_support() -> tuple[bool, str]:
    if not transformer_engine_usable():
        return False, "needs Transformer Engine on a GPU"
    try:
        from transformer_engine.pytorch.fp8 import check_fp8_support
    except ImportError as error:
        return False, f"this Transformer Engine has no FP8 check ({error})"
    return check_fp8_support()


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def kd_rows(scale: Scale, states: dict, peak: tuple[float | None, str]) -> list[Row]:
    use_te = transformer_engine_usable()
    batch = kd_batch(scale)
    tokens = scale.rows * scale.seq_len
    ours = our_kd(scale, states, batch, use_te)
    _release()
    plain = plain_kd(scale, states, batch)
    _release()
    error = abs(ours.loss - plain.loss) / abs(plain.loss)
    spec = "TE" if use_te else "local spec"
    rows = [
        Row("KD step loss == plain transformers + PyTorch loop", "ok" if error <= scale.loss_tolerance else "FAIL",
            f"ours {ours.loss:.6g}, plain {plain.loss:.6g}, relative error {error:.1e}"),
        Row(f"KD tokens/s, ours ({spec}) / plain", "measured",
            f"{tokens / ours.seconds:,.0f} / {tokens / plain.seconds:,.0f} = {plain.seconds / ours.seconds:.2f}x"),
    ]
    peak_value, peak_source = peak
    runs = {"bf16" if scale.dtype == torch.bfloat16 else str(scale.dtype).removeprefix("torch."): ours}
    supported, why = fp8_support()
    if supported:
        runs["fp8 (hybrid)"] = our_kd(scale, states, batch, use_te, fp8="hybrid")
        _release()
    for precision, run in runs.items():
        if peak_value is None:
            rows.append(Row(f"MFU {precision}", f"skipped: {peak_source}"))
        else:
            mfu = step_flops(scale) / run.seconds / peak_value
            rows.append(Row(f"MFU {precision}", "measured",
                            f"{100 * mfu:.1f}% ({step_flops(scale) / 1e12:.1f} TFLOP/step in {run.seconds:.3f} s, "
                            f"peak {peak_value / 1e12:.0f} TFLOP/s: {peak_source})"))
    if not supported:
        rows.append(Row("MFU fp8", f"skipped: {why}"))
    if ours.peak_gib is None:
        rows.append(Row("peak GPU memory vs memory model", "skipped: no GPU"))
    else:
        model = estimate_memory(scale.student, scale.teacher, ParallelConfig(), 1, scale.seq_len,
                                scale.micro_batch_size, scale.rows // scale.micro_batch_size,
                                chunk_tokens=KD_CHUNK).total
        rows.append(Row("peak GPU memory vs memory model", "measured",
                        f"measured {ours.peak_gib:.1f} GiB, model {model:.1f} GiB, ratio {ours.peak_gib / model:.2f}"))
    return rows


def validate(scale: Scale, peak: tuple[float | None, str]) -> list[Row]:
    cpu_compat.install()
    initialize(ParallelConfig())
    torch.manual_seed(0)
    states = random_states(scale)
    long_config = ContextExtension(original_context=scale.seq_len // 4, yarn_factor=4.0,
                                   attention_temperature_beta=1.0).apply(scale.student)
    rows = [
        local_vs_transformers(scale, states["student"]),
        te_vs_local("TE spec == local spec (packed documents, THD)", scale.student, scale, states["student"]),
        te_vs_local("THD + attention temperature == local block-diagonal", long_config, scale, states["student"]),
    ]
    _release()
    rows += kd_rows(scale, states, peak)
    _release()
    tiny = states if scale is CPU else random_states(CPU)  # the format is what is checked: tiny models suffice
    return rows + [checkpoint_resume(CPU, tiny, transformer_engine_usable())]


def table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    status = max(len(r.result) for r in rows)
    return "\n".join(f"{r.name:<{width}}  {r.result:<{status}}  {r.detail}".rstrip() for r in rows)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="reduced mode: tiny models, local spec, a few tokens")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU in TFLOP/s")
    args = parser.parse_args(argv)
    scale = CPU if args.cpu or not torch.cuda.is_available() else GPU
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {where}; student {scale.student.num_parameters() / 1e6:,.1f}M, teacher "
          f"{scale.teacher.num_parameters() / 1e6:,.1f}M params; {scale.rows} x {scale.seq_len} tokens per step; "
          f"{str(scale.dtype).removeprefix('torch.')}")
    rows = validate(scale, peak_flops(args.peak_tflops))
    print(table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(row.result == "FAIL" for row in main()) else 0)
