"""How a cascade is launched on a cluster: one `srun` (pyxis container) + `torchrun` per stage, and where every
stage's outputs and caches live, seen from the host and from inside the container.

On a Slurm cluster with pyxis/enroot every stage runs in a throw-away container: whatever it writes outside a
mounted directory is lost when the step ends, and each node has its own. So the cluster config declares the two
writable host directories ONCE (``cluster.host_runs_dir``, ``cluster.host_cache_dir``) with the container paths
they are mounted at (``cluster.runs_dir``, ``cluster.cache_dir``), and :func:`container_storage` derives the rest:
the ``--container-mounts`` list, the Hydra overrides that put ``output_dir``, ``data.cache_dir`` and
``chat_data.cache_dir`` on those mounts, the ``CASCADE_CACHE_DIR`` environment (HF conversions of GGUF parents are
cached there), and the host path of each output (what the batch shell reads). A path the user sets that is not on
a writable mount is refused before any GPU time is spent.

Preemption: the batch shell forwards SIGUSR1 / SIGTERM to the running `srun`, which forwards it to its tasks.
torchrun dies of SIGUSR1 unless told to handle it, so it gets ``--signals-to-handle`` with SIGUSR1 (it then sends
the signal to its workers and waits ``--shutdown-timeout`` seconds for them to finish the step and save). Every
worker then exits with REQUEUE_EXIT_CODE, but torchrun reports any worker failure as its own exit code 1, so the
trainer also writes ``<stage folder>/requeue`` (``nemo_plugins.train.loop.REQUEUE_MARKER``) under the output
directory: the batch shell, given that directory's host path, requeues the job when the step exits with 75 or
left that file.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import PurePosixPath

from nemo_plugins.errors import ConfigError

# The image the job's first (planning) step ran in: it must be the image every stage runs in.
IMAGE_ENV = "CASCADE_IMAGE"
# torchrun's defaults plus SIGUSR1 (Slurm's `--signal=USR1@<s>` warning): forwarded to the workers, not fatal.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# What stages write (outputs, token caches): each must be on a writable mount.
STORAGE_KEYS = ("output_dir", "data.cache_dir", "chat_data.cache_dir")


class ClusterKind(StrEnum):
    local = "local"
    slurm = "slurm"


@dataclass
class ClusterConfig:
    """``conf/cluster/*.yaml``. ``local``: this machine, torchrun standalone. ``slurm``: pyxis containers."""

    kind: ClusterKind = ClusterKind.local
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_memory_gib: float = 80.0
    runs_dir: str = "runs"              # where stages write; on slurm the container path host_runs_dir is mounted at
    cache_dir: str | None = None        # converted parents and token stores (slurm: container path of host_cache_dir)
    host_runs_dir: str | None = None    # slurm: the shared host directory mounted at runs_dir
    host_cache_dir: str | None = None   # slurm: the shared host directory mounted at cache_dir
    container_image: str | None = None  # slurm: the image built from ./Dockerfile (enroot URI or .sqsh path)
    workdir: str = "/workspace/cascade"  # slurm: the repository inside the image
    mounts: list[str] = field(default_factory=list)  # slurm: more host:container[:flags] mounts (data, models)
    rdzv_port: int = 29500
    shutdown_timeout_s: int = 240       # torchrun's wait for workers to save after a signal (< the USR1 lead time)

    def __post_init__(self) -> None:
        for key in ("nodes", "gpus_per_node", "rdzv_port", "shutdown_timeout_s"):
            if getattr(self, key) < 1:
                raise ConfigError(f"cluster.{key}={getattr(self, key)} must be >= 1")
        if self.kind == "local":
            if self.nodes != 1:
                raise ConfigError(f"cluster.nodes={self.nodes} with cluster.kind=local: one machine; "
                                  "use a slurm cluster config (cluster=slurm_h100) for several nodes")
            return
        for key in ("runs_dir", "cache_dir", "host_runs_dir", "host_cache_dir", "workdir"):
            value = getattr(self, key)
            if not value or not value.startswith("/"):
                raise ConfigError(f"cluster.{key}={value!r} must be an absolute path: on slurm every output and cache "
                                  "lives on a shared host directory mounted into the container")
        for mount in self.mounts:
            parts = mount.split(":")
            if len(parts) not in (2, 3) or not all(p.startswith("/") for p in parts[:2]):
                raise ConfigError(f"cluster.mounts entry {mount!r} must be /host/path:/container/path[:flags]")


@dataclass(frozen=True)
class ContainerStorage:
    """Where a run's files are: the container's mounts, the overrides and environment that put outputs and caches
    on them, and the host side of a container path."""

    mounts: tuple[tuple[str, str, str], ...]  # (host, container, flags)
    overrides: tuple[str, ...]
    env: dict[str, str]
    output_dir: str  # in the container

    def host_path(self, path: str) -> str | None:
        """The host path of a container ``path`` (None: not on a mount, so it would vanish with the container)."""
        for host, inside, _ in self.mounts:
            if _under(path, inside):
                return str(PurePosixPath(host) / PurePosixPath(path).relative_to(inside))
        return None

    def mount_flag(self) -> str:
        return ",".join(":".join(p for p in mount if p) for mount in self.mounts)


def _under(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both absolute: a relative path is below nothing)."""
    return PurePosixPath(path) == PurePosixPath(root) or PurePosixPath(root) in PurePosixPath(path).parents


def container_storage(cluster: ClusterConfig, values: dict[str, str], overridden: set[str]) -> ContainerStorage:
    """The one place container paths come from. ``values``: the composed config's STORAGE_KEYS; ``overridden``: the
    keys the user set on the command line (kept, but checked to be on a writable mount); the others are put
    under ``cluster.runs_dir`` / ``cluster.cache_dir``."""
    writable = ((cluster.host_runs_dir, cluster.runs_dir, ""), (cluster.host_cache_dir, cluster.cache_dir, ""))
    extra = tuple((p[0], p[1], p[2] if len(p) > 2 else "") for p in (m.split(":") for m in cluster.mounts))
    defaults = {"output_dir": f"{cluster.runs_dir}/{PurePosixPath(values['output_dir']).name}",
                "data.cache_dir": f"{cluster.cache_dir}/tokens", "chat_data.cache_dir": f"{cluster.cache_dir}/chat"}
    paths = {}
    for key in STORAGE_KEYS:
        paths[key] = values[key] if key in overridden else defaults[key]
        if not any(_under(paths[key], root) for _, root, _ in writable):
            raise ConfigError(f"{key}={paths[key]} is not under cluster.runs_dir={cluster.runs_dir} "
                              f"or cluster.cache_dir={cluster.cache_dir} (the shared host directories mounted into "
                              "the container): it would be written inside a throw-away container; "
                              "drop the override or put it there")
    return ContainerStorage(writable + extra, tuple(f"{k}={v}" for k, v in paths.items()),
                            {"CASCADE_CACHE_DIR": cluster.cache_dir}, paths["output_dir"])


def check_image(cluster: ClusterConfig) -> None:
    """The planning step runs in ``$CASCADE_IMAGE``; a config naming another image would plan in one and train in
    the other. (Checked when a job is planned, not in the config: the stages run inside the image, where the
    variable need not be set.)"""
    if not cluster.container_image:
        raise ConfigError(f"cluster.container_image is not set: export {IMAGE_ENV}=<the image built from "
                          "./Dockerfile> (an enroot URI such as nvcr.io#org/cascade:tag, or a .sqsh path)")
    planned = os.environ.get(IMAGE_ENV)
    if planned and planned != cluster.container_image:
        raise ConfigError(f"cluster.container_image={cluster.container_image} but the job planned in {IMAGE_ENV}="
                          f"{planned}: set one of them only")


def check_torchrun(options: set[str] | None = None) -> None:
    """The stages' torchrun must forward SIGUSR1 (``--signals-to-handle``, torch >= 2.9) and wait for the save
    (``--shutdown-timeout``); an older one would die on the time-limit warning without saving. The planning step
    runs in the image, so this checks the image's torch before any GPU time is spent."""
    if options is None:
        from torch.distributed.run import get_args_parser

        options = set(get_args_parser()._option_string_actions)
    missing = [flag for flag in ("--signals-to-handle", "--shutdown-timeout") if flag not in options]
    if missing:
        import torch

        raise ConfigError(f"torchrun of torch {torch.__version__} in this image lacks {', '.join(missing)} "
                          "(torch >= 2.9): build the image from a newer NGC PyTorch base (Dockerfile FROM)")


def container_flags(cluster: ClusterConfig, storage: ContainerStorage) -> list[str]:
    """pyxis flags of every step: the image, the mounts, the repository as working directory, no home directory
    (a home mount would shadow the image's and differs per user), and the storage environment."""
    exports = ",".join(f"{k}={v}" for k, v in storage.env.items())
    return [f"--container-image={cluster.container_image}", f"--container-mounts={storage.mount_flag()}",
            f"--container-workdir={cluster.workdir}", "--no-container-mount-home", f"--export=ALL,{exports}"]


def torchrun_command(cluster: ClusterConfig, nodes: int, rdzv_id: str, master: str) -> list[str]:
    """torchrun per node. Several nodes: c10d rendezvous at the first node (the one whose address matches the
    endpoint hosts the store); one node (pruning, or this machine): standalone, whichever node srun picked.
    SIGUSR1 is forwarded to the workers, who then get ``shutdown_timeout_s`` to finish their step and save."""
    if nodes == 1:
        command = ["torchrun", "--standalone", f"--nproc-per-node={cluster.gpus_per_node}"]
    else:
        command = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={cluster.gpus_per_node}", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint={master}:{cluster.rdzv_port}", f"--rdzv-id={rdzv_id}"]
    return command + [f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={cluster.shutdown_timeout_s}"]


@dataclass(frozen=True)
class StageLaunch:
    """One stage's step: what the batch shell runs, and the run's output directory on the host (where a
    preempted stage leaves its requeue file)."""

    stage: str
    command: str
    host_output_dir: str | None

    def line(self) -> str:
        """The `--commands` line the batch script reads: ``stage<TAB>host output dir<TAB>command``."""
        return f"{self.stage}\t{self.host_output_dir or '-'}\t{self.command}"


def stage_launch(cluster: ClusterConfig, storage: ContainerStorage | None, stage: str, nodes: int, index: int,
                 overrides: list[str], until: list[str]) -> StageLaunch:
    """The command of the ``index``-th stage (``until``: [] for the last, which also writes the report)."""
    torchrun = torchrun_command(cluster, nodes, f"{os.environ.get('SLURM_JOB_ID', 'dry-run')}-{index}",
                                os.environ.get("MASTER_ADDR", "localhost"))
    recipe = ["-m", "recipes.cascade", *overrides]
    if storage is None:
        return StageLaunch(stage, shlex.join(torchrun + recipe + until), None)
    srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={cluster.gpus_per_node}",
            *container_flags(cluster, storage)]
    return StageLaunch(stage, shlex.join(srun + torchrun + recipe + list(storage.overrides) + until),
                       storage.host_path(storage.output_dir))


def check_allocation(cluster: ClusterConfig) -> None:
    """Inside a job, the allocation and the config must agree, or torchrun would wait for nodes that never come."""
    allocated = os.environ.get("SLURM_JOB_NUM_NODES")
    if allocated is not None and int(allocated) != cluster.nodes:
        raise ConfigError(f"the job has {allocated} nodes but cluster.nodes={cluster.nodes}: make them agree "
                          "(sbatch --nodes=N ... cluster.nodes=N)")
