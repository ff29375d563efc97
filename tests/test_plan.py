"""The launch plan: the commands slurm/cascade.sbatch runs (container flags, storage on the mounts, torchrun flags
this torch accepts) and the checks that refuse a job whose outputs would vanish with its containers."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from nemo_plugins.cascade.launch import (
    TORCHRUN_SIGNALS,
    ClusterConfig,
    check_allocation,
    check_image,
    check_torchrun,
    container_storage,
    torchrun_command,
)
from nemo_plugins.cascade.plan import plan_from_config
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.train.loop import REQUEUE_EXIT_CODE, REQUEUE_MARKER
from recipes._entry import CONF_DIR, compose_typed
from recipes.plan import main as plan_main

IMAGE = "nvcr.io#org/cascade:test"
SLURM = dict(kind="slurm", nodes=2, gpus_per_node=8, runs_dir="/workspace/runs", cache_dir="/workspace/cache",
             host_runs_dir="/lustre/runs", host_cache_dir="/lustre/cache", container_image=IMAGE,
             mounts=["/lustre/data:/data:ro"])
VALUES = {"output_dir": "/workspace/runs/ministral3", "data.cache_dir": "/somewhere/else",
          "chat_data.cache_dir": "relative/chat"}


def _compose(*overrides):
    return compose_typed("cascade", *overrides)


def _dry_run(*overrides, image=IMAGE):
    env = {**os.environ, "PYTHON": sys.executable, "CASCADE_IMAGE": image}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.run(["bash", "slurm/cascade.sbatch", "--dry-run", *overrides], capture_output=True, text=True,
                          env=env)


def test_sbatch_dry_run_prints_one_container_step_per_stage_writing_only_on_the_mounts():
    done = _dry_run("cascade=ministral3")
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if line.startswith("srun ")]
    base = ("prune", "distill_short", "distill_long", "sft_kd")
    stages = [f"{c}/{s}" for c, posttrain in (("ministral3_14b", ("pwrm", "odpo")), ("ministral3_8b", ("odpo",)),
                                              ("ministral3_3b", ("odpo",))) for s in base + posttrain]
    assert len(commands) == len(stages)
    for command, stage in zip(commands, stages):
        argv = shlex.split(command)
        srun, torchrun = argv[:argv.index("torchrun")], argv[argv.index("torchrun"):argv.index("-m")]
        assert srun[1] == ("--nodes=1" if stage.endswith("prune") else "--nodes=8")
        flags = dict(a.split("=", 1) for a in srun if "=" in a)
        assert flags["--container-image"] == IMAGE and "--no-container-mount-home" in srun
        assert flags["--container-workdir"] == "/workspace/cascade"
        mounts = {m.split(":")[1]: m.split(":")[0] for m in flags["--container-mounts"].split(",")}
        assert mounts["/workspace/runs"] == "/lustre/runs" and mounts["/workspace/cache"] == "/lustre/cache"
        assert flags["--export"] == "ALL,CASCADE_CACHE_DIR=/workspace/cache"
        assert ("--standalone" if stage.endswith("prune") else "--rdzv-backend=c10d") in torchrun
        assert "--signals-to-handle=" + TORCHRUN_SIGNALS in torchrun
        overrides = argv[argv.index("recipes.cascade") + 1:]
        assert overrides[:1] == ["cascade=ministral3"]
        assert (f"until={stage}" in overrides) == (stage != stages[-1])
        cfg = _compose(*overrides)
        plan_from_config(cfg)  # every command composes and validates
        for path in (cfg.output_dir, cfg.data.cache_dir, cfg.chat_data.cache_dir):  # what the stage writes, on a mount
            key = path
            assert any(path.startswith(inside + "/") for inside in ("/workspace/runs", "/workspace/cache")), (key, path)
    assert "GiB/GPU" in done.stdout and "EXCEEDS" not in done.stdout


def test_the_job_script_reads_the_trainers_requeue_signs():
    """The script's copies of the loop's exit code and marker name (it runs on the host, with no python)."""
    script = open("slurm/cascade.sbatch").read()
    assert f"\nREQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}\n" in script and f"\nREQUEUE_MARKER={REQUEUE_MARKER}\n" in script


def test_sbatch_dry_run_rejects_a_misspelt_key_in_one_line():
    done = _dry_run("cascade=ministral3", "stage.distill_long.train.seq_length=8")
    assert done.returncode == 2 and "seq_length" in done.stderr and "srun" not in done.stdout


@pytest.fixture
def planner(monkeypatch, capsys):
    """``recipes.plan`` in this process, keeping the session's process group (the entry point tears it down)."""
    monkeypatch.setattr("recipes._entry.shutdown", lambda: None)
    return lambda *argv: _plan(capsys, *argv)


