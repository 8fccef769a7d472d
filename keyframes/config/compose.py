"""The typed schema registered with Hydra, and composition outside a Hydra app (scripts, tests):
the same settings `python -m keyframes.run` would get from the same overrides."""

from __future__ import annotations

import contextlib

from hydra.core.config_store import ConfigStore

from keyframes.config.schema import CONF_DIR, Config


def register_schema() -> None:
    """conf/config.yaml names `config_schema` first in its defaults: the types checked at
    composition."""
    ConfigStore.instance().store(name="config_schema", node=Config)


def compose(overrides: list[str]) -> Config:
    with composer() as settings_of:
        return settings_of(overrides)


@contextlib.contextmanager
def composer():
    """A function from overrides to settings, as many times as needed under one Hydra
    initialisation; each call raises on its own when its overrides do not compose."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield lambda overrides: OmegaConf.to_object(hydra_compose("config", overrides=overrides))


def sweep_jobs(overrides: list[str]) -> list[list[str]] | None:
    """The override lists of the jobs a multirun will start, in Hydra's order, when Hydra's
    basic sweeper makes them (every combination of the swept values); None where another
    sweeper (Optuna) picks each job as it goes."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        [jobs] = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides),
                                              max_batch_size=None)  # fmt: skip
    except HydraException:  # a range or interval: only a search sweeper can take it
        return None
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            first = hydra_compose("config", overrides=jobs[0], return_hydra_config=True)
        except HydraException:
            return jobs  # the check of each job says what is wrong
    return jobs if first.hydra.sweeper._target_.endswith(".BasicSweeper") else None
