"""Entry point: `python -m keyframes.run [overrides]`. The only module that sees Hydra's job.

Hydra composes the config; the recipe's setup resolves it into the frozen plan and checks
everything the run needs; its generate makes the keyframes in a generation session; tracking
mirrors the run directory into MLflow; the run's objective goes back to the sweeper.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from keyframes.config.compose import register_schema
from keyframes.config.overrides import override_keys
from keyframes.config.schema import CONF_DIR, Config
from keyframes.errors import ConfigError, KeyframesError
from keyframes.generation.outcome import DiskFull, Interrupted
from keyframes.outputs.files import remove_if_untouched, run_folder_problem
from keyframes.outputs.folder_lock import LOCK_NAME, hold_folder
from keyframes.outputs.manifest import read_run
from keyframes.outputs.records import SweepRecord
from keyframes.tracking.sweep import close_stopped_sweep, sweep_job

log = logging.getLogger("keyframes")

register_schema()

_in_job = False  # a stop signal inside a job stops it at once; elsewhere it waits (_interrupt)
_stop_requested = False
_stop_reason: str | None = None  # why a job was stopped, where its scheduler said (SLURM)
EXIT_BAD_INPUT = 2
EXIT_IMAGES_FAILED = 3
EXIT_DISK_FULL = 4
EXIT_INTERRUPTED = 130
MIN_FREE_BYTES = 1_000_000  # less than this where the run folder goes: not even Hydra's files fit


# An absolute path: the same configs whether this runs as `-m keyframes.run` or is imported.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    global _in_job
    _in_job = True
    try:
        with slurm_signals():
            return _job(cfg)
    finally:
        _in_job = False


@contextlib.contextmanager
def slurm_signals():
    """In a SLURM job (a sweep through hydra/launcher=slurm), SLURM's stop signals end the job
    the way Ctrl-C does, saying why: SIGUSR2 comes hydra.launcher.signal_delay_s before the
    time limit, SIGTERM at it or on scancel. (submitit would let SIGTERM pass, and SLURM then
    kills the job without a word.)"""
    global _stop_reason
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        yield
        return
    _stop_reason = None
    end = slurm_end_time(job)
    task = os.environ.get("SLURM_ARRAY_JOB_ID", job) + (
        f"_{os.environ['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_TASK_ID" in os.environ else ""
    )

    def stop(signum, frame):
        global _stop_reason
        if _stop_reason is not None:  # SLURM signals the step and its tasks: stop once
            return
        if signum == signal.SIGUSR2 or (end is not None and time.time() >= end - 10):
            _stop_reason = f"SLURM job {task} reached its time limit (hydra.launcher.timeout_min)"
        else:
            _stop_reason = f"SLURM job {task} was cancelled (scancel)"
        raise KeyboardInterrupt

    before = {s: signal.signal(s, stop) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def slurm_end_time(job: str) -> float | None:
    """When SLURM will stop this job (seconds since the epoch), or None if squeue cannot say."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return time.mktime(time.strptime(out.splitlines()[0], "%Y-%m-%dT%H:%M:%S"))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _job(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep = sweep_job(hydra_cfg.sweep.dir, hydra_cfg.job.num) if multirun else None
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log_name = f"{hydra_cfg.job.name}.log"
    sweep_dir = Path(hydra_cfg.sweep.dir) if multirun else None
    try:
        _stop_if_requested()  # a stop that came while Hydra composed this job
        result = run(cfg, run_dir, list(hydra_cfg.overrides.task), sweep, log_name, sweep_dir)
    except (KeyframesError, KeyboardInterrupt, DiskFull, Interrupted) as e:
        sys.exit(_stopped(e, run_dir, log_name))
    failed = [r for r in result.images if not r.ok]
    if failed:
        lines = "\n".join(f"  {r.file}: {r.error}" for r in failed)
        print(f"{len(failed)} of {len(result.images)} images failed:\n{lines}", file=sys.stderr)
        if not sweep:  # in a sweep the other jobs go on; the parent run lists the failures
            sys.exit(EXIT_IMAGES_FAILED)
    return result.summary.get(cfg.objective)


