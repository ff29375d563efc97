"""Per-GPU memory estimate of a stage (student + teacher + optimizer + activations), for choosing layouts.

Assumptions, stated so the numbers can be checked: bf16 weights (2 B/param), fp32 gradient buffers (4 B),
Adam with fp32 main weights and moments (12 B) sharded over data x context parallel ranks by megatron's
distributed optimizer; parameters split evenly over TP x PP; flash attention and sequence parallelism, so every
activation is split over TP; s divided by CP, and under 1F1B the first pipeline stage holds PP micro-batches of
L / PP layers, i.e. L layers' worth; the teacher's final hidden states (bf16) for every micro-batch of a step; the
fused distillation loss's working set on the last stage (``output_stage_bytes``). Checked against a measured peak on
one H200 by ``bench/gpu_validate.py`` (bench/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.model.config import MistralConfig

GIB = 1024 ** 3


@dataclass(frozen=True)
class MemoryEstimate:
    student_weights: float
    gradients: float
    optimizer: float
    teacher_weights: float
    activations: float
    teacher_hidden: float
    output_stage: float

    @property
    def total(self) -> float:
        return sum(vars(self).values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value:.1f}" for name, value in vars(self).items())
        return f"{self.total:.1f} GiB/GPU ({parts})"


def layer_activation_bytes(config: MistralConfig) -> int:
    """Bytes per token one layer keeps for its backward (bf16): the two norms' inputs and outputs (4 h: the outputs
    are the QKV and FC1 GEMMs' saved inputs), the fused QKV output (q + 2 kv: the value is a view of it and keeps it
    alive), the rotated query and key (q + kv), the attention output and the output projection's contiguous input
    (2 q), FC1's output (2 f) and the SwiGLU product (f); q = heads x head_dim, kv = kv heads x head_dim, f = FFN.
    The Korthikanti et al. (2022) 34 s b h is this count for GPT's 4 h GELU MLP; SwiGLU and GQA change it."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    return 2 * (4 * config.hidden_size + 4 * q + 3 * kv + 3 * config.ffn_hidden_size)


def output_stage_bytes(config: MistralConfig, tp: int, chunk_tokens: int) -> float:
    """The fused KL at its peak (``distill/kl_loss.py``, ``_FusedKL.forward``), on the last pipeline stage: the fp32
    gradient of the output weight [V/TP, h] it accumulates, and seven fp32 [chunk, V/TP] blocks alive inside
    ``_chunk_loss_and_grad`` (student and teacher logits, both log-probabilities and probabilities, the log-ratio).
    ``estimate_memory`` adds it to the first stage's activations: an upper bound when PP > 1."""
    vocab = config.vocab_size / tp
    return 4 * vocab * config.hidden_size + 7 * 4 * chunk_tokens * vocab


def estimate_memory(student: MistralConfig, teacher: MistralConfig | None, parallel: ParallelConfig, data_parallel: int,
                    seq_len: int, micro_batch_size: int, microbatches: int, training: bool = True,
                    chunk_tokens: int = KLOptions.chunk_tokens) -> MemoryEstimate:
    """``chunk_tokens``: the stage's ``kl.chunk_tokens`` (the fused KL's rows per chunk)."""
    model_parallel = parallel.tp * parallel.pp
    student_params = student.num_parameters() / model_parallel
    sharding = data_parallel * parallel.cp
    tokens_per_rank = seq_len * micro_batch_size / parallel.cp
    activations = (layer_activation_bytes(student) * tokens_per_rank * student.num_layers / parallel.tp
                   if training else 0.0)
    return MemoryEstimate(
        student_weights=2 * student_params / GIB,
        gradients=(4 * student_params if training else 0.0) / GIB,
        optimizer=(12 * student_params / sharding if training else 0.0) / GIB,
        teacher_weights=(2 * teacher.num_parameters() / model_parallel if teacher else 0.0) / GIB,
        activations=activations / GIB,
        teacher_hidden=(2 * tokens_per_rank * teacher.hidden_size * microbatches if teacher else 0.0) / GIB,
        output_stage=(output_stage_bytes(student, parallel.tp, chunk_tokens) if training and teacher else 0.0) / GIB,
    )


