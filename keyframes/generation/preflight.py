"""The pre-flight's checks that are not a method's own (the recipe's setup runs them all in one
pass before anything heavy loads): A1111 syntax keyframes cannot weigh, every weight the run
needs (model, scorer, adapters); and what a run records about where it ran."""

from __future__ import annotations

import logging
import sys
from importlib import metadata
from pathlib import Path

from keyframes.conditioning.base import Method
from keyframes.config.schema import ModelConfig, ScorerConfig
from keyframes.errors import ConfigError, ModelUnavailableError
from keyframes.shotlist.jobs import ImageJob

log = logging.getLogger("keyframes")

PACKAGES = (
    "keyframes",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "open_clip_torch",
    "mlflow",
    "hydra-core",
)


def check_prompt_syntax(jobs: list[ImageJob]) -> None:
    """A1111 syntax keyframes does not do (prompt editing, alternation, AND), in any scene's
    prompt or negative prompt: one ConfigError naming each."""
    from keyframes.shotlist.weighting import prompt_problems

    problems, seen = [], set()
    for job in jobs:
        for kind, text in (("prompt", job.prompt), ("negative prompt", job.negative_prompt)):
            if (kind, text) not in seen:
                seen.add((kind, text))
                problems += prompt_problems(text, f"scene {job.scene_id}: {kind}")
    if problems:
        raise ConfigError.listing(
            "prompts keyframes cannot weigh (prompt_weighting=a1111):", problems
        )


def check_weights(model: ModelConfig, scorer: ScorerConfig, methods: list[Method]) -> None:
    """Every model, scorer and adapter weight the run needs, in one pass, before any loads:
    one message lists all that is missing."""
    from keyframes.pipeline import hub
    from keyframes.pipeline.load import missing_model
    from keyframes.scoring.clip import missing_scorer

    if not ((model.path or model.architecture) and scorer.model in (None, "tiny")):
        hub.reachable()  # once: an unreachable hub puts the loaders in offline mode, no retries
    problems = [missing_model(model), missing_scorer(scorer)]
    problems += [method.missing_weights() for method in methods]
    problems = [p for p in problems if p]
    if problems:
        raise ModelUnavailableError("\n".join(problems))


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