def run(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    sweep: SweepRecord | None,
    log_name: str,
    sweep_dir: Path | None,
):
    """One job: the recipe's setup (every check), the run folder, generate, track (sweep_dir:
    the multirun's folder)."""
    from keyframes.generation.recipe import KeyframesRecipe, RunPlace
    from keyframes.outputs.processes import claim_gpu, launched_processes

    composed: Config = OmegaConf.to_object(cfg)
    procs = launched_processes(composed.device)  # accelerate launch: this process's place
    if sweep_dir and composed.device in ("auto", "cuda"):
        claim_gpu(sweep_dir)  # parallel sweep jobs: one GPU each
    if procs.count > 1 and sweep_dir:
        raise ConfigError(
            "accelerate launch runs one job over several processes; for a sweep use "
            "hydra/launcher=local_gpus (one job per GPU) or hydra/launcher=slurm"
        )
    typed = {k.lstrip("+~") for k in override_keys(overrides, False)}
    fresh = not sweep and not (run_dir / "manifest.json").exists()
    switching = procs.main and composed.resume and fresh  # resume=true picks the folder
    with contextlib.ExitStack() as held:
        # the main process holds the folder: a second run into it stops here, touching nothing
        if procs.main and not switching:
            held.enter_context(hold_folder(run_dir))
        recipe = KeyframesRecipe().setup(composed, typed)
        if switching:
            run_dir = _switch_to_unfinished_run(run_dir, recipe.plan.config_hash, log_name)
            held.enter_context(hold_folder(run_dir))
        own_dir, run_dir = run_dir, procs.from_main(run_dir)  # one run directory for all
        if own_dir != run_dir:  # Hydra made this process its own: drop it
            remove_if_untouched(own_dir, {".hydra", log_name})
        if problem := run_folder_problem(run_dir):  # resume=true may have chosen another
            raise ConfigError(problem)
        experiment = sweep.experiment if sweep else composed.mlflow.experiment_name
        place = RunPlace(run_dir, tuple(overrides), experiment, sweep, procs)
        return _generate_and_track(recipe, place, composed.mlflow, sweep)


def _generate_and_track(recipe, place, mlflow, sweep: SweepRecord | None):
    """The run, then its MLflow mirror (also of a run that stopped: marked KILLED or FAILED);
    only the main process talks to MLflow, once every part is merged."""
    main = place.processes.main
    try:
        result = recipe.generate(place)
    except (Interrupted, DiskFull) as stop:
        if main:
            if _stop_reason and stop.result.run.error is None:  # SLURM said why
                stop.result.run.error = _stop_reason
                stop.result.write_manifest()
            _track(place.run_dir, mlflow, stop.result.run.experiment, sweep, stop.result)
        raise
    if main:
        _track(place.run_dir, mlflow, result.run.experiment, sweep, result)
    return result


def _track(run_dir: Path, mlflow, experiment: str, sweep: SweepRecord | None, result) -> None:
    """Mirror the run folder into MLflow; a stop while it logs leaves every keyframe on disk,
    and the message says how to finish the logging."""
    global _in_job
    from keyframes.tracking.sync import load_tracking, track_run

    # A stop during MLflow's imports waits for them: CPython 3.11 remembers a KeyboardInterrupt
    # raised inside code an import runs with exec (dataclasses, namedtuples) even when it is
    # caught, and then ends the process by SIGINT instead of with its exit code.
    _in_job, in_job = False, _in_job
    try:
        load_tracking()
    finally:
        _in_job = in_job
    try:
        _stop_if_requested()
        track_run(run_dir, mlflow, experiment, sweep is not None)
    except KeyboardInterrupt:
        raise Interrupted(result, while_tracking=True) from None


