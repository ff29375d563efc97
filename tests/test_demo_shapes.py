"""The demo's children step down from SmolLM2-135M the way the paper's models step down from Mistral Small 3.1:
every step's layer / hidden / FFN ratio within 2% of the paper's (read from conf/model), heads, kv heads and head_dim
kept, and every child tied like its tied parent."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_plugins.cascade.plan import ChildSpec
from nemo_plugins.model.config import MistralConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
PAPER = ("mistral_small_3_1_24b", "ministral3_14b", "ministral3_8b", "ministral3_3b")
DIMENSIONS = ("num_layers", "hidden_size", "ffn_hidden_size")


def model(name: str) -> MistralConfig:
    return MistralConfig.from_dict(OmegaConf.load(CONF / "model" / f"{name}.yaml").architecture)


def demo_chain() -> list[MistralConfig]:
    """The parent and each child as the cascade builds them (``CascadePlan.child_configs``: the model before it,
    reshaped)."""
    chain = [model("smollm2_135m")]
    for node in OmegaConf.load(CONF / "cascade" / "demo.yaml").cascade.children:
        child = ChildSpec(**OmegaConf.to_container(node))
        chain.append(chain[-1].replace(num_layers=child.num_layers, hidden_size=child.hidden_size,
                                       ffn_hidden_size=child.ffn_hidden_size, tie_embeddings=child.tie_embeddings))
    return chain


def step_ratios(chain: list[MistralConfig]) -> list[dict[str, float]]:
    return [{d: getattr(after, d) / getattr(before, d) for d in DIMENSIONS} for before, after in zip(chain, chain[1:])]


def test_the_paper_chain_is_the_one_method_md_describes():
    """The reference itself: 24B -> 14B halves only the FFN (40L/5120h/32768f -> 40L/5120h/16384f)."""
    assert step_ratios([model(name) for name in PAPER])[0] == {"num_layers": 1.0, "hidden_size": 1.0,
                                                                 "ffn_hidden_size": 0.5}


@pytest.mark.parametrize("step", range(len(PAPER) - 1))
def test_each_demo_step_matches_the_papers_step_within_two_percent(step):
    demo, paper = step_ratios(demo_chain()), step_ratios([model(name) for name in PAPER])
    assert len(demo) == len(paper)
    for dimension in DIMENSIONS:
        assert demo[step][dimension] == pytest.approx(paper[step][dimension], rel=0.02), (step, dimension)


def test_children_keep_the_parents_attention_shape_and_tied_embeddings():
    parent, *children = demo_chain()
    assert parent.tie_embeddings
    for child in children:
        assert (child.num_attention_heads, child.num_kv_heads, child.head_dim) == (9, 3, 64)
        assert child.tie_embeddings and child.vocab_size == parent.vocab_size
        assert child.num_parameters() < parent.num_parameters()
