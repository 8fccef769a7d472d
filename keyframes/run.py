"""Entry point: `python -m keyframes.run [overrides]`. The only module that sees Hydra.

It turns the composed config into typed settings, runs the stages in order
(validate -> shotlist -> jobs -> load -> generate + score + save -> manifest -> MLflow)
and returns the run's mean CLIP score for sweepers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from keyframes.config.schema import (
    CONF_DIR,
    Config,
    check_family,
    fit_to_model,
    typed_aspect_wins,
    validate,
)
from keyframes.errors import (
    ConfigError,
    DiskFull,
    Interrupted,
    KeyframesError,
    ModelUnavailableError,
    first_line,
)
from keyframes.outputs.processes import Processes
from keyframes.outputs.resume import config_hash, earlier_run

if TYPE_CHECKING:
    from keyframes.generation.render import RenderResult

log = logging.getLogger("keyframes")

ConfigStore.instance().store(name="config_schema", node=Config)

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
_task_started = False  # tells a config error (exit 2) from a crash inside the run (exit 1)
EXIT_BAD_INPUT = 2
EXIT_IMAGES_FAILED = 3
EXIT_DISK_FULL = 4
EXIT_INTERRUPTED = 130
MIN_FREE_BYTES = 1_000_000  # less than this where the run folder goes: not even Hydra's files fit
SWEEP_FILE = "sweep.json"  # in a sweep's directory: the parent run its jobs nest under


@dataclass(frozen=True)
class SweepJob:
    parent_run_id: str | None  # None when the store was unreachable as the sweep began
    experiment: str
    sweep_dir: str
    job_num: int


# An absolute path: the same configs whether this runs as `-m keyframes.run` or is imported.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    global _task_started
    _task_started = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    settings: Config = OmegaConf.to_object(cfg)
    sweep = None
    sweep_file = Path(hydra_cfg.sweep.dir) / SWEEP_FILE
    if hydra_cfg.mode == RunMode.MULTIRUN and sweep_file.is_file():  # written by SweepCallback
        info = json.loads(sweep_file.read_text())
        sweep = SweepJob(
            info["parent_run_id"], info["experiment"], hydra_cfg.sweep.dir, hydra_cfg.job.num
        )
    log_name = f"{hydra_cfg.job.name}.log"
    from keyframes.outputs.processes import claim_gpu, launched_processes

    procs = launched_processes(settings.device)  # accelerate launch: this process's place
    if hydra_cfg.mode == RunMode.MULTIRUN and settings.device in ("auto", "cuda"):
        claim_gpu(Path(hydra_cfg.sweep.dir))  # parallel sweep jobs: one GPU each
    try:
        if procs.count > 1 and hydra_cfg.mode == RunMode.MULTIRUN:
            raise ConfigError(
                "accelerate launch runs one job over several processes; for a sweep use "
                "hydra/launcher=local_gpus (one job per GPU) or hydra/launcher=slurm"
            )
        fresh = not sweep and not (run_dir / "manifest.json").exists()
        if procs.main and settings.resume and fresh:
            run_dir = _switch_to_unfinished_run(run_dir, config_hash(resolved), log_name)
        own_dir, run_dir = run_dir, procs.from_main(run_dir)  # one run directory for all
        if own_dir != run_dir:  # Hydra made this process its own: drop it
            _remove_if_untouched(own_dir, {".hydra", log_name})
        result = run(settings, run_dir, resolved, list(hydra_cfg.overrides.task), sweep, procs)
    except KeyframesError as e:
        _remove_if_untouched(run_dir, {".hydra", log_name, "config.yaml"})
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:  # before the first batch: while checking, planning or loading
        _remove_if_untouched(run_dir, {".hydra", log_name, "config.yaml"})
        print("interrupted before any keyframe was made", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except DiskFull as e:
        done = len([r for r in e.result.images if r["status"] == "ok"])
        print(
            f"error: disk full: no space left for {e.path}; {done} finished keyframes kept in "
            f"{run_dir}; the {e.left} still to make need about {e.needed_bytes / 1e6:.1f} MB. "
            f"Free space, then continue with the same command plus hydra.run.dir={run_dir}",
            file=sys.stderr,
        )
        sys.exit(EXIT_DISK_FULL)
    except Interrupted as e:
        done = e.result.summary.get("images", 0)
        print(
            f"interrupted: {done} finished keyframes kept in {run_dir}; continue with "
            f"the same command plus hydra.run.dir={run_dir} (or resume=true)",
            file=sys.stderr,
        )
        sys.exit(EXIT_INTERRUPTED)
    failed = [r for r in result.images if r["status"] != "ok"]
    if failed:
        lines = "\n".join(f"  {r['file']}: {r['error']}" for r in failed)
        print(f"{len(failed)} of {len(result.images)} images failed:\n{lines}", file=sys.stderr)
        if not sweep:  # in a sweep the other jobs go on; the parent run lists the failures
            sys.exit(EXIT_IMAGES_FAILED)
    return result.summary.get(settings.objective)


def run(
    cfg: Config,
    run_dir: Path,
    resolved: dict[str, Any],
    overrides: list[str],
    sweep: SweepJob | None = None,
    procs: Processes | None = None,
) -> RenderResult:
    """Everything a job does, given typed settings and its output directory."""
    from keyframes.config.styles import resolve_style
    from keyframes.shotlist.jobs import plan_for
    from keyframes.shotlist.load import load_shotlist

    started = time.time()
    cfg.style = resolve_style(cfg.style)  # style=file: the preset from the file
    sized = typed_aspect_wins(cfg, {k.lstrip("+~") for k in override_keys(overrides, False)})
    model_fit = fit_to_model(cfg)  # turbo, lightning: steps, guidance, size they were made for
    for note in sized + model_fit:
        log.warning(note)
    # config.yaml, the MLflow params and the config hash say what made the images: the style
    # a style file gave, the size and the model fit as changed above
    quality = {**resolved["quality"], "base_size": cfg.quality.base_size}
    resolved = {**resolved, "steps": cfg.steps, "cfg_scale": cfg.cfg_scale, "quality": quality,
                "width": cfg.width, "height": cfg.height, "style": asdict(cfg.style)}  # fmt: skip
    width, height = validate(cfg)
    shotlist = load_shotlist(cfg.shotlist, cfg.allow_external_paths)
    if shotlist.unknown_fields:
        log.warning(
            "shotlist %s: unknown fields kept as metadata: %s",
            shotlist.path,
            ", ".join(shotlist.unknown_fields),
        )
    jobs = plan_for(cfg, shotlist)
    from keyframes.conditioning.controlnet import check_controls

    for note in check_controls(jobs, cfg.controlnet):
        log.warning(note)
    controlled = cfg.controlnet.type is not None and any(job.control for job in jobs)
    from keyframes.pipeline.load import check_source, resolve_family

    check_source(cfg.model)
    cfg.model.family = resolve_family(cfg.model)  # sdxl | sd15: the pipeline class follows
    check_family(cfg, cfg.model.family, controlled)
    reference = None
    if controlled and cfg.consistency.name == "style_aligned":
        raise ConfigError(
            "consistency=style_aligned with ControlNet scenes is not supported: the reference "
            "shares every batch, and a ControlNet batch steers all its rows with one scale. "
            "Use one of them per run (consistency=ip_adapter works with ControlNet)."
        )
    if cfg.consistency.name == "ip_adapter":
        from keyframes.conditioning.ip_adapter import assign_references

        image = cfg.consistency.image
        if image is not None and not Path(image).expanduser().is_file():
            raise ConfigError(f"consistency.image={image}: no such file")
        image = str(Path(image).expanduser().resolve()) if image else None
        jobs = assign_references(jobs, shotlist, image)
    if cfg.consistency.name == "style_aligned":
        from keyframes.shotlist.jobs import reference_job

        reference = reference_job(jobs, cfg.consistency.reference)
    check_weights(cfg)
    # torch and diffusers load only once the input has passed: bad input fails in a second.
    from keyframes.conditioning.loras import check_loras, lora_records
    from keyframes.pipeline.load import resolve_placement
    from keyframes.pipeline.memory import plan_memory
    from keyframes.pipeline.speed import check_speed

    placement = resolve_placement(cfg.device, cfg.model.dtype)
    check_loras(cfg.loras)
    check_speed(cfg.speed, placement.device)
    refiner = cfg.upscale.name == "refiner" and not cfg.upscale.tiny
    memory = plan_memory(
        cfg.memory.name, placement.device, placement.dtype, cfg.model,
        cfg.batch_size, width, height, refiner,
    )  # fmt: skip
    log.info(
        "%s: %d scenes, %d images at %dx%d, %d steps, cfg %g, %s, style %s, on %s",
        shotlist.title, len(shotlist.scenes), len(jobs), width, height,
        cfg.steps, cfg.cfg_scale, cfg.sampler.name, cfg.style.name, placement.device,
    )  # fmt: skip
    log.info("memory mode %s (%s), speed %s", memory.mode, memory.reason, cfg.speed.name)
    main_process = (procs or Processes()).main
    earlier = earlier_run(run_dir, resolved, cfg.remake)  # before config.yaml is replaced
    from keyframes.generation.render import RunContext, render

    context = RunContext(
        cfg=cfg,
        shotlist=shotlist,
        jobs=jobs,
        reference=reference,
        loras=lora_records(cfg.loras),
        model_fit=model_fit,
        placement=placement,
        memory=memory,
        width=width,
        height=height,
        run_dir=run_dir,
        config_hash=config_hash(resolved),
        versions=package_versions(),
        overrides=overrides,
        started=started,
        # a sweep's jobs join their parent's experiment, so the UI can nest them
        experiment=sweep.experiment if sweep else cfg.mlflow.experiment_name or shotlist.title,
        sweep=asdict(sweep) if sweep else None,
        git_commit=_git_commit(),
        processes=procs or Processes(),
        earlier=earlier,
    )
    if main_process:
        _write_resolved_config(run_dir, resolved)
    try:
        result = render(context)
    except (Interrupted, DiskFull) as e:
        if main_process:  # the MLflow run shows what was finished, marked KILLED or FAILED
            _track(context, sweep)
        raise e
    if main_process:  # only the main process talks to MLflow, once every part is merged
        _track(context, sweep)
    return result


def check_weights(cfg: Config) -> None:
    """Every model, scorer and adapter weight the run needs, in one pass, before any loads:
    one message lists all that is missing."""
    from keyframes.conditioning.ip_adapter import missing_adapter
    from keyframes.pipeline import hub
    from keyframes.pipeline.load import missing_model
    from keyframes.scoring.clip import missing_scorer

    if not (cfg.model.tiny and cfg.scorer.model in (None, "tiny")):
        hub.reachable()  # once: an unreachable hub puts the loaders in offline mode, no retries
    problems = [missing_model(cfg.model), missing_scorer(cfg.scorer)]
    if cfg.consistency.name == "ip_adapter":
        problems.append(missing_adapter(cfg.consistency))
    problems = [p for p in problems if p]
    if problems:
        raise ModelUnavailableError("\n".join(problems))


def _track(ctx, sweep: SweepJob | None) -> None:
    """Mirror the run directory into MLflow. A store that cannot be reached costs a warning,
    not the run: the images and manifest are on disk, and keyframes.sync logs them later."""
    from keyframes.tracking.sync import sync_run_dir

    tracking = ctx.cfg.mlflow
    try:
        run_id, _ = sync_run_dir(ctx.run_dir, tracking)
    except Exception as e:  # noqa: BLE001 - any store failure; the run's files are safe
        log.warning(
            "MLflow store %s could not be written (%s). The keyframes and manifest are safe in "
            "%s; log them later with: uv run python -m keyframes.sync %s",
            tracking.tracking_uri, first_line(e), ctx.run_dir, ctx.run_dir,
        )  # fmt: skip
        return
    log.info("MLflow run %s in experiment %r (%s)", run_id, ctx.experiment, tracking.tracking_uri)
    if tracking.tracking_uri.startswith("sqlite:") and not sweep:
        log.info("review: uv run mlflow ui --backend-store-uri %s", tracking.tracking_uri)


def _switch_to_unfinished_run(fresh_dir: Path, wanted_hash: str, log_name: str) -> Path:
    """resume=true: carry on in the newest unfinished run directory beside this one that was
    made with the same settings, and drop the empty directory Hydra just made."""
    candidates = []
    for manifest in fresh_dir.parent.glob("*/manifest.json"):
        try:
            run = json.loads(manifest.read_text())["run"]
        except (ValueError, KeyError):
            continue
        if run.get("status") != "finished" and run.get("config_hash") == wanted_hash:
            candidates.append(manifest.parent)
    if not candidates:
        raise ConfigError(
            f"resume=true: no unfinished run with these settings in {fresh_dir.parent}. "
            "To continue a given run, pass its folder: hydra.run.dir=PATH"
        )
    target = max(candidates, key=lambda p: p.name)
    _remove_if_untouched(fresh_dir, {".hydra", log_name})
    handler = logging.FileHandler(target / log_name)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    log.info("resume=true: continuing %s", target)
    return target


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


class SweepCallback(Callback):
    """Around a multirun (`-m`): a parent MLflow run before the first job; the X/Y grids, the
    summary table, plots and best-job tags on it after the last. Named in conf/config.yaml."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            begin_sweep(config)
        except KeyframesError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        end_sweep(config)