def _stopped(error: BaseException, run_dir: Path | None = None, log_name: str = "") -> int:
    """The message and exit code of a command or job that stopped (run_dir: the job's folder;
    None before Hydra ran, or between a sweep's jobs). Bad input leaves nothing behind."""
    if run_dir and isinstance(error, KeyframesError | KeyboardInterrupt):
        remove_if_untouched(run_dir, {".hydra", log_name, "config.yaml", LOCK_NAME})
    if isinstance(error, KeyframesError):
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DISK_FULL if isinstance(error, NoSpaceForRun) else EXIT_BAD_INPUT
    if isinstance(error, KeyboardInterrupt):  # while checking, planning or loading
        where = "before any keyframe was made" if run_dir else ""
        print(f"interrupted {where}".strip(), file=sys.stderr)
        return EXIT_INTERRUPTED
    run_dir = error.result.run_dir  # the folder the run continued in (resume=true)
    if isinstance(error, DiskFull):
        done = len([r for r in error.result.images if r.ok])
        print(
            f"error: disk full: no space left for {error.path}; {done} finished keyframes kept "
            f"in {run_dir}; the {error.left} still to make need about "
            f"{error.needed_bytes / 1e6:.1f} MB. Free space, then continue with the same "
            f"command plus hydra.run.dir={run_dir}",
            file=sys.stderr,
        )
        return EXIT_DISK_FULL
    done = len([r for r in error.result.images if r.ok])
    if error.while_tracking:
        complete = " (the run is complete)" if error.result.run.status == "finished" else ""
        print(
            f"interrupted while logging to MLflow: {done} finished keyframes are kept in "
            f"{run_dir}{complete}. Finish the MLflow run with: "
            f"uv run python -m keyframes.sync {run_dir}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(
        f"interrupted: {done} finished keyframes kept in {run_dir}; continue with "
        f"the same command plus hydra.run.dir={run_dir} (or resume=true)",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _switch_to_unfinished_run(fresh_dir: Path, wanted_hash: str, log_name: str) -> Path:
    """resume=true: carry on in the newest unfinished run directory beside this one that was
    made with the same settings, and drop the empty directory Hydra just made."""
    candidates = []
    for manifest in fresh_dir.parent.glob("*/manifest.json"):
        run = read_run(manifest)
        if run and run.status != "finished" and run.config_hash == wanted_hash:
            candidates.append(manifest.parent)
    if not candidates:
        raise ConfigError(
            f"resume=true: no unfinished run with these settings in {fresh_dir.parent}. "
            "To continue a given run, pass its folder: hydra.run.dir=PATH"
        )
    target = max(candidates, key=lambda p: p.name)
    remove_if_untouched(fresh_dir, {".hydra", log_name})
    handler = logging.FileHandler(target / log_name)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    log.info("resume=true: continuing %s", target)
    return target


def _interrupt(signum, frame):
    """SIGTERM ends a run the way Ctrl-C does: cleanly. Inside a job it stops at once (the
    render loop keeps what is finished). In Hydra's own code (composing a sweep's next job) an
    exception thrown into OmegaConf's half-done work comes out as an unrelated error, exit 1;
    there the stop waits for the next safe point, unless the signal comes a second time."""
    global _stop_requested
    if _in_job or _stop_requested:
        raise KeyboardInterrupt
    _stop_requested = True


def _stop_if_requested() -> None:
    if _stop_requested:
        raise KeyboardInterrupt


class NoSpaceForRun(KeyframesError):
    """The disk where the run folder would go is full (exit 4, not 2)."""


def hydra_arguments(argv: list[str]) -> tuple[list[str], bool]:
    """The overrides and whether -m/--multirun was given, from a command line in Hydra's form
    (its flags, as `--help` lists them, skipped with their values)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("overrides", nargs="*")
    for names in (("-m", "--multirun"), ("-h", "--help"), ("--hydra-help",), ("--version",)):
        parser.add_argument(*names, action="store_true")
    for names in (("-r", "--run"), ("--resolve",), ("-sc", "--shell-completion")):
        parser.add_argument(*names, action="store_true")
    for names in (("-cp", "--config-path"), ("-cn", "--config-name"), ("-cd", "--config-dir")):
        parser.add_argument(*names)
    for names in (("-c", "--cfg"), ("-p", "--package"), ("--experimental-rerun",)):
        parser.add_argument(*names)
    parser.add_argument("-i", "--info", nargs="?")
    args, _ = parser.parse_known_intermixed_args(argv)
    return args.overrides, args.multirun


def _check_command_line(argv: list[str]) -> None:
    """Before Hydra runs: an unknown key (a typo, with or without Hydra's `+`), a value that
    does not compose or does not fit its type, every job of a sweep, the run folder. Raises
    a KeyframesError (exit 2; NoSpaceForRun: 4)."""
    from keyframes.config.compose import composed_or_refused
    from keyframes.config.overrides import check_override_keys

    overrides, multirun = hydra_arguments(argv)
    check_override_keys(overrides, Config, CONF_DIR)
    if not (multirun and _check_sweep(overrides)):
        composed_or_refused(overrides)
    _check_run_folder(overrides, multirun=multirun)


def _check_sweep(overrides: list[str]) -> bool:
    """Every job of a sweep is checked before the first starts: a bad value in job 5 must
    not stop the sweep after four jobs' work. False where a search sweeper (Optuna) picks
    the jobs as it goes: they cannot be listed."""
    from keyframes.config.compose import sweep_jobs
    from keyframes.generation.recipe import check_sweep

    jobs = sweep_jobs(overrides)
    if jobs is None:
        return False
    if len(jobs) > 1:
        log.info("checking the %d jobs of this sweep", len(jobs))
    check_sweep(jobs, override_keys(overrides))
    return True


def _check_run_folder(overrides: list[str], multirun: bool) -> None:
    """Where the run folder goes: writable, not a dangling link or a file, and not a full disk.
    One line, before Hydra writes (and fails halfway through) its own files there."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    where = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")), "outputs")
    path = Path(where).expanduser().absolute()
    if problem := run_folder_problem(path):
        raise ConfigError(f"{key}={where}: {problem}")
    while not path.exists():  # the nearest folder that exists: the one that would hold it
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise NoSpaceForRun(
            f"disk full: {free / 1e6:.2f} MB free at {path}, where the run folder "
            f"{where} would go. Free space, or set hydra.run.dir to a folder on another disk."
        )


