"""Importing the library changes nothing global: no warning filters, no megatron-core patches. Those are the entry
points' explicit choices (``cpu_compat.install()``, ``logs.setup_logging()``). Checked in a fresh interpreter, since
this test session has installed both."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORT_EVERYTHING = r"""
import importlib, json, pkgutil, sys, warnings
import torch
import megatron.core.models.gpt  # megatron's own import-time filters and warnings are not ours
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.optimizer import clip_grads
from megatron.core.tensor_parallel import random

ours = []  # filters added from a module of ours (third-party packages imported on the way add their own)


def recording(add):
    def add_filter(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.split(".")[0] in ("nemo_plugins", "recipes"):
            ours.append(f"{caller}: {args} {kwargs}")
        return add(*args, **kwargs)
    return add_filter


warnings.filterwarnings, warnings.simplefilter = recording(warnings.filterwarnings), recording(warnings.simplefilter)
originals = (LanguageModule.setup_embeddings_and_output_layer, clip_grads.clip_grad_by_total_norm_fp32,
             random._get_cuda_rng_state, random._set_cuda_rng_state, torch.Tensor.cuda)
import nemo_plugins
imported = ["nemo_plugins"]
for info in pkgutil.walk_packages(nemo_plugins.__path__, "nemo_plugins."):
    importlib.import_module(info.name)
    imported.append(info.name)
now = (LanguageModule.setup_embeddings_and_output_layer, clip_grads.clip_grad_by_total_norm_fp32,
       random._get_cuda_rng_state, random._set_cuda_rng_state, torch.Tensor.cuda)
proxied = sorted(name for name, module in list(sys.modules.items())
                 if name.startswith("megatron") and getattr(module, "torch", torch) is not torch)
print(json.dumps({"imported": imported, "new_filters": ours,
                  "patched": [i for i, (a, b) in enumerate(zip(originals, now)) if a is not b], "proxied": proxied}))
"""


def test_importing_every_library_module_changes_nothing_global():
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"nemo_plugins.cpu_compat", "nemo_plugins.megatron_compat", "nemo_plugins.logs"} <= set(seen["imported"])
    assert seen["new_filters"] == []
    assert seen["patched"] == []
    assert seen["proxied"] == []
