"""Per-rank slice loading and the streamed export.

Each TP rank reads only its slice of every HF tensor, and its shard equals the old path written plainly here (the
full fused TP=1 tensor, then that rank's chunk), bit for bit; a counting ``safe_open`` proves no rank reads more
bytes than its own parameters hold. The streamed export at TP=2 (from a transformers-saved Mistral3 directory) and
PP=2 (gloo) writes exactly the bytes the old whole-state writer gives (for a plain source: the source itself).
"""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_plugins.convert import hf_io
from nemo_plugins.convert.mapping import hf_to_megatron
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from tests import distributed_worker
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state


class CountingOpen:
    """``safe_open`` that adds up the bytes of every tensor (or slice of one) it hands out."""

    def __init__(self, real):
        self.real, self.bytes = real, 0

    def __call__(self, *args, **kwargs):
        return _CountingHandle(self.real(*args, **kwargs), self)


class _CountingHandle:
    def __init__(self, handle, counter):
        self.handle, self.counter = handle, counter

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name):
        return self._count(self.handle.get_tensor(name))

    def get_slice(self, name):
        return _CountingSlice(self.handle.get_slice(name), self)

    def _count(self, tensor):
        self.counter.bytes += tensor.numel() * tensor.element_size()
        return tensor


class _CountingSlice:
    def __init__(self, part, handle):
        self.part, self.handle = part, handle

    def get_shape(self):
        return self.part.get_shape()

    def __getitem__(self, index):
        return self.handle._count(self.part[index])


def naive_local(state: dict, config: MistralConfig, tp_rank: int, tp_size: int, layers: range, first: bool,
                last: bool) -> dict:
    """The old loading path, plainly: each full megatron tensor (fused at TP=1), then this rank's chunk."""
    groups, d, h = config.num_kv_heads, config.head_dim, config.hidden_size
    per_group = config.num_attention_heads // groups * d

    def chunk(tensor, dim=0):
        return torch.chunk(tensor, tp_size, dim=dim)[tp_rank]

    out = {}
    if first:
        out["embedding.word_embeddings.weight"] = chunk(state["model.embed_tokens.weight"])
    for local, layer in enumerate(layers):
        hf, meg = f"model.layers.{layer}.", f"decoder.layers.{local}."
        q = state[hf + "self_attn.q_proj.weight"].reshape(groups, per_group, h)
        k = state[hf + "self_attn.k_proj.weight"].reshape(groups, d, h)
        v = state[hf + "self_attn.v_proj.weight"].reshape(groups, d, h)
        out[meg + "self_attention.linear_qkv.weight"] = chunk(torch.cat([q, k, v], dim=1).reshape(-1, h))
        out[meg + "self_attention.linear_proj.weight"] = chunk(state[hf + "self_attn.o_proj.weight"], 1)
        out[meg + "input_layernorm.weight"] = state[hf + "input_layernorm.weight"]
        out[meg + "pre_mlp_layernorm.weight"] = state[hf + "post_attention_layernorm.weight"]
        out[meg + "mlp.linear_fc1.weight"] = torch.cat([chunk(state[hf + "mlp.gate_proj.weight"]),
                                                        chunk(state[hf + "mlp.up_proj.weight"])])
        out[meg + "mlp.linear_fc2.weight"] = chunk(state[hf + "mlp.down_proj.weight"], 1)
    if last:
        out["decoder.final_layernorm.weight"] = state["model.norm.weight"]
        if not (config.tie_embeddings and first):
            out["output_layer.weight"] = chunk(state["model.embed_tokens.weight" if config.tie_embeddings
                                                     else "lm_head.weight"])
    return out


def hf_dir(tmp_path, config, max_shard_bytes=30_000):
    """A sharded HF directory (several files: the reader maps names to files) and its tensors."""
    state = hf_state(hf_model(config))
    return hf_io.write_model_dir(state, config, tmp_path / "src", max_shard_bytes=max_shard_bytes), state


WIDE = dict(num_attention_heads=8, num_kv_heads=4, head_dim=8)  # four query groups: TP=4 holds one each


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_each_rank_reads_exactly_its_slice(tmp_path, monkeypatch, tp, tied):
    config = tiny_config(tie_embeddings=tied, **WIDE)
    src, state = hf_dir(tmp_path, config)
    assert len(hf_io.shard_files(src)) > 2
    for rank in range(tp):
        counter = CountingOpen(hf_io.safe_open)
        monkeypatch.setattr(hf_io, "safe_open", counter)
        local = hf_to_megatron(hf_io.HFReader(src), config, tp_rank=rank, tp_size=tp)
        monkeypatch.undo()
        expected = naive_local(state, config, rank, tp, range(config.num_layers), True, True)
        assert sorted(local) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(local[name], tensor), name
        assert counter.bytes == sum(t.numel() * t.element_size() for t in local.values()), "read only the slices"


