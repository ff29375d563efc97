"""The one Hydra entry point shape every recipe shares: compose conf/<name>.yaml, log, run, tear down."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig

from nemo_plugins.distributed import shutdown
from nemo_plugins.logs import setup_logging
from nemo_plugins.train.loop import Preempted

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def hydra_entry(config_name: str, run: Callable[[DictConfig], object]) -> Callable[[], None]:
    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        setup_logging()
        try:
            run(cfg)
        except Preempted as stop:  # a checkpoint was written: exit with the code a job script reads as "requeue"
            print(stop, file=sys.stderr)
            sys.exit(stop.exit_code)
        finally:
            shutdown()

    return main
