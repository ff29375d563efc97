"""Slurm host lists (`node[1-3,7],login0`) expanded the way `scontrol show hostnames` does: shared by the fakes."""

from __future__ import annotations

import re


def expand(hostlist: str) -> list[str]:
    names = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            names.append(plain)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            width = len(low)
            names += [f"{prefix}{n:0{width}d}" for n in range(int(low), int(high or low) + 1)]
    return names
