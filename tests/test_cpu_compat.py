"""One test per CPU patch of megatron-core (nemo_plugins.cpu_compat): an upgrade that moves a call fails here."""

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_plugins import cpu_compat
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.model.builder import build_model
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the patches are inactive where CUDA exists")


@pytest.mark.parametrize("module_name", sorted(cpu_compat.PATCHED_MODULES))
def test_module_sees_cpu_torch(module_name):
    module = importlib.import_module(module_name)
    assert module.torch.cuda.current_device() == torch.device("cpu")
    assert module.torch.zeros(2, device="cuda").device.type == "cpu"
    assert module.torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"


def test_rotary_embedding_on_cpu():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=False)
    assert emb(8).device.type == "cpu"


def test_yarn_embedding_on_cpu():
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    emb = YarnRotaryEmbedding(kv_channels=16, scaling_factor=4.0, original_max_position_embeddings=8,
                              use_cpu_initialization=True)
    freqs, _ = emb(32)
    assert freqs.device.type == "cpu" and freqs.shape[0] == 32


def test_default_causal_mask_on_cpu():
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))


def test_global_memory_buffer_on_cpu():
    from megatron.core.utils import GlobalMemoryBuffer

    assert GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "test").device.type == "cpu"


def test_rng_tracker_forks_the_cpu_generator():
    tensor_parallel.model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
    with tracker.fork():
        second = torch.rand(3)
    assert not torch.equal(first, second), "the tracked state must advance between forks"
    tensor_parallel.model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), first), "the same seed must reproduce the tracked stream"


def _train_step(clip_grad: float, dtype: torch.dtype = torch.float32, keep: dict | None = None):
    """Schedule (total_num_tokens), DDP grad buffers, optimizer (found_inf/loss scale), clip_grads, all on CPU;
    ``keep`` receives the model and the optimizer."""
    config = tiny_config()
    model = build_model(config, ParallelConfig(), dtype)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False), model)
    settings = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=clip_grad, use_distributed_optimizer=False,
                               bf16=dtype == torch.bfloat16, params_dtype=dtype)
    optimizer = get_megatron_optimizer(settings, [ddp])
    if keep is not None:
        keep.update(model=model, optimizer=optimizer)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    positions = torch.arange(16).expand(2, -1)

    def forward_step(_data, chunk):
        logits = chunk(tokens, positions)

        def loss_func(output):
            loss = torch.nn.functional.cross_entropy(output.float().flatten(0, 1), tokens.flatten())
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[ddp],
        num_microbatches=1,
        seq_length=16,
        micro_batch_size=2,
        forward_only=False,
    )
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    success, grad_norm, _ = optimizer.step()
    moved = max((p.detach() - before[k]).abs().max().item() for k, p in model.named_parameters())
    return losses, success, grad_norm, moved


def test_training_step_with_grad_clipping_on_cpu():
    losses, success, grad_norm, moved = _train_step(clip_grad=1e-3)
    assert success and grad_norm > 1e-3  # the clip path ran (coefficient < 1)
    assert torch.isfinite(losses[0]["loss"])
    assert moved > 0


def test_a_bf16_model_trains_and_checkpoints_under_megatrons_mixed_precision_optimizer():
    """megatron's mixed-precision optimizer (a bf16 run without the distributed optimizer) sorts parameters by their
    CUDA type names; on CPU the patch gives it those names. Every parameter, the local spec's norms included (built
    fp32 whatever params_dtype says), must land in its bf16 groups with an fp32 main copy: a parameter left in the
    fp32 groups is one its checkpoint cannot map to the model's (the optimizer's sharded state dict fails)."""
    kept: dict = {}
    losses, success, _, moved = _train_step(clip_grad=1.0, dtype=torch.bfloat16, keep=kept)
    model, optimizer = kept["model"], kept["optimizer"]
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    assert [type(o).__name__ for o in inner] == ["Float16OptimizerWithFloat16Params"]
    bf16 = [p for o in inner for group in o.float16_groups for p in group]
    assert len(bf16) == len(list(model.parameters())) and all(p.dtype == torch.bfloat16 for p in bf16)
    assert not [p for o in inner for group in o.fp32_from_fp32_groups for p in group]
    assert all(p.main_param.dtype == torch.float32 for p in bf16)
    assert success and moved > 0 and torch.isfinite(losses[0]["loss"])
    state = optimizer.sharded_state_dict(model.sharded_state_dict())
    assert state, "the optimizer's checkpoint state maps onto the model's"
    assert torch.Tensor.type(torch.zeros(1, dtype=torch.bfloat16)) == "torch.BFloat16Tensor", "patch left on"


def test_distributed_optimizer_falls_back_on_cpu(caplog):
    assert cpu_compat.use_distributed_optimizer_allowed() is False
    with caplog.at_level("WARNING", logger="nemo_plugins.cpu_compat"):
        assert cpu_compat.resolve_distributed_optimizer(True) is False
    assert "plain megatron optimizer" in caplog.text
    assert cpu_compat.resolve_distributed_optimizer(False) is False


def test_patches_stay_off_where_cuda_exists(monkeypatch):
    monkeypatch.setattr(cpu_compat, "cuda_available", lambda: True)
    assert cpu_compat.install() is False


INSTALL_TWICE = r"""
import json, sys
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.optimizer import clip_grads
from megatron.core.tensor_parallel import random
from nemo_plugins import cpu_compat

def seen():
    modules = {name: id(sys.modules[name].torch) for name in cpu_compat.PATCHED_MODULES if name in sys.modules}
    return {"modules": modules, "setup": id(LanguageModule.setup_embeddings_and_output_layer),
            "clip": id(clip_grads.clip_grad_by_total_norm_fp32), "rng": id(random._get_cuda_rng_state)}

before = seen()
assert cpu_compat.install() is True
once = seen()
assert cpu_compat.install() is True
print(json.dumps({"before": before, "once": once, "twice": seen()}))
"""


def test_install_twice_is_install_once():
    """A second ``install()`` patches nothing again (a double wrap would nest the tied-embedding hook)."""
    out = subprocess.run([sys.executable, "-c", INSTALL_TWICE], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["once"] == seen["twice"]
    assert seen["once"]["setup"] != seen["before"]["setup"] and seen["once"]["rng"] != seen["before"]["rng"]
    assert set(seen["once"]["modules"]) == set(cpu_compat.PATCHED_MODULES)


def test_initialize_refuses_a_cpu_machine_without_the_compat(monkeypatch):
    """``initialize()`` installs nothing itself: an entry point that forgot ``install()`` hears so at once."""
    monkeypatch.setattr(cpu_compat, "_installed", False)
    with pytest.raises(RuntimeError, match=r"cpu_compat\.install\(\)"):
        initialize(ParallelConfig())


def test_forward_backward_of_two_layer_model_runs_in_seconds():
    model = build_model(tiny_config(hidden_size=256, ffn_hidden_size=512, head_dim=64), ParallelConfig())
    tokens = torch.randint(0, 128, (2, 128))
    start = time.perf_counter()
    model(tokens, torch.arange(128).expand(2, -1)).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    print(f"2-layer forward+backward: {time.perf_counter() - start:.3f}s")
