"""The typed schema registered with Hydra, and composition outside a Hydra app (scripts, tests):
the same settings `python -m keyframes.run` would get from the same overrides."""

from __future__ import annotations

import contextlib

from hydra.core.config_store import ConfigStore

from keyframes.config.schema import CONF_DIR, OPTION_SCHEMAS, Config
from keyframes.errors import ConfigError, first_line


def register_schema() -> None:
    """conf/config.yaml names `config_schema` first in its defaults: the types checked at
    composition. An option with settings of its own names `<option>_schema` in its group
    (Hydra's structured-config tutorial: one dataclass per option, stored in its group)."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for group, options in OPTION_SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=group, name=f"{option}_schema", node=schema)


def composed_or_refused(overrides: list[str], typed: bool = True):
    """The settings these overrides compose to (typed=False: the DictConfig a Hydra task
    gets); where they do not (an option that does not exist, a value of the wrong type), a
    ConfigError saying what Hydra or OmegaConf found."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with composer(typed=typed) as settings_of:
            return settings_of(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        cause = f" ({first_line(e.__cause__)})" if e.__cause__ else ""
        raise ConfigError(f"{first_line(e)}{cause}") from None


def compose(overrides: list[str]) -> Config:
    with composer() as settings_of:
        return settings_of(overrides)


@contextlib.contextmanager
def composer(hydra_config: bool = False, typed: bool = True):
    """A function from overrides to settings, as many times as needed under one Hydra
    initialisation; each call raises on its own when its overrides do not compose.
    hydra_config: the composed DictConfig with Hydra's own settings, not the typed Config;
    typed=False: the DictConfig a Hydra task gets (no Hydra settings)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        if hydra_config:
            yield lambda overrides: hydra_compose("config", overrides, return_hydra_config=True)
        elif not typed:
            yield lambda overrides: hydra_compose("config", overrides)
        else:
            yield lambda overrides: OmegaConf.to_object(hydra_compose("config", overrides))


def sweep_jobs(overrides: list[str]) -> list[list[str]] | None:
    """The override lists of the jobs a multirun will start, in Hydra's order, when Hydra's
    basic sweeper makes them (every combination of the swept values); None where another
    sweeper (Optuna) picks each job as it goes."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        [jobs] = BasicSweeper.split_arguments(
            OverridesParser.create().parse_overrides(overrides), max_batch_size=None
        )
    except HydraException:  # a range or interval: only a search sweeper can take it
        return None
    with composer(hydra_config=True) as settings_of:
        try:
            first = settings_of(jobs[0])
        except HydraException:
            return jobs  # the check of each job says what is wrong
    return jobs if first.hydra.sweeper._target_.endswith(".BasicSweeper") else None
