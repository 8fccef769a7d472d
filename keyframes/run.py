"""Entry point: `python -m keyframes.run [overrides]`. The only module that sees Hydra.

It turns the composed config into typed settings, runs the stages in order
(validate -> shotlist -> jobs -> load -> generate + score + save -> manifest -> MLflow)
and returns the run's mean CLIP score for sweepers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from keyframes.config import Config, validate
from keyframes.errors import KeyframesError

log = logging.getLogger("keyframes")

ConfigStore.instance().store(name="config_schema", node=Config)

PACKAGES = (
    "keyframes",
    "torch",
    "diffusers",
    "transformers",
    "open_clip_torch",
    "mlflow",
    "hydra-core",
)
_task_started = False  # tells a config error (exit 2) from a crash inside the run (exit 1)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    global _task_started
    _task_started = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    settings: Config = OmegaConf.to_object(cfg)
    try:
        return run(settings, run_dir, resolved, list(hydra_cfg.overrides.task))
    except KeyframesError as e:
        _remove_if_untouched(run_dir, {".hydra", f"{hydra_cfg.job.name}.log", "config.yaml"})
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(cfg: Config, run_dir: Path, resolved: dict[str, Any], overrides: list[str]) -> float | None:
    """Everything a job does, given typed settings and its output directory."""
    from keyframes.plan import plan_jobs
    from keyframes.shotlist import load_shotlist

    started = time.time()
    width, height = validate(cfg)
    shotlist = load_shotlist(cfg.shotlist)
    if shotlist.unknown_fields:
        log.warning(
            "shotlist %s: unknown fields kept as metadata: %s",
            shotlist.path,
            ", ".join(shotlist.unknown_fields),
        )
    jobs = plan_jobs(
        shotlist,
        style_prompt=cfg.style.prompt,
        style_negative=cfg.style.negative_prompt,
        negative_preset=cfg.negative.prompt,
        run_seed=cfg.seed,
        seed_mode=cfg.seed_mode,
        takes=cfg.takes,
    )
    # torch and diffusers load only once the input has passed: bad input fails in a second.
    from keyframes.models import check_source, resolve_placement

    placement = resolve_placement(cfg.device, cfg.model.dtype)
    check_source(cfg.model)
    log.info(
        "%s: %d scenes, %d images at %dx%d, %d steps, cfg %g, %s, style %s, on %s",
        shotlist.title, len(shotlist.scenes), len(jobs), width, height,
        cfg.steps, cfg.cfg_scale, cfg.sampler.name, cfg.style.name, placement.device,
    )  # fmt: skip
    from keyframes.render import RunContext, render

    context = RunContext(
        cfg=cfg,
        shotlist=shotlist,
        jobs=jobs,
        placement=placement,
        width=width,
        height=height,
        run_dir=run_dir,
        config_hash=config_hash(resolved),
        versions=package_versions(),
        overrides=overrides,
        started=started,
    )
    _write_resolved_config(run_dir, resolved)
    result = render(context)
    return _track(context, result, resolved)


def _track(ctx, result, resolved: dict[str, Any]) -> float | None:
    """Mirror the finished run directory into MLflow, then note the run id in the manifest."""
    from keyframes.tracking import RunRecord, log_run

    cfg = ctx.cfg
    tags = {
        "keyframes.model": cfg.model.name,
        "keyframes.model_source": result.manifest_run["model_source"],
        "keyframes.style": cfg.style.name,
        "keyframes.sampler": cfg.sampler.name,
        "keyframes.quality": cfg.quality.name,
        "keyframes.device": ctx.placement.device,
        "keyframes.dtype": result.manifest_run["dtype"],
        "keyframes.shotlist": ctx.shotlist.path,
        "keyframes.run_dir": str(ctx.run_dir.resolve()),
        "keyframes.config_hash": ctx.config_hash,
        **{f"version.{name}": v for name, v in ctx.versions.items()},
    }
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    per_image = ("clip_score", "clip_score_prompt", "seconds", "vram_peak_gb", "rss_peak_gb")
    record = RunRecord(
        experiment=cfg.mlflow.experiment_name or ctx.shotlist.title,
        run_name=f"{cfg.style.name}-{cfg.sampler.name}-{cfg.steps}steps-cfg{cfg.cfg_scale:g}",
        params=flatten(resolved),
        tags=tags,
        image_metrics=[{k: r[k] for k in per_image if r[k] is not None} for r in result.images],
        summary=result.summary,
        artifacts=[
            (ctx.run_dir / "keyframes", "keyframes"),
            (ctx.run_dir / "contact_sheet.png", None),
            (ctx.run_dir / "manifest.json", None),
            (ctx.run_dir / "config.yaml", None),
            (ctx.run_dir / ".hydra", "hydra"),
        ],
        start_ms=int(ctx.started * 1000),
        end_ms=int(time.time() * 1000),
    )
    run_id = log_run(cfg.mlflow, record)
    result.manifest_run["mlflow"] = {
        "tracking_uri": cfg.mlflow.tracking_uri,
        "experiment": record.experiment,
        "run_id": run_id,
    }
    result.write_manifest()
    log.info(
        "MLflow run %s in experiment %r (%s)", run_id, record.experiment, cfg.mlflow.tracking_uri
    )
    if cfg.mlflow.tracking_uri.startswith("sqlite:"):
        log.info("review: uv run mlflow ui --backend-store-uri %s", cfg.mlflow.tracking_uri)
    return result.summary.get("clip_score_mean")


def config_hash(resolved: dict[str, Any]) -> str:
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'model': {'id': 'x'}} -> {'model.id': 'x'}; lists and None as JSON."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _git_commit() -> str | None:
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


def _write_resolved_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))


def _remove_if_untouched(run_dir: Path, bookkeeping: set[str]) -> None:
    """Bad input leaves nothing behind: drop the run directory if it holds only bookkeeping
    (Hydra's .hydra/ and log, the resolved config), i.e. no image was made."""
    if not run_dir.is_dir() or not set(os.listdir(run_dir)) <= bookkeeping:
        return
    shutil.rmtree(run_dir)


def cli() -> None:
    """Hydra exits 1 on a config it cannot compose; that is bad input, so exit 2 instead."""
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _task_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    cli()
