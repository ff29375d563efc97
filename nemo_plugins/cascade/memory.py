"""Per-GPU memory estimate of a stage (student + teacher + optimizer + activations), for choosing layouts.

Assumptions, stated so the numbers can be checked: bf16 weights (2 B/param), fp32 gradient buffers (4 B),
Adam with fp32 main weights and moments (12 B) sharded over data x context parallel ranks by megatron's
distributed optimizer; parameters split evenly over TP x PP; activations of a transformer layer with flash
attention and sequence parallelism 34 x s x b x h bytes / TP (Korthikanti et al. 2022, selective
recomputation), s divided by CP, and under 1F1B the first pipeline stage holds PP micro-batches of L / PP
layers, i.e. L layers' worth; the teacher's final hidden states (bf16) for every micro-batch of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def total(self) -> float:
        return sum(vars(self).values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value:.1f}" for name, value in vars(self).items())
        return f"{self.total:.1f} GiB/GPU ({parts})"


def estimate_memory(student: MistralConfig, teacher: MistralConfig | None, parallel: ParallelConfig, data_parallel: int,
                    seq_len: int, micro_batch_size: int, microbatches: int, training: bool = True) -> MemoryEstimate:
    model_parallel = parallel.tp * parallel.pp
    student_params = student.num_parameters() / model_parallel
    sharding = data_parallel * parallel.cp
    tokens_per_rank = seq_len * micro_batch_size / parallel.cp
    activations = 34 * tokens_per_rank * student.hidden_size * student.num_layers / parallel.tp if training else 0.0
    return MemoryEstimate(
        student_weights=2 * student_params / GIB,
        gradients=(4 * student_params if training else 0.0) / GIB,
        optimizer=(12 * student_params / sharding if training else 0.0) / GIB,
        teacher_weights=(2 * teacher.num_parameters() / model_parallel if teacher else 0.0) / GIB,
        activations=activations / GIB,
        teacher_hidden=(2 * tokens_per_rank * teacher.hidden_size * microbatches if teacher else 0.0) / GIB,
    )