def cli() -> None:
    """The command: its input checked before Hydra runs, then Hydra's main. Every failure is
    one message and an exit code (_stopped), here or, inside a job, in _job."""
    global _stop_requested
    _stop_requested = False
    register_schema()  # again: methods imported since keyframes.run bring their own schemas
    signals = (signal.SIGTERM, signal.SIGINT)
    before = [signal.signal(s, _interrupt) for s in signals]
    # Hydra's parser wants flags before the overrides; let `experiment=smoke -m steps=2,3` work.
    flags = [a for a in sys.argv[1:] if a in ("-m", "--multirun")]
    sys.argv[1:] = flags + [a for a in sys.argv[1:] if a not in flags]
    try:
        _check_command_line(sys.argv[1:])
        _stop_if_requested()
        main()
        _stop_if_requested()  # after the last job, while Hydra closed the sweep
    except SystemExit as e:
        if e.code not in (0, None):  # a sweep ends here too: its parent run says how
            close_stopped_sweep("KILLED" if e.code == EXIT_INTERRUPTED else "FAILED")
        raise
    except (KeyframesError, KeyboardInterrupt) as e:  # before Hydra ran, or between jobs
        if isinstance(e, KeyboardInterrupt):
            close_stopped_sweep("KILLED")
        sys.exit(_stopped(e))
    finally:
        for number, handler in zip(signals, before, strict=True):
            signal.signal(number, handler)


if __name__ == "__main__":
    cli()
