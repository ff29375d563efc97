"""The one Hydra entry point shape every recipe shares: compose conf/<name>.yaml, log, run, tear down.

The project's own errors (``nemo_plugins.errors.ProjectError``: a bad config, unusable data, a damaged checkpoint,
a NaN, a full disk, a busy output folder) say everything in their message, so they print as ONE line on stderr
and exit with code 2, caught here before Hydra would wrap them in a traceback; ``HYDRA_FULL_ERROR=1`` shows the
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig

from nemo_plugins import cpu_compat
from nemo_plugins.distributed import shutdown
from nemo_plugins.errors import ProjectError
from nemo_plugins.logs import setup_logging
from nemo_plugins.train.loop import Preempted

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ERROR_EXIT_CODE = 2


def one_line(err: ProjectError) -> str:
    """``ConfigError: <message>`` with any line breaks of the message folded."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


@contextlib.contextmanager
def project_errors():
    """Around a recipe's work: a preempted run exits with the requeue code, a project error prints one line and
    exits with ERROR_EXIT_CODE, and the distributed state is torn down either way."""
    try:
        yield
    except Preempted as stop:  # a checkpoint was written: exit with the code a job script reads as "requeue"
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except ProjectError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(one_line(err), file=sys.stderr)
        sys.exit(ERROR_EXIT_CODE)
    finally:
        shutdown()


def hydra_entry(config_name: str, run: Callable[[DictConfig], object]) -> Callable[[], None]:
    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        setup_logging()
        cpu_compat.install()
        with project_errors():
            run(cfg)

    return main
