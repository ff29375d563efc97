"""The launch plan of a cascade: per stage the parallel layout, a per-GPU memory estimate and the exact command
(on Slurm: one `srun` in the pyxis container + `torchrun` per stage, resumable; locally: `torchrun --standalone`).

    python -m recipes.plan cascade=ministral3                     # the table, with memory estimates
    python -m recipes.plan --commands cascade=ministral3          # what slurm/cascade.sbatch runs, one per line
    python -m recipes.plan --container-flags cascade=ministral3   # the pyxis flags of every step of the job

Rendezvous values come from the environment the sbatch script sets (MASTER_ADDR, SLURM_JOB_ID); container paths,
mounts and the storage overrides from `nemo_plugins.cascade.launch`.
"""

from __future__ import annotations

import argparse

from nemo_plugins.cascade.launch import (
    STORAGE_KEYS,
    ClusterConfig,
    ContainerStorage,
    StageLaunch,
    check_allocation,
    check_image,
    check_torchrun,
    container_flags,
    container_storage,
    stage_launch,
)
from nemo_plugins.cascade.memory import estimate_memory, stage_memory
from nemo_plugins.cascade.plan import plan_from_config
from nemo_plugins.config.schemas import CascadeConfig
from nemo_plugins.convert.sources import ModelSource, source_config
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from recipes._entry import compose_typed, project_errors


def parent_config(cfg: CascadeConfig) -> MistralConfig:
    if cfg.model.architecture is not None:
        return cfg.model.architecture
    if not cfg.model.source:
        raise ConfigError("model.source and model.architecture are both null: the plan needs the parent's shape")
    return source_config(ModelSource.parse(cfg.model.source))


def stage_nodes(cluster: ClusterConfig, stage: str) -> int:
    """Pruning runs at TP only (one node: its layout has no data parallelism to spread); distillation uses them all."""
    return 1 if stage == "prune" else cluster.nodes


def cluster_storage(cfg: CascadeConfig, overrides: list[str]) -> tuple[ClusterConfig, ContainerStorage | None]:
    """The cluster config and, on Slurm, where the job's outputs and caches go (None: this machine)."""
    cluster = cfg.cluster
    check_allocation(cluster)
    if cluster.kind == "local":
        return cluster, None
    check_image(cluster)
    check_torchrun()
    overridden = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    values = {key: str(_select(cfg, key)) for key in STORAGE_KEYS}
    return cluster, container_storage(cluster, values, overridden & set(STORAGE_KEYS))


def launch_lines(cfg: CascadeConfig, overrides: list[str]) -> list[tuple[str, StageLaunch]]:
    """(plan text, launch) for every stage in order, up to ``until`` if set; without it the last command has no
    `until`, so that it also runs the ablations and writes the report."""
    plan = plan_from_config(cfg)
    parent = parent_config(cfg)
    children = plan.child_configs(parent)
    previous = dict(zip(children, [parent, *children.values()]))  # what each child is pruned from
    cluster, storage = cluster_storage(cfg, overrides)
    lines = []
    order = plan.order()
    if plan.until is not None:
        order = order[:order.index(plan.until) + 1]
    for index, (child, stage) in enumerate(order):
        layout = plan.layout(stage)
        nodes = stage_nodes(cluster, stage)
        world = nodes * cluster.gpus_per_node
        data_parallel = layout.data_parallel_size(world)
        text = (f"{child}/{stage}: {nodes} node(s) x {cluster.gpus_per_node} GPUs, tp={layout.tp} pp={layout.pp} "
                f"cp={layout.cp} dp={data_parallel}")
        if stage == "prune":
            calibration = cfg.stage.prune.calibration
            steps = stage_memory(stage, previous[child], children[child], layout, seq_len=calibration.seq_len,
                                 micro_batch_size=calibration.micro_batch_size)
        else:
            spec = plan.training_stage(stage)  # the memory model takes the parent as the teacher of every stage
            microbatches = spec.train.microbatches(data_parallel)
            chunk_tokens = getattr(spec, "kl", KLOptions()).chunk_tokens  # the stages with the fused KL have theirs
            memory = estimate_memory(children[child], parent, layout, data_parallel, spec.train.seq_len,
                                     spec.train.micro_batch_size, microbatches, chunk_tokens=chunk_tokens)
            text += f", seq {spec.train.seq_len:,}, {spec.train.steps:,} steps; memory {memory.describe()}"
            if memory.total > cluster.gpu_memory_gib:
                text += "  <-- EXCEEDS the GPU: change cascade.stage_parallel"
            steps = stage_memory(stage, parent, children[child], layout, data_parallel, spec.train.seq_len,
                                 spec.train.micro_batch_size, microbatches, chunk_tokens=chunk_tokens)
        text += "".join(f"\n      {step.describe()}" for step in steps)
        until = [] if index == len(order) - 1 and plan.until is None else [f"until={child}/{stage}"]
        lines.append((text, stage_launch(cluster, storage, f"{child}/{stage}", nodes, index, overrides, until)))
    return lines


def _select(cfg: object, key: str) -> object:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--commands", action="store_true",
                      help="'# <plan>' lines, then '<stage>\\t<host output dir>\\t<command>' per stage")
    mode.add_argument("--container-flags", action="store_true", help="the pyxis flags of the job's steps, one per line")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for recipes.cascade")
    args = parser.parse_args(argv)
    with project_errors():
        cfg = compose_typed("cascade", *args.overrides)
        if args.container_flags:
            cluster, storage = cluster_storage(cfg, args.overrides)
            if storage is None:
                raise ConfigError(f"cluster.kind={cluster.kind}: the Slurm job needs a slurm cluster config "
                                  "(cluster=slurm_h100, or a preset that selects one)")
            output = container_flags(cluster, storage)
        else:
            lines = launch_lines(cfg, args.overrides)
            if args.commands:
                comments = [f"# {row}" for text, _ in lines for row in text.splitlines()]
                output = comments + [launch.line() for _, launch in lines]
            else:
                output = [f"{text}\n    {launch.command}" for text, launch in lines]
    print("\n".join(output))


if __name__ == "__main__":
    main()