def test_a_column_split_over_a_size_tp_does_not_divide_is_named(tmp_path):
    config = tiny_config(vocab_size=126)
    src, _ = hf_dir(tmp_path, config)
    with pytest.raises(ConfigError, match=r"model\.embed_tokens\.weight.*126.*parallel\.tp=4"):
        hf_to_megatron(hf_io.HFReader(src), config, tp_rank=0, tp_size=4)


# ---------------------------------------------------------------------------------------- 2 processes (gloo)
def load_and_export(src: str, out: str, result: str, tp: int, pp: int, max_shard_bytes: int) -> None:
    """Worker: load ``src`` at (tp, pp) counting the bytes read, then stream it back out to ``out``."""
    from nemo_plugins.convert.model_io import _weights, export_hf, local_layers
    from nemo_plugins.convert.sources import ModelSource, load_model
    from nemo_plugins.distributed import ParallelConfig, initialize

    parallel = ParallelConfig(tp=tp, pp=pp)
    initialize(parallel)
    counter = CountingOpen(hf_io.safe_open)
    hf_io.safe_open = counter  # this worker process is the test's own
    config, model = load_model(ModelSource.parse(f"hf:{src}"), parallel)
    hf_io.safe_open = counter.real
    local = {name: tensor.clone() for name, tensor in _weights(model).items()}
    layers = local_layers(model)
    export_hf(model, config, out, max_shard_bytes=max_shard_bytes)
    torch.save({"bytes": counter.bytes, "local": local, "layers": (layers.start, layers.stop),
                "first": model.pre_process, "last": model.post_process}, f"{result}.{dist.get_rank()}")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mistral3_dir(tmp_path, config):
    """A transformers-saved Mistral3ForConditionalGeneration (language_model.* names, vision part, several files)."""
    from tests.test_mistral3_source import mistral3_model

    src = tmp_path / "mistral3"
    mistral3_model(config).save_pretrained(src, max_shard_size="40KB")
    return src, hf_io.read_state(src)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,tied", [(2, 1, False), (1, 2, True)], ids=["tp2-mistral3", "pp2-tied"])
def test_parallel_load_reads_slices_and_streamed_export_is_bit_identical(tmp_path, tp, pp, tied):
    """The export's reference is the old writer given the full state (for the plain source: the source itself)."""
    config = tiny_config(tie_embeddings=tied, num_layers=4)
    max_shard_bytes = 30_000
    src, state = mistral3_dir(tmp_path, config) if tp == 2 else hf_dir(tmp_path, config, max_shard_bytes)
    assert len(hf_io.shard_files(src)) > 2
    reference = hf_io.write_model_dir(state, config, tmp_path / "reference", max_shard_bytes)
    out, result = tmp_path / "export", tmp_path / "result"
    mp.spawn(distributed_worker.run, nprocs=2, join=True,
             args=(2, _port(), load_and_export, (str(src), str(out), str(result), tp, pp, max_shard_bytes)))
    for rank in range(2):
        got = torch.load(f"{result}.{rank}")
        expected = naive_local(state, config, rank % tp, tp, range(*got["layers"]), got["first"], got["last"])
        assert sorted(got["local"]) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(got["local"][name], tensor), name
        assert got["bytes"] == sum(t.numel() * t.element_size() for t in expected.values()), f"rank {rank} read more"
    assert len(hf_io.shard_files(out)) > 2
    assert _files(out) == _files(reference), "the streamed export writes the old writer's bytes"


def test_a_bf16_model_exports_in_one_dtype_with_its_fp32_norms_cast(tmp_path):
    """A bf16 model whose norm weights are fp32 (megatron's local spec builds them so; ``build_model`` casts them, a
    model from elsewhere may not) exports all bf16."""
    from nemo_plugins.convert.model_io import export_hf, load_hf_state
    from nemo_plugins.distributed import ParallelConfig
    from nemo_plugins.model.builder import build_model

    config = tiny_config()
    src, state = hf_dir(tmp_path, config)
    model = build_model(config, ParallelConfig(), torch.bfloat16)
    for name, param in model.named_parameters():
        if "layernorm" in name:
            param.data = param.data.float()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}, "the planted mix of dtypes"
    load_hf_state(model, hf_io.HFReader(src), config)
    exported = hf_io.read_state(export_hf(model, config, tmp_path / "out"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
