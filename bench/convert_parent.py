"""Conversion cost of the embedded parent: GGUF -> HF safetensors (fresh cache) -> megatron dist checkpoint.

Prints wall time and peak RSS of each step, each in its own process so peaks do not mix.
    python bench/convert_parent.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

STEP = r"""
import json, resource, sys, time
from nemo_plugins import cpu_compat
from nemo_plugins.logs import setup_logging
setup_logging()
cpu_compat.install()
start = time.perf_counter()
if sys.argv[1] == "gguf":
    from nemo_plugins.convert.sources import ModelSource, hf_dir
    hf_dir(ModelSource.parse("embedded:smollm2"))
else:
    from recipes import convert
    convert.run(convert.parse_args(["--src", "embedded:smollm2", "--to-megatron", sys.argv[2]]))
peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb}))
"""


def run_step(name: str, env: dict, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, name, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CASCADE_CACHE_DIR": os.path.join(tmp, "cache")}
        gguf = run_step("gguf", env)
        megatron = run_step("megatron", env, os.path.join(tmp, "megatron"))
    print(f"GGUF (Q4_1) -> HF fp32 safetensors: {gguf['seconds']:.1f} s, peak RSS {gguf['peak_rss_gb']:.2f} GiB")
    print(f"HF -> megatron dist checkpoint:     {megatron['seconds']:.1f} s, "
          f"peak RSS {megatron['peak_rss_gb']:.2f} GiB")


if __name__ == "__main__":
    main()
