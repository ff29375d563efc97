"""The per-step memory model at the paper's shapes: the 24B cascade fits an 8-GPU node per rank.

Targets (issue 13): host RAM <= 1.5 x (parent bytes / TP) + 8 GB for loading and export, <= 64 GB for pruning.
The model itself is checked against measured peaks by bench/memory.py.
"""

import pytest
import yaml

from nemo_plugins.cascade.memory import GIB, export_memory, load_memory, prune_memory, stage_memory
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.model.config import MistralConfig
from recipes._entry import CONF_DIR

TP8 = ParallelConfig(tp=8)


def model(name: str) -> MistralConfig:
    node = yaml.safe_load(open(f"{CONF_DIR}/model/{name}.yaml"))
    return MistralConfig.from_dict(node.get("architecture", node))


PARENT, C14, C8, C3 = (model(n) for n in ("mistral_small_3_1_24b", "ministral3_14b", "ministral3_8b", "ministral3_3b"))


def test_24b_loading_and_export_fit_the_per_rank_target():
    limit = 1.5 * PARENT.num_parameters() * 2 / TP8.tp / GIB + 8e9 / GIB
    for step in (load_memory(PARENT, TP8, 2, 2), export_memory(PARENT, TP8, 2)):
        assert step.host <= limit, (step.describe(), limit)
        assert 0 < step.gpu < 80


@pytest.mark.parametrize("parent, child, source_bytes", [(PARENT, C14, 2), (C14, C8, 4), (C8, C3, 4)])
def test_every_prune_of_the_cascade_fits_64_gb_per_rank(parent, child, source_bytes):
    step = prune_memory(parent, child, TP8, source_bytes, 2, 16384, 1)
    assert step.host <= 64e9 / GIB, step.describe()
    assert step.gpu < 80, step.describe()


def test_pruning_memory_is_per_slice_not_per_model():
    """Holding the whole model on every rank (what pruning did) would not shrink with TP; slices do."""
    one, eight = (prune_memory(PARENT, C14, ParallelConfig(tp=tp), 2, 2, 16384, 1) for tp in (1, 8))
    moments = 8 * PARENT.hidden_size ** 2 * (2 * C14.num_layers + 1) / GIB
    assert eight.host - moments < (one.host - moments) / 4


def test_plan_lines_name_host_and_gpu_memory_per_stage():
    lines = [s.describe() for s in stage_memory("prune", PARENT, C14, TP8, seq_len=16384)]
    lines += [s.describe() for s in stage_memory("distill_short", PARENT, C14,
                                                 ParallelConfig(tp=8, sequence_parallel=True),
                                                 data_parallel=8, seq_len=16384, microbatches=32)]
    assert [line.split(":")[0] for line in lines] == ["load", "prune", "export", "distill", "export"]
    for line in lines:
        assert " GiB/rank, GPU " in line and line.endswith(" GiB/GPU"), line
