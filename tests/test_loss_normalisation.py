"""The distillation gradient is the mean over every target token of the global batch, whatever the number of
targets in each micro-batch, DP rank and CP rank: against autograd on a naive full-batch loss."""

import pytest
import torch
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig

from nemo_plugins.distill.kl_loss import KLOptions, naive_kl_loss
from nemo_plugins.distill.step import DistillationStep, use_per_token_loss
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.model.builder import build_model
from nemo_plugins.train.config import TrainSettings
from nemo_plugins.train.optimizer import wrap_for_training
from tests.conftest import tiny_config
from tests.test_distributed import _spawn

TEACHER, STUDENT = tiny_config(), tiny_config(hidden_size=32, ffn_hidden_size=64)
ROWS, SEQ, VOCAB = 4, 16, 128
TARGETS_PER_ROW = (2, 13, 5, 9)  # unequal on purpose: SFT masks


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    positions = torch.arange(SEQ).expand(ROWS, -1).contiguous()
    target_mask = torch.zeros(ROWS, SEQ)
    for row, count in enumerate(TARGETS_PER_ROW):
        target_mask[row, torch.randperm(SEQ - 1, generator=g)[:count]] = 1.0  # never the last position
    return tokens, positions, target_mask


def _step(student, teacher, batch, micro_batch_size: int, dp: int = 1) -> tuple[float, dict[str, torch.Tensor]]:
    """One distillation step; the loss it reports and the gradients megatron leaves after finalisation."""
    use_per_token_loss(student)
    ddp, _ = wrap_for_training(student)
    ddp.zero_grad_buffer()
    train = TrainSettings(seq_len=SEQ, micro_batch_size=micro_batch_size, global_batch_size=ROWS,
                          train_tokens=ROWS * SEQ)
    loss = DistillationStep(teacher, KLOptions(chunk_tokens=8), train)(ddp, batch)
    return loss, {name: p.main_grad.detach().clone() for name, p in student.named_parameters()}