def override_keys(overrides: list[str], sweeps_only: bool = True) -> list[str]:
    """The keys of the overrides that sweep (or of all of them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.get_key_element() for o in parsed if o.is_sweep_override() or not sweeps_only]


def begin_sweep(config: DictConfig) -> None:
    from keyframes.shotlist.load import load_shotlist
    from keyframes.tracking.store import start_parent_run

    tracking = OmegaConf.to_object(config.mlflow)
    experiment = tracking.experiment_name or load_shotlist(config.shotlist, True).title
    sweep_dir = Path(config.hydra.sweep.dir)
    keys = override_keys(list(config.hydra.overrides.task))
    keys += [k for k in config.hydra.sweeper.get("params") or {} if k not in keys]  # Optuna
    try:
        parent = start_parent_run(
            tracking,
            experiment,
            run_name=f"sweep {sweep_dir.name}: {' x '.join(keys) or 'one job'}",
            tags={
                "keyframes.sweep_dir": str(sweep_dir.resolve()),
                "keyframes.swept_keys": ",".join(keys),
                "keyframes.overrides": json.dumps(list(config.hydra.overrides.task)),
            },
        )
    except Exception as e:  # noqa: BLE001 - the sweep runs without its parent run
        parent = None
        log.warning("MLflow store %s unreachable (%s): sweep runs without a parent run",
                    tracking.tracking_uri, first_line(e))  # fmt: skip
    sweep_dir.mkdir(parents=True, exist_ok=True)
    info = {"parent_run_id": parent, "experiment": experiment, "swept_keys": keys}
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log.info("sweep over %s: MLflow parent run %s in %r", keys, parent, experiment)


def end_sweep(config: DictConfig) -> None:
    from keyframes.tracking.report import build_report
    from keyframes.tracking.results import describe, job_from_manifest
    from keyframes.tracking.store import finish_parent_run

    sweep_dir = Path(config.hydra.sweep.dir)
    info = json.loads((sweep_dir / SWEEP_FILE).read_text())
    manifests = sorted(sweep_dir.glob("*/manifest.json"), key=lambda p: _job_order(p.parent.name))
    jobs = [job_from_manifest(path) for path in manifests]
    summary_dir = sweep_dir / "summary"
    objective = config.objective  # what the sweeper optimised: the best is ranked by it too
    report = build_report(jobs, summary_dir, objective)
    log.info("sweep summary (%s):\n%s", summary_dir, report.text)
    tags = {}
    if report.best:
        tags |= {"best_job": describe(report.best, report.keys), "best_run_id": report.best.run_id,
                 "best_by": objective}  # fmt: skip
        log.info("best by %s: %s", objective, tags["best_job"])
    if report.fastest:
        tags |= {
            "fastest_good_job": describe(report.fastest, report.keys),
            "fastest_good_run_id": report.fastest.run_id,
        }
        log.info("fastest within 1 CLIP point of the best: %s", tags["fastest_good_job"])
    parent = info["parent_run_id"]
    if parent is None:
        log.warning("no MLflow parent run; the summary is in %s", summary_dir)
        return
    columns = {
        name: [_number_or_text(row[i]) for row in report.rows]
        for i, name in enumerate(report.header)
    }
    statuses = {json.loads(p.read_text())["run"].get("status") for p in manifests}
    try:
        finish_parent_run(
            OmegaConf.to_object(config.mlflow),
            parent,
            tags={k: v for k, v in tags.items() if v},
            metrics={"jobs": len(jobs)},
            table=columns,
            artifacts=[
                (summary_dir / "summary.csv", None),
                (summary_dir / "grids", "grids"),
                (summary_dir / "plots", "plots"),
            ],
            status="FINISHED" if statuses <= {"finished"} else "FAILED",
        )
    except Exception as e:  # noqa: BLE001 - the summary is on disk either way
        log.warning("could not log the sweep summary to MLflow (%s); it is in %s",
                    first_line(e), summary_dir)  # fmt: skip
        return
    log.info("compare again: uv run python -m keyframes.compare --parent %s", parent)


def _job_order(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 30, name)


def _number_or_text(cell: str) -> float | str:
    try:
        return float(cell)
    except ValueError:
        return cell


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends a run the way Ctrl-C does: cleanly


def _check_keys(argv: list[str]) -> None:
    """An unknown key (a typo, with or without Hydra's `+`) is exit 2 before Hydra runs."""
    from hydra._internal.utils import get_args_parser  # Hydra's own command-line parser

    from keyframes.config.overrides import check_override_keys

    args, _ = get_args_parser().parse_known_args(argv)
    try:
        check_override_keys(args.overrides, Config, CONF_DIR)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    _check_free_space(args.overrides, multirun=args.multirun)


def _check_free_space(overrides: list[str], multirun: bool) -> None:
    """A disk already full where the run folder goes: one line, before Hydra writes (and
    fails halfway through) its own files there."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    where = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")), "outputs")
    path = Path(where).expanduser().absolute()
    while not path.exists():  # the nearest folder that exists: the one that would hold it
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        print(f"error: disk full: {free / 1e6:.2f} MB free at {path}, where the run folder "
              f"{where} would go. Free space, or set hydra.run.dir to a folder on another disk.",
              file=sys.stderr)  # fmt: skip
        sys.exit(EXIT_DISK_FULL)


def cli() -> None:
    """Hydra exits 1 on a config it cannot compose; that is bad input, so exit 2 instead."""
    signal.signal(signal.SIGTERM, _interrupt)
    # Hydra's parser wants flags before the overrides; let `experiment=smoke -m steps=2,3` work.
    flags = [a for a in sys.argv[1:] if a in ("-m", "--multirun")]
    sys.argv[1:] = flags + [a for a in sys.argv[1:] if a not in flags]
    try:
        _check_keys(sys.argv[1:])
        main()
    except SystemExit as e:
        if e.code == 1 and not _task_started:
            sys.exit(EXIT_BAD_INPUT)
        raise


if __name__ == "__main__":
    cli()
