"""The typed schema registered with Hydra, and composition outside a Hydra app (scripts, tests):
the same settings `python -m keyframes.run` would get from the same overrides."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from keyframes.config.schema import CONF_DIR, Config


def register_schema() -> None:
    """conf/config.yaml names `config_schema` first in its defaults: the types checked at
    composition."""
    ConfigStore.instance().store(name="config_schema", node=Config)


def compose(overrides: list[str]) -> Config:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=overrides))
