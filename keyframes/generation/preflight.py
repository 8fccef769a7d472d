"""Everything a run needs, checked in one pass before anything heavy loads: the shotlist and
its jobs, each conditioning method's checks, every weight (model, scorer, adapters), the
device, the memory mode. The result is the RunContext that render() runs."""

from __future__ import annotations

import logging
import sys
import time
from importlib import metadata
from pathlib import Path

from keyframes.conditioning.base import Method, methods_for, prepare_all
from keyframes.config.plan import RunPlan
from keyframes.errors import ConfigError, KeyframesError, ModelUnavailableError, first_line
from keyframes.generation.render import RunContext
from keyframes.outputs.processes import Processes
from keyframes.outputs.resume import earlier_run
from keyframes.shotlist.jobs import ImageJob, plan_for
from keyframes.shotlist.load import Shotlist, load_shotlist

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


def prepare(
    plan: RunPlan,
    run_dir: Path,
    overrides: list[str],
    experiment: str | None,
    sweep: dict | None = None,
    procs: Processes | None = None,
) -> RunContext:
    """The checked run: raises a KeyframesError (exit 2) naming every problem it finds."""
    started = time.time()
    cfg = plan.config
    shotlist, methods, jobs = check_plan(plan)
    _warn(plan, shotlist)
    # torch and diffusers load only once the input has passed: bad input fails in a second.
    from keyframes.pipeline.load import check_sampler, resolve_placement
    from keyframes.pipeline.memory import plan_memory
    from keyframes.pipeline.speed import check_speed

    check_sampler(cfg.sampler, cfg.steps, cfg.model)
    placement = resolve_placement(cfg.device, cfg.model.dtype)
    check_speed(cfg.speed, placement.device)
    memory = plan_memory(
        cfg.memory.name,
        placement.device,
        placement.dtype,
        cfg.model,
        cfg.batch_size,
        plan.width,
        plan.height,
        any(m.second_model for m in methods),
    )
    _log_run(plan, shotlist, jobs, placement.device, memory)
    return RunContext(
        plan=plan,
        shotlist=shotlist,
        jobs=jobs,
        methods=methods,
        placement=placement,
        memory=memory,
        run_dir=run_dir,
        versions=package_versions(),
        overrides=overrides,
        started=started,
        experiment=experiment or shotlist.title,
        sweep=sweep,
        git_commit=git_commit(),
        processes=procs or Processes(),
        earlier=earlier_run(run_dir, plan.resolved, cfg.remake),  # before config.yaml changes
    )


def _log_run(plan: RunPlan, shotlist: Shotlist, jobs: list, device: str, memory) -> None:
    cfg = plan.config
    log.info(
        "%s: %d scenes, %d images at %dx%d, %d steps, cfg %g, %s, style %s, on %s",
        shotlist.title,
        len(shotlist.scenes),
        len(jobs),
        plan.width,
        plan.height,
        cfg.steps,
        cfg.cfg_scale,
        cfg.sampler.name,
        cfg.style.name,
        device,
    )
    log.info("memory mode %s (%s), speed %s", memory.mode, memory.reason, cfg.speed.name)


def _warn(plan: RunPlan, shotlist: Shotlist) -> None:
    """What planning changed or kept, and what the shotlist holds that the format does not."""
    for note in plan.notes:
        log.warning(note)
    for note in shotlist.notes:
        log.warning("shotlist %s: %s", shotlist.path, note)
    if shotlist.unknown_fields:
        log.warning(
            "shotlist %s: unknown fields kept as metadata: %s",
            shotlist.path,
            ", ".join(shotlist.unknown_fields),
        )


def check_plan(plan: RunPlan) -> tuple[Shotlist, list[Method], list[ImageJob]]:
    """What a plan needs that can be known before anything loads: the shotlist, each
    conditioning method's checks on the jobs, every weight."""
    cfg = plan.config
    shotlist = load_shotlist(cfg.shotlist, cfg.allow_external_paths)
    methods = methods_for(plan)
    jobs = prepare_all(methods, plan_for(cfg, shotlist), shotlist)
    if cfg.prompt_weighting == "a1111":
        check_prompt_syntax(jobs)
    check_weights(plan, methods)
    return shotlist, methods, jobs


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


def check_sweep(job_overrides: list[list[str]], swept: list[str]) -> None:
    """Every job of a sweep checked as its run will check it, before the first one starts:
    one ConfigError naming each job that cannot run, by the values it sweeps (`swept`: the
    keys that vary), and why."""
    from keyframes.config.compose import composer
    from keyframes.config.overrides import override_keys
    from keyframes.config.plan import make_plan

    problems = []
    with composer() as settings_of:
        for num, overrides in enumerate(job_overrides):
            keys = override_keys(overrides, False)
            values = " ".join(o for o, k in zip(overrides, keys, strict=True) if k in swept)
            try:
                check_plan(make_plan(settings_of(overrides), {k.lstrip("+~") for k in keys}))
            except KeyframesError as e:
                problems.append(f"job {num} ({values}): " + str(e).replace("\n", "\n    "))
            except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's composition errors
                cause = f" ({first_line(e.__cause__)})" if e.__cause__ else ""
                problems.append(f"job {num} ({values}): {first_line(e)}{cause}")
    if problems:
        raise ConfigError(
            f"{len(problems)} of {len(job_overrides)} jobs of this sweep cannot run; "
            "none was started:",
            problems,
        )


def check_weights(plan: RunPlan, methods: list[Method]) -> None:
    """Every model, scorer and adapter weight the run needs, in one pass, before any loads:
    one message lists all that is missing."""
    from keyframes.pipeline import hub
    from keyframes.pipeline.load import missing_model
    from keyframes.scoring.clip import missing_scorer

    cfg = plan.config
    if not (cfg.model.tiny and cfg.scorer.model in (None, "tiny")):
        hub.reachable()  # once: an unreachable hub puts the loaders in offline mode, no retries
    problems = [missing_model(cfg.model), missing_scorer(cfg.scorer)]
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