def _naive(student, teacher_model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The textbook loss on full logits of all rows at once: sum of masked KL / number of targets."""
    tokens, positions, target_mask = batch
    mask = target_mask.clone()
    mask[:, -1] = 0.0
    with torch.no_grad():
        teacher_logits = teacher_model(tokens, positions).float()
    student.zero_grad()
    loss = naive_kl_loss(student(tokens, positions).float().reshape(-1, VOCAB), teacher_logits.reshape(-1, VOCAB),
                         mask.reshape(-1))
    loss.backward()
    return loss.item(), {name: p.grad.detach().clone() for name, p in student.named_parameters()}


def _models():
    torch.manual_seed(0)
    teacher_model = build_model(TEACHER, ParallelConfig())
    student = build_model(STUDENT, ParallelConfig())
    copies = [build_model(STUDENT, ParallelConfig()) for _ in range(2)]
    for copy in copies:
        copy.load_state_dict(student.state_dict())
    return teacher_model, student, copies


def _assert_close(grads, reference):
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, reference[name], rtol=1e-4, atol=1e-7), \
            (name, (grad - reference[name]).abs().max().item(), reference[name].abs().max().item())


def test_micro_batches_with_unequal_target_counts_give_the_full_batch_gradient():
    """4 micro-batches of 1 row (2, 13, 5, 9 targets) == 1 micro-batch of 4 rows == autograd on the naive loss.
    A per-micro-batch mean would weight the row with 2 targets like the one with 13."""
    teacher_model, student, (one_row, four_rows) = _models()
    teacher, batch = Teacher(teacher_model), _batch()
    expected_loss, expected = _naive(student, teacher_model, batch)
    for model, rows in ((one_row, 1), (four_rows, ROWS)):
        loss, grads = _step(model, teacher, batch, micro_batch_size=rows)
        assert loss == pytest.approx(expected_loss, rel=1e-5), rows
        _assert_close(grads, expected)


def test_the_step_refuses_a_model_wrapped_before_per_token_loss_was_set():
    """DDP fixes its gradient scaling at construction: a model wrapped first would average over DP as well."""
    student = build_model(STUDENT, ParallelConfig())
    ddp, _ = wrap_for_training(student)
    train = TrainSettings(seq_len=SEQ, micro_batch_size=2, global_batch_size=ROWS, train_tokens=ROWS * SEQ)
    with pytest.raises(RuntimeError, match="use_per_token_loss"):
        DistillationStep(Teacher(build_model(TEACHER, ParallelConfig())), KLOptions(), train)(ddp, _batch())


class TokenwiseLM(torch.nn.Module):
    """A language model whose tokens never interact (embedding -> tanh(linear)): a CP rank's slice of a row gives
    exactly those tokens' outputs without context-parallel attention (which needs Transformer Engine), so CP=2
    exercises megatron's schedule, DDP and ``finalize_model_grads`` over a real CP group on gloo."""

    model_type = ModelType.encoder_or_decoder

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1)
        self.embedding = torch.nn.Embedding(VOCAB, hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Parameter(torch.randn(VOCAB, hidden) * 0.5)

    def set_input_tensor(self, _tensor) -> None:
        """Pipeline hook megatron's schedule calls; one stage here."""

    def output_weight(self) -> torch.Tensor:
        return self.out

    def forward(self, tokens, positions, labels=None, return_hidden: bool = False) -> torch.Tensor:
        hidden = torch.tanh(self.proj(self.embedding(tokens))).transpose(0, 1)  # [s, b, h]
        return hidden if return_hidden else (hidden @ self.out.T).transpose(0, 1)


def layouts_worker(states_path: str, out_path: str) -> None:
    """DP=2 with the tiny Mistral, then CP=2 with ``TokenwiseLM``; rank 0 saves each loss and gradients."""
    import torch.distributed as dist

    states, batch = torch.load(states_path)
    results = {}
    initialize(ParallelConfig())  # world 2: DP=2, each rank two rows as two micro-batches
    teacher_model, student = build_model(TEACHER, ParallelConfig()), build_model(STUDENT, ParallelConfig())
    teacher_model.load_state_dict(states["teacher"])
    student.load_state_dict(states["student"])
    results["dp"] = _step(student, Teacher(teacher_model), batch, micro_batch_size=1)
    initialize(ParallelConfig(cp=2))  # world 2: CP=2, each rank the zig-zag half of every row
    teacher_model, student = TokenwiseLM(), TokenwiseLM()
    teacher_model.load_state_dict(states["tokenwise_teacher"])
    student.load_state_dict(states["tokenwise_student"])
    results["cp"] = _step(student, Teacher(teacher_model), batch, micro_batch_size=2)
    if dist.get_rank() == 0:
        torch.save(results, out_path)


@pytest.mark.distributed
def test_data_and_context_parallel_steps_give_the_full_batch_gradient(tmp_path):
    """Rows with 2 and 13 targets on DP rank 0, 5 and 9 on rank 1; under CP each rank holds a different number
    of each row's targets. Both equal autograd on the naive loss of the whole batch."""
    teacher_model, student, _ = _models()
    torch.manual_seed(1)
    tokenwise_teacher, tokenwise_student = TokenwiseLM(), TokenwiseLM()
    batch = _batch()
    states = {"teacher": teacher_model.state_dict(), "student": student.state_dict(),
              "tokenwise_teacher": tokenwise_teacher.state_dict(), "tokenwise_student": tokenwise_student.state_dict()}
    torch.save((states, batch), tmp_path / "states.pt")
    _spawn(layouts_worker, str(tmp_path / "states.pt"), str(tmp_path / "out.pt"))
    results = torch.load(tmp_path / "out.pt")
    for layout, (reference_student, reference_teacher) in {"dp": (student, teacher_model),
                                                            "cp": (tokenwise_student, tokenwise_teacher)}.items():
        expected_loss, expected = _naive(reference_student, reference_teacher, batch)
        loss, grads = results[layout]
        assert loss == pytest.approx(expected_loss, rel=1e-5), layout
        _assert_close(grads, expected)
