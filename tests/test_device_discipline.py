"""Every tensor the project hands to a torch.distributed collective lives on ``distributed.device()``.

On CPU (gloo) a tensor left on the host by mistake works; on NCCL it is an error. To catch that here, ``device()``
is made to return ``cpu:0`` (a device no tensor is created on by default), a ``TorchFunctionMode`` marks every
tensor made with ``device=device()`` / ``.to(device())`` or computed from such a tensor or from the model's
parameters, and the collectives called from ``nemo_plugins`` code must get marked tensors; object collectives
may only carry small metadata. The prune pipeline and a distillation step run under that check.
"""

import pickle
import sys
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from nemo_plugins import distributed
from nemo_plugins.data.mix import Cursor
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.model.builder import build_model
from nemo_plugins.prune.megatron_calibrator import megatron_calibrator
from nemo_plugins.prune.pipeline import PruneOptions, PruneTarget, prune
from tests.conftest import tiny_config
from tests.test_distill import _run
from tests.test_prune import calibration_batch, parent_state

DECLARED = torch.device("cpu", 0)
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                      "reduce_scatter_tensor", "gather", "scatter", "send", "recv", "isend", "irecv", "all_to_all",
                      "all_to_all_single")
OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")
MAX_OBJECT_BYTES = 64 * 1024


class DeclaredDevice(TorchFunctionMode):
    """Tracks which tensors are on the declared device (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self._ids: dict[int, weakref.ref] = {}

    def mark(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        self._ids[key] = weakref.ref(tensor, lambda _, key=key: self._ids.pop(key, None))

    def declared(self, tensor: torch.Tensor) -> bool:
        ref = self._ids.get(id(tensor))
        return isinstance(tensor, torch.nn.Parameter) or (ref is not None and ref() is tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        moves = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (torch.device, str))]
        if getattr(func, "__name__", "") == "cpu":
            moves = ["cpu"]
        if moves and args and out is args[0]:
            out = out.view_as(out)  # on the CPU a move to the same device returns its input: keep them apart
        if moves and all(torch.device(m) != DECLARED for m in moves):
            return out  # moved (or created) elsewhere, explicitly
        inputs = [t for t in _tensors((args, kwargs))]
        if (moves and torch.device(moves[-1]) == DECLARED) or any(self.declared(t) for t in inputs):
            for tensor in _tensors(out):
                self.mark(tensor)
        return out


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _from_project(depth: int = 2) -> bool:
    return sys._getframe(depth).f_globals.get("__name__", "").startswith("nemo_plugins")


@pytest.fixture
def discipline(monkeypatch):
    """Installs the check; yields the list of violations (collective name, caller, what was wrong)."""
    original = distributed.device
    for module in [m for name, m in sys.modules.items() if name.startswith("nemo_plugins") and m is not None]:
        if getattr(module, "device", None) is original:
            monkeypatch.setattr(module, "device", lambda: DECLARED)
    mode, violations = DeclaredDevice(), []

    def checked(name, collective):
        def run(*args, **kwargs):
            if _from_project():
                caller = sys._getframe(1).f_code.co_name
                for tensor in _tensors((args, kwargs)):
                    if not mode.declared(tensor):
                        violations.append((name, caller, f"tensor {tuple(tensor.shape)} not on device()"))
            return collective(*args, **kwargs)
        return run

    def small(name, collective):
        def run(*args, **kwargs):
            if _from_project():
                size = len(pickle.dumps(args[0] if args else kwargs))
                if size > MAX_OBJECT_BYTES:
                    violations.append((name, sys._getframe(1).f_code.co_name, f"{size} pickled bytes"))
            return collective(*args, **kwargs)
        return run

    for name in TENSOR_COLLECTIVES:
        monkeypatch.setattr(dist, name, checked(name, getattr(dist, name)))
    for name in OBJECT_COLLECTIVES:
        monkeypatch.setattr(dist, name, small(name, getattr(dist, name)))
    with mode:
        yield violations


def test_the_check_catches_a_host_tensor_and_a_large_object(discipline):
    project_code = {"__name__": "nemo_plugins.planted", "dist": dist, "torch": torch, "device": distributed.device}
    exec("dist.all_reduce(torch.ones(3).to(device()))", project_code)  # right: through device()
    assert discipline == []
    exec("dist.broadcast(torch.ones(3), src=0)", project_code)  # the old prune broadcast: a host tensor
    exec("dist.all_reduce(torch.ones(3).to(device()).cpu())", project_code)
    exec("dist.broadcast_object_list([torch.zeros(100_000)], src=0)", project_code)
    assert [v[0] for v in discipline] == ["broadcast", "all_reduce", "broadcast_object_list"], discipline


def test_prune_pipeline_keeps_collectives_on_the_device(discipline):
    parent = parent_state(num_layers=3, tie_embeddings=True)
    c = parent.config
    tokens, positions = calibration_batch(c, rows=4, length=16)
    target = PruneTarget(2, 32, 64, tie_embeddings=True)
    for options in (PruneOptions(), PruneOptions(recalibrate=False, tie_method="embedding_fit")):
        prune(parent, target, options, megatron_calibrator(ParallelConfig(), tokens, positions, progress=False))
    assert discipline == []


def test_a_distillation_step_keeps_collectives_on_the_device(discipline, tmp_path, mix):
    teacher = Teacher(build_model(tiny_config(), ParallelConfig()))
    _, run = _run(tmp_path / "run", teacher, mix, steps=1)
    run(Cursor())
    assert discipline == []