# ---------------------------------------------------------------------------------------- per-step peaks
# What each step holds at its peak, per rank, from the shapes and the layout (the code paths named in each
# function). Host RAM counts the process runtime (python, torch, megatron; a CUDA context on GPU nodes) plus what
# the step keeps in host memory; on a CPU run the model's parameters and activations are host memory too.
# Checked against measured peak RSS at TP=2 on CPU by bench/memory.py.
# cpu: RssAnon of an initialised rank (bench/memory.py); gpu: + CUDA context, assumed
HOST_RUNTIME_GIB = {"cpu": 0.3, "gpu": 4.0}
DEFAULT_SHARD_BYTES = 4 * 2**30


@dataclass(frozen=True)
class StepMemory:
    step: str
    host: float  # GiB per rank, at the step's peak (the busiest rank)
    gpu: float  # GiB per GPU (0 on CPU runs: everything is in ``host``)

    def describe(self) -> str:
        return f"{self.step}: host RAM {self.host:.1f} GiB/rank, GPU {self.gpu:.1f} GiB/GPU"


def _largest_tensor(config: MistralConfig) -> int:
    """Elements of the largest HF tensor: the embedding or one FFN projection."""
    return max(config.vocab_size, config.ffn_hidden_size) * config.hidden_size


def _split(on_gpu: bool, host: float, device: float, step: str, runtime: float | None) -> StepMemory:
    base = HOST_RUNTIME_GIB["gpu" if on_gpu else "cpu"] if runtime is None else runtime
    if on_gpu:
        return StepMemory(step, base + host / GIB, device / GIB)
    return StepMemory(step, base + (host + device) / GIB, 0.0)


def load_memory(config: MistralConfig, parallel: ParallelConfig, file_bytes: int, dtype_bytes: int, on_gpu: bool = True,
                runtime: float | None = None) -> StepMemory:
    """``load_model`` from an HF directory: every rank reads its TP/PP slices into one dict of local megatron tensors
    (file dtype) before copying them into the model; one whole HF tensor and its fused copy are in flight."""
    local = config.num_parameters() / (parallel.tp * parallel.pp)
    host = local * file_bytes + 2 * _largest_tensor(config) * file_bytes
    return _split(on_gpu, host, local * dtype_bytes, "load", runtime)


def export_memory(config: MistralConfig, parallel: ParallelConfig, dtype_bytes: int, on_gpu: bool = True,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, runtime: float | None = None) -> StepMemory:
    """``export_hf``: rank 0 holds one safetensors shard (``save_file`` writes from the tensors' memory) plus one
    mapping row gathered from the TP ranks, concatenated and unfused; the model stays where it is."""
    local = config.num_parameters() / (parallel.tp * parallel.pp)
    shard = min(max_shard_bytes, config.num_parameters() * dtype_bytes)
    host = shard + 3 * _largest_tensor(config) * dtype_bytes
    return _split(on_gpu, host, local * dtype_bytes, "export", runtime)


def _activations(config: MistralConfig, parallel: ParallelConfig, seq_len: int, micro_batch_size: int,
                 dtype_bytes: int, flash: bool) -> float:
    """One forward without gradients: a few [s, b, h] tensors, fp32 logits of this rank's vocabulary shard and, for
    the local spec (no flash attention), one layer's attention scores."""
    tokens = seq_len * micro_batch_size
    scores = 0 if flash else 2 * micro_batch_size * config.num_attention_heads / parallel.tp * seq_len ** 2 * 4
    return 8 * tokens * config.hidden_size * dtype_bytes + 2 * tokens * config.vocab_size / parallel.tp * 4 + scores


