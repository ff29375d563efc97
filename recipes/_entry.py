"""The one Hydra entry point shape every recipe shares: compose conf/<name>.yaml over its schema, build the typed
config once, log, run, tear down.

Bad input prints ONE line on stderr and exits with code 2, before any work:
- a config that does not fit its schema (an unknown key, a value of the wrong type, a missing value), which Hydra
  and OmegaConf find while composing: ``ConfigError: stage.distill.optimizer.lrr: unknown key (allowed here: ...)``;
- the project's own errors (``nemo_plugins.errors.ProjectError``: a setting that cannot work, unusable data, a
  damaged checkpoint, a NaN, a full disk, a busy output folder), which say everything in their message.
``HYDRA_FULL_ERROR=1`` shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from nemo_plugins import cpu_compat
from nemo_plugins.config.build import schema_message, typed_config
from nemo_plugins.config.schemas import register_schemas
from nemo_plugins.distributed import shutdown
from nemo_plugins.errors import ConfigError, ProjectError
from nemo_plugins.logs import setup_logging
from nemo_plugins.train.loop import Preempted

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ERROR_EXIT_CODE = 2
FULL_ERROR = "HYDRA_FULL_ERROR"


def one_line(err: ProjectError) -> str:
    """``ConfigError: <message>`` with any line breaks of the message folded."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def composition_error(err: HydraException | OmegaConfBaseException) -> ConfigError:
    """Hydra's composition error as the ConfigError it is, naming the key's full path (OmegaConf's ``full_key``,
    carried by the error or its cause); Hydra's own first line where there is no key (a missing config file)."""
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    first_line = str(err).strip().splitlines()[0]
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        # an override's value that fails inside (a list item) names its key relative to that value
        override = re.match(r"(?:Error merging override |Could not override ')([^=']+)", first_line)
        prefix = override.group(1) if override and not str(cause.full_key).startswith(override.group(1)) else ""
        return ConfigError(schema_message(cause, prefix))
    return ConfigError(first_line)


def compose_typed(name: str, *overrides: str) -> Any:
    """``conf/<name>.yaml`` with ``overrides`` composed as the entry point composes it, as its recipe's typed config
    (for code that composes without Hydra's command line: ``recipes.plan``, the tests); a composition error is the
    one-line ConfigError the entry point prints."""
    register_schemas()
    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return typed_config(compose(name, overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(err) from None


@contextlib.contextmanager
def project_errors(show_traceback: bool | None = None):
    """Around a recipe's work: a preempted run exits with the requeue code, a project error prints one line and
    exits with ERROR_EXIT_CODE, and the distributed state is torn down either way."""
    if show_traceback is None:
        show_traceback = os.environ.get(FULL_ERROR) == "1"
    try:
        yield
    except Preempted as stop:  # a checkpoint was written: exit with the code a job script reads as "requeue"
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except ProjectError as err:
        if show_traceback:
            raise
        print(one_line(err), file=sys.stderr)
        sys.exit(ERROR_EXIT_CODE)
    finally:
        shutdown()


def hydra_entry(config_name: str, run: Callable[[Any], object]) -> Callable[[], None]:
    """The console entry of a recipe: ``run`` receives the typed config (``nemo_plugins.config.schemas``)."""
    show_traceback = False

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def compose_and_run(cfg: DictConfig) -> None:
        setup_logging()
        cpu_compat.install()
        with project_errors(show_traceback):
            run(typed_config(cfg))

    def main() -> None:
        nonlocal show_traceback
        register_schemas()
        users_setting = os.environ.get(FULL_ERROR)
        show_traceback = users_setting == "1"
        # Hydra prints its composition errors over several lines and exits 1 unless HYDRA_FULL_ERROR is set, in which
        # case it raises them: they then reach this function, which prints them as the one-line ConfigError they are
        os.environ[FULL_ERROR] = "1"
        try:
            compose_and_run()
        except (HydraException, OmegaConfBaseException) as err:
            if show_traceback:
                raise
            with project_errors(show_traceback):
                raise composition_error(err) from None
        finally:
            if users_setting is None:
                del os.environ[FULL_ERROR]
            else:
                os.environ[FULL_ERROR] = users_setting

    return main
