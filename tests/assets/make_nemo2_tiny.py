"""Write ``tests/assets/nemo2_tiny``: a tiny NeMo 2 checkpoint made by NeMo itself, with NeMo's own logits.

Run by hand, once, in a throw-away venv that has NeMo (never by the suite; NeMo is no dependency of cascade):

    ~/.pyenv/versions/3.11.7/bin/python3.11 -m venv /tmp/nemo-venv   # not 3.11.2: see nemo2_tiny/README.md
    /tmp/nemo-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl megatron-core==0.16.1
    /tmp/nemo-venv/bin/pip install -c constraints.txt "nemo_toolkit[nlp,run]==2.7.3"
        # constraints: pyarrow<23, protobuf~=5.29.5, packaging<25, leptonai<0.47
    /tmp/nemo-venv/bin/python tests/assets/make_nemo2_tiny.py

What it does: a tiny random ``LlamaForCausalLM`` (transformers) with a 128-token BPE tokenizer is imported by
NeMo's own HF importer (``HFLlamaImporter``) and saved by NeMo's own writer (``nemo_save``: ``context/`` +
``weights/``). NeMo's logits for a fixed prompt (its token ids and NeMo's logits), computed by the model NeMo
holds as it saves, go to ``reference.safetensors``; the script prints how far they are from transformers' logits
of the source model.

Three things NeMo 2.7.3 needs on a CPU machine without Transformer Engine, each the smallest change that lets it run:
* its Llama config enables TE-only fusions (``apply_rope_fusion``, ``persist_layer_norm``) that megatron-core
  refuses without TE: the importer's config is built with those two off (numerics unchanged);
* megatron-core 0.16 has no ``dist_checkpointing.strategies.tensorstore`` module, which NeMo imports: an empty
  stand-in module is registered (only its load path would use it; this script only saves);
* the importer maps HF's per-layer RMSNorm weights onto TE names (``linear_qkv.layer_norm_weight``) that the local
  spec lacks, and leaves them at 1.0 with a warning: after NeMo's conversion the script copies them into the local
  spec's ``input_layernorm`` / ``pre_mlp_layernorm``, so the saved checkpoint holds the HF model's norms (random,
  far from 1.0, so a reader that dropped them would fail the test) and NeMo's logits equal transformers'.
The CPU compatibility of this project (``nemo_plugins.cpu_compat``) is installed for megatron's CUDA-only calls.
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "nemo2_tiny"
PROMPT = "The for statement iterates over the items of a sequence."
SHAPES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5)


def _tensorstore_stand_in() -> None:
    import megatron.core.dist_checkpointing.strategies as strategies

    stand_in = types.ModuleType("megatron.core.dist_checkpointing.strategies.tensorstore")
    sys.modules[stand_in.__name__] = stand_in
    strategies.tensorstore = stand_in


def _write_hf_model(hf_dir: Path):
    """A random Llama with a 128-token BPE tokenizer trained on the stdlib's reference-manual topics."""
    import pydoc_data.topics

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    text = "\n".join(pydoc_data.topics.topics.values())[:20000].splitlines()
    trainer = trainers.BpeTrainer(vocab_size=SHAPES["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(hf_dir)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.5 * torch.randn_like(param))
    model.save_pretrained(hf_dir)
    return model.eval()


def _importer_config(importer):
    """The importer's own LlamaConfig, built with the two TE-only fusions off."""
    import nemo.collections.llm.gpt.model.llama as llama

    real = llama.LlamaConfig
    llama.LlamaConfig = functools.partial(real, apply_rope_fusion=False, persist_layer_norm=False)
    try:
        return importer.config
    finally:
        llama.LlamaConfig = real


def _copy_layer_norms(hf_model, nemo_model) -> None:
    import torch

    with torch.no_grad():
        for i, layer in enumerate(nemo_model.module.decoder.layers):
            hf_layer = hf_model.model.layers[i]
            layer.input_layernorm.weight.copy_(hf_layer.input_layernorm.weight)
            layer.pre_mlp_layernorm.weight.copy_(hf_layer.post_attention_layernorm.weight)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    _tensorstore_stand_in()
    from nemo_plugins import cpu_compat

    cpu_compat.install()
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from nemo.collections.llm.gpt.model.llama import HFLlamaImporter, LlamaModel
    from safetensors.torch import save_file

    shutil.rmtree(OUT, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        hf_model = _write_hf_model(hf_dir)
        importer = HFLlamaImporter(str(hf_dir))
        tokenizer = importer.tokenizer
        nemo_model = LlamaModel(_importer_config(importer), tokenizer=tokenizer)
        trainer = importer.nemo_setup(nemo_model, ckpt_async_save=False)
        importer.convert_state(hf_model, nemo_model)
        _copy_layer_norms(hf_model, nemo_model)
        importer.nemo_save(OUT, trainer)
        model_parallel_cuda_manual_seed(0)  # megatron's attention forks its model-parallel RNG even without dropout
        ids = torch.tensor([tokenizer.text_to_ids(PROMPT)])
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        with torch.no_grad():
            nemo_logits = nemo_model.eval()(ids, positions).float()
            hf_logits = hf_model(ids).logits.float()
    print(f"prompt: {ids.shape[1]} tokens; |NeMo - transformers| max = {(nemo_logits - hf_logits).abs().max():.3g}")
    save_file({"input_ids": ids, "nemo_logits": nemo_logits.contiguous()}, OUT / "reference.safetensors",
              metadata={"prompt": PROMPT})


if __name__ == "__main__":  # NeMo's writer spawns helpers that re-import this file
    main()