def prune_memory(parent: MistralConfig, child: MistralConfig, parallel: ParallelConfig, source_bytes: int,
                 dtype_bytes: int, seq_len: int, micro_batch_size: int, on_gpu: bool = True,
                 runtime: float | None = None) -> StepMemory:
    """``run_prune_stage`` on TP slices (``prune/shards.py``), at the busiest rank (global rank 0).

    Host: the parent's slice, then the largest of (a) the rotation: folded readers + output layer and the rotated
    copy, fp64 products (on the device on GPUs); (b) the PCA on rank 0: the [L, 2, h, h] fp64 moments twice (the
    per-site means beside them); (c) a calibration forward: the moments on the device plus the model.
    """
    tp = parallel.tp
    kept_layers = child.num_layers
    h, f, q, kv = parent.hidden_size, parent.ffn_hidden_size, parent.num_attention_heads, parent.num_kv_heads
    readers = kept_layers * h * parent.head_dim * (q + 2 * kv) + 2 * kept_layers * f * h + parent.vocab_size * h
    rotated_config = parent.replace(num_layers=kept_layers, hidden_size=child.hidden_size, tie_embeddings=False)
    rotated = rotated_config.num_parameters()
    slice_bytes = parent.num_parameters() / tp * source_bytes
    products = 3 * _largest_tensor(parent) / tp * 8
    moments = 8 * h * h * (2 * kept_layers + 1)
    model = parent.num_parameters() / tp * dtype_bytes
    activations = _activations(parent, parallel, seq_len, micro_batch_size, dtype_bytes, flash=on_gpu)
    rotation = (readers + rotated) / tp * source_bytes + (0 if on_gpu else products)
    host = slice_bytes + max(rotation + moments / 2, moments)  # the site means are freed before the rotation
    device = model + moments + activations + (products if on_gpu else 0)
    if on_gpu:
        return _split(True, host, device, "prune", runtime)
    cpu_host = slice_bytes + max(rotation + moments / 2, moments, model + moments / 2 + activations)
    return _split(False, cpu_host, 0, "prune", runtime)


def distill_memory(student: MistralConfig, teacher: MistralConfig, parallel: ParallelConfig, data_parallel: int,
                   seq_len: int, micro_batch_size: int, microbatches: int, file_bytes: int = 2,
                   runtime: float | None = None, chunk_tokens: int = KLOptions.chunk_tokens) -> StepMemory:
    """A distillation stage on GPUs: the GPU side is ``estimate_memory``; the host holds what loading the larger
    of the two models keeps in flight."""
    gpu = estimate_memory(student, teacher, parallel, data_parallel, seq_len, micro_batch_size, microbatches,
                          chunk_tokens=chunk_tokens).total
    larger = max(student, teacher, key=MistralConfig.num_parameters)
    loading = load_memory(larger, parallel, file_bytes, 2, True, runtime)
    return StepMemory("distill", loading.host, gpu)


def stage_memory(stage: str, parent: MistralConfig, child: MistralConfig, parallel: ParallelConfig,
                 data_parallel: int = 1, seq_len: int = 4096, micro_batch_size: int = 1, microbatches: int = 1,
                 dtype_bytes: int = 2, source_bytes: int = 2,
                 chunk_tokens: int = KLOptions.chunk_tokens) -> list[StepMemory]:
    """The steps of one cascade stage on GPUs, for ``recipes.plan`` (one ``describe()`` line each): pruning reads the
    parent's slices, prunes and exports the child; a training stage loads, trains and exports."""
    if stage == "prune":
        return [load_memory(parent, parallel, source_bytes, dtype_bytes),
                prune_memory(parent, child, parallel, source_bytes, dtype_bytes, seq_len, micro_batch_size),
                export_memory(child, parallel, dtype_bytes)]
    return [distill_memory(child, parent, parallel, data_parallel, seq_len, micro_batch_size, microbatches,
                           source_bytes, chunk_tokens=chunk_tokens),
            export_memory(child, parallel, dtype_bytes)]