def _plan(capsys, *argv) -> tuple[int, str, str]:
    try:
        plan_main(list(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_slurm_plan_without_an_image_names_the_variable(monkeypatch, planner):
    monkeypatch.delenv("CASCADE_IMAGE", raising=False)
    code, out, err = planner("--commands", "cascade=ministral3")
    assert code == 2 and "export CASCADE_IMAGE=" in err and "srun" not in out


def test_storage_derives_container_paths_and_keeps_only_overrides_on_a_writable_mount():
    cluster = ClusterConfig(**SLURM)
    storage = container_storage(cluster, VALUES, overridden={"output_dir"})
    assert storage.overrides == ("output_dir=/workspace/runs/ministral3", "data.cache_dir=/workspace/cache/tokens",
                                 "chat_data.cache_dir=/workspace/cache/chat")
    assert storage.env == {"CASCADE_CACHE_DIR": "/workspace/cache"}
    assert storage.mount_flag() == "/lustre/runs:/workspace/runs,/lustre/cache:/workspace/cache,/lustre/data:/data:ro"
    assert storage.host_path(storage.output_dir) == "/lustre/runs/ministral3"
    assert storage.host_path("/workspace/runs") == "/lustre/runs"
    assert storage.host_path("/workspace/runsx/a") is None and storage.host_path("/workspace/cascade/runs") is None
    for key in ("data.cache_dir", "chat_data.cache_dir"):
        with pytest.raises(ConfigError, match=f"{key}=.* throw-away container"):
            container_storage(cluster, VALUES, overridden={key})
    with pytest.raises(ConfigError, match="output_dir=runs/x is not under cluster.runs_dir"):
        container_storage(cluster, {**VALUES, "output_dir": "runs/x"}, overridden={"output_dir"})
    with pytest.raises(ConfigError, match="output_dir=/data/x"):  # a mount, but the read-only inputs'
        container_storage(cluster, {**VALUES, "output_dir": "/data/x"}, overridden={"output_dir"})


@pytest.mark.parametrize("changes,message", [
    ({"runs_dir": "runs"}, "cluster.runs_dir='runs' must be an absolute path"),
    ({"host_cache_dir": None}, "cluster.host_cache_dir=None must be an absolute path"),
    ({"mounts": ["/lustre/data"]}, "cluster.mounts entry '/lustre/data'"),
    ({"nodes": 0}, "cluster.nodes=0 must be >= 1"),
    ({"kind": "local", "nodes": 2}, "cluster.nodes=2 with cluster.kind=local"),
])
def test_cluster_config_names_the_key_to_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        ClusterConfig(**{**SLURM, **changes})


def test_a_job_needs_its_container_image(monkeypatch):
    """Checked when the job is planned (the stages run inside the image, where the variable need not be set)."""
    monkeypatch.delenv("CASCADE_IMAGE", raising=False)
    with pytest.raises(ConfigError, match="cluster.container_image is not set: export CASCADE_IMAGE="):
        check_image(ClusterConfig(**{**SLURM, "container_image": None}))


def test_the_job_and_the_config_must_agree(monkeypatch):
    cluster = ClusterConfig(**SLURM)
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "8")
    with pytest.raises(ConfigError, match="the job has 8 nodes but cluster.nodes=2"):
        check_allocation(cluster)
    monkeypatch.setenv("CASCADE_IMAGE", "other:tag")
    with pytest.raises(ConfigError, match="planned in CASCADE_IMAGE=other:tag"):
        check_image(cluster)


def test_this_torchrun_accepts_the_launch_flags():
    """A flag torchrun does not know fails the job at its first stage; --signals-to-handle is torch >= 2.9."""
    from torch.distributed.run import get_args_parser

    for cluster, nodes in ((ClusterConfig(**SLURM), 2), (ClusterConfig(**SLURM), 1), (ClusterConfig(), 1)):
        command = torchrun_command(cluster, nodes, "7-1", "node0")
        args = get_args_parser().parse_args([*command[1:], "-m", "recipes.cascade"])
        assert args.nproc_per_node == str(cluster.gpus_per_node) and args.module and args.standalone == (nodes == 1)
        assert "SIGUSR1" in args.signals_to_handle.split(",")
    slurm = get_args_parser().parse_args([*torchrun_command(ClusterConfig(**SLURM), 2, "7-1", "node0")[1:], "x.py"])
    assert slurm.rdzv_endpoint == "node0:29500" and slurm.nnodes == "2" and slurm.shutdown_timeout == 240


def test_local_plan_is_torchrun_standalone_and_the_job_refuses_it(planner):
    code, out, err = planner("--commands")
    assert code == 0, err
    commands = [line.split("\t") for line in out.splitlines() if not line.startswith("#")]
    assert commands and all(c[2].startswith("torchrun --standalone --nproc-per-node=1 ") and c[1] == "-"
                            and " -m recipes.cascade" in c[2] for c in commands)
    code, out, err = planner("--container-flags")
    assert code == 2 and "needs a slurm cluster config" in err



def test_the_ministral3_plan_prints_host_ram_and_gpu_memory_of_every_step_inside_the_24b_targets(monkeypatch, planner):
    """Per rank of an 8-GPU node: loading and export <= 1.5 x (parent bytes / TP) + 8 GB, pruning <= 64 GB."""
    monkeypatch.setenv("CASCADE_IMAGE", "nvcr.io/example/cascade:1")
    code, out, err = planner("cascade=ministral3", "model.source=null", "posttrain=false")
    assert code == 0, err
    gb = 1e9 / 2**30
    parent = OmegaConf.load(os.path.join(CONF_DIR, "model", "mistral_small_3_1_24b.yaml")).architecture
    parent_bytes = 2 * MistralConfig.from_dict(OmegaConf.to_container(parent)).num_parameters()
    limits = {"load": 1.5 * parent_bytes / 8 / 2**30 + 8 * gb, "export": 1.5 * parent_bytes / 8 / 2**30 + 8 * gb,
              "prune": 64 * gb, "distill": 1.5 * parent_bytes / 8 / 2**30 + 8 * gb}
    steps = re.findall(r"^\s+(\w+): host RAM ([\d.]+) GiB/rank, GPU ([\d.]+) GiB/GPU$", out, re.MULTILINE)
    assert [s for s, _, _ in steps] == ["load", "prune", "export", "distill", "export", "distill", "export"] * 3
    for step, host, gpu in steps:
        assert 0 < float(host) <= limits[step], (step, host)
        assert 0 < float(gpu) <= 80, (step, gpu)


def test_an_image_whose_torchrun_cannot_forward_the_time_limit_signal_is_refused_at_planning():
    check_torchrun()  # this machine's torch
    with pytest.raises(ConfigError, match=r"lacks --signals-to-handle \(torch >= 2.9\)"):
        check_torchrun({"--standalone", "--shutdown-timeout"})


def test_the_ministral3_plan_with_the_reasoning_branch_runs_it_per_child_in_the_engines_layout(monkeypatch, planner):
    monkeypatch.setenv("CASCADE_IMAGE", "nvcr.io/example/cascade:1")
    # conf/cascade/ministral3.yaml has no paper-scale reasoning SFT / ODPO budgets yet: given here
    code, out, err = planner("--commands", "cascade=ministral3", "model.source=null", "reasoning=true",
                             "reasoning_data.format=tekken", "problem_data.format=tekken",
                             "stage.reasoning_sft.train.global_batch_size=128",
                             "stage.reasoning_sft.train.seq_len=32768",
                             "stage.odpo_reasoning.train.global_batch_size=256",
                             "stage.odpo_reasoning.train.seq_len=16384",
                             *(f"stage.{s}.train.train_tokens=419430400" for s in ("reasoning_sft", "odpo_reasoning")))
    assert code == 0, err
    stages = [line.split("\t")[0] for line in out.splitlines() if not line.startswith("#")]
    reasoning = ("reasoning_sft", "grpo_stem", "grpo_general", "odpo_reasoning")
    assert [s for s in stages if s.startswith("ministral3_8b/")][-4:] == [f"ministral3_8b/{s}" for s in reasoning]
    assert sum(s.endswith("/pwrm") for s in stages) == 1 and len(stages) == 3 * 9 + 1
    plan = {line.split(":")[0].lstrip("# "): line for line in out.splitlines() if line.startswith("# ministral3")}
    assert "tp=8 pp=1 cp=1" in plan["ministral3_3b/grpo_general"] and "seq 90,112" in plan["ministral3_3b/grpo_general"]
