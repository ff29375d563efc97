"""The launch plan of a cascade: per stage the parallel layout, a per-GPU memory estimate and the exact
`srun ... torchrun ... -m recipes.cascade` command line (one stage per srun, resumable).

    python -m recipes.plan cascade=ministral3                     # the table, with memory estimates
    python -m recipes.plan --commands cascade=ministral3          # what slurm/cascade.sbatch runs, one per line

Rendezvous values come from the environment the sbatch script sets (MASTER_ADDR, SLURM_JOB_ID).
"""

from __future__ import annotations

import argparse
import os
import shlex

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from nemo_plugins.cascade.memory import estimate_memory
from nemo_plugins.convert.sources import ModelSource, declared_architecture, source_config
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from recipes._entry import CONF_DIR, project_errors
from recipes.cascade import build_plan


def parent_config(cfg: DictConfig) -> MistralConfig:
    declared = declared_architecture(cfg.model.architecture)
    if declared is not None:
        return declared
    if not cfg.model.source:
        raise ConfigError("model.source and model.architecture are both null: the plan needs the parent's shape")
    return source_config(ModelSource.parse(cfg.model.source))


def stage_nodes(cfg: DictConfig, stage: str) -> int:
    """Pruning gathers full weights and runs calibration forwards: one node; distillation uses them all."""
    return 1 if stage == "prune" else int(cfg.cluster.get("nodes", 1))


def launch_lines(cfg: DictConfig, overrides: list[str]) -> list[tuple[str, str, str]]:
    """(stage id, plan text, command) for every stage in order; the last command has no `until` so that it also
    runs the ablations and writes the report."""
    plan = build_plan(cfg)
    parent = parent_config(cfg)
    children = plan.child_configs(parent)
    cluster = cfg.cluster
    gpus = int(cluster.get("gpus_per_node", 1))
    master = os.environ.get("MASTER_ADDR", "localhost")
    job = os.environ.get("SLURM_JOB_ID", "dry-run")
    allocated = os.environ.get("SLURM_JOB_NUM_NODES")
    if allocated is not None and int(allocated) != int(cluster.get("nodes", 1)):
        raise ConfigError(f"the job has {allocated} nodes but cluster.nodes={cluster.get('nodes')}: make them agree "
                          "(sbatch --nodes=N ... cluster.nodes=N)")
    lines = []
    order = plan.order()
    for index, (child, stage) in enumerate(order):
        layout = plan.layout(stage)
        nodes = stage_nodes(cfg, stage)
        world = nodes * gpus
        data_parallel = layout.data_parallel_size(world)
        student = children[child]
        text = f"{child}/{stage}: {nodes} node(s) x {gpus} GPUs, tp={layout.tp} pp={layout.pp} cp={layout.cp} dp={data_parallel}"
        if stage != "prune":
            spec = plan.training_stage(stage)  # the memory model takes the parent as the teacher of every stage
            microbatches = spec.train.microbatches(data_parallel)
            memory = estimate_memory(student, parent, layout, data_parallel, spec.train.seq_len,
                                     spec.train.micro_batch_size, microbatches)
            text += f", seq {spec.train.seq_len:,}, {spec.train.steps:,} steps; memory {memory.describe()}"
            if memory.total > float(cluster.get("gpu_memory_gib", 80)):
                text += "  <-- EXCEEDS the GPU: change cascade.stage_parallel"
        until = [] if index == len(order) - 1 else [f"until={child}/{stage}"]
        srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus}"]
        if cluster.get("container_image"):
            srun += [f"--container-image={cluster.container_image}", f"--container-mounts={','.join(cluster.mounts)}",
                     f"--container-workdir={cluster.workdir}", "--no-container-mount-home"]
        torchrun = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={gpus}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={master}:{cluster.get('rdzv_port', 29500)}", f"--rdzv-id={job}-{index}"]
        command = srun + torchrun + ["-m", "recipes.cascade", *overrides, *until]
        lines.append((f"{child}/{stage}", text, shlex.join(command)))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", action="store_true", help="print '<stage>\\t<command>' lines only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for recipes.cascade")
    args = parser.parse_args(argv)
    with project_errors():
        try:
            with initialize_config_dir(CONF_DIR, version_base="1.3"):
                cfg = compose("cascade", overrides=args.overrides)
        except ConfigCompositionException as err:
            raise ConfigError(str(err)) from err
        lines = launch_lines(cfg, args.overrides)
    for stage, text, command in lines:
        print(f"{stage}\t{command}" if args.commands else f"{text}\n    {command}")


if __name__ == "__main__":
    main()
