"""TP=2 gives TP=1's image + text logits, loss and projector gradients on 2 gloo processes, and the replicated
projector's gradients are identical on both TP ranks (so no TP all-reduce of them is needed). Sequence parallelism
needs Transformer Engine's norms (megatron's local spec refuses it), so its scatter is exercised on GPUs only."""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from nemo_plugins.convert.sources import ModelSource
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.vision.checkpoint import load_vision_language_model
from tests.test_distributed import _spawn
from tests.test_mistral3_source import TEXT, mistral3_model, save
from tests.test_vision import images_and_tokens

pytestmark = pytest.mark.distributed


def logits_loss_grads(model, tokens, images):
    """Gathered logits, per-token loss and the projector's gradients of the summed loss."""
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    model.eval()
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(model(tokens, positions, images=images))
    loss = model(tokens, positions, labels=tokens.roll(-1, dims=1), images=images)
    loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.multi_modal_projector.named_parameters()}
    return logits, loss.detach(), grads


def tp_worker(path: str, out: str, tp: int) -> None:
    initialize(ParallelConfig(tp=tp))
    _, vision, model = load_vision_language_model(ModelSource.parse(f"hf:{path}"), ParallelConfig(tp=tp))
    tokens, images = images_and_tokens(vision)
    tokens = torch.cat([tokens, tokens.flip(1)])  # two rows, images in both (second row's in reverse order)
    logits, loss, grads = logits_loss_grads(model, tokens, images + images[::-1])
    group = parallel_state.get_tensor_model_parallel_group()
    per_rank = {}
    for name, grad in grads.items():
        gathered = [torch.empty_like(grad) for _ in range(tp)]
        dist.all_gather(gathered, grad, group=group)
        per_rank[name] = gathered
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "loss": loss, "grads": per_rank}, out)


def test_tensor_parallel_2_equals_1_with_images(tmp_path):
    path = save(mistral3_model(TEXT["mistral"]), tmp_path / "m3")
    _, vision, single = load_vision_language_model(ModelSource.parse(f"hf:{path}"), ParallelConfig())
    tokens, images = images_and_tokens(vision)
    tokens = torch.cat([tokens, tokens.flip(1)])
    logits, loss, grads = logits_loss_grads(single, tokens, images + images[::-1])
    _spawn(tp_worker, str(path), str(tmp_path / "tp2.pt"), 2)
    result = torch.load(tmp_path / "tp2.pt")
    assert (result["logits"] - logits).abs().max().item() <= 1e-5
    assert (result["loss"] - loss).abs().max().item() <= 1e-5
    for name, (rank0, rank1) in result["grads"].items():
        assert torch.equal(rank0, rank1), f"{name}: the replicated projector's TP ranks disagree"
        torch.testing.assert_close(rank0, grads[name], rtol=1e-4, atol=1e-6, msg=name)
