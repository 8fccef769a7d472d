"""One run, as torchtune's generate recipe has it: `setup` checks everything the run needs in
one pass before anything heavy loads (the plan, the shotlist and its jobs, each conditioning
method's checks, every weight, the device, the memory mode); `generate` makes every keyframe
not already on disk in a generation session, then the contact sheet, summary and manifest.

    recipe = KeyframesRecipe().setup(config, typed)    # KeyframesError (exit 2): bad input
    result = recipe.generate(RunPlace(run_dir, overrides))

The recipe alone reads the whole plan; each stage gets its own part of it (the jobs' settings,
the methods' context, the session's models and numbers, the records' settings fields).
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import time
from collections.abc import Set
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from keyframes.conditioning.base import (
    GROUPS,
    METHOD_SETTINGS,
    Method,
    MethodContext,
    methods_for,
    prepare_all,
    record_fields,
)
from keyframes.config.plan import RunPlan, make_plan
from keyframes.config.schema import Config
from keyframes.errors import KeyframesError, first_line, is_disk_full
from keyframes.generation.bookkeeping import Bookkeeping, RecordInputs
from keyframes.generation.generator import GenerationSettings
from keyframes.generation.outcome import DiskFull, Interrupted, RenderResult
from keyframes.generation.preflight import (
    check_prompt_syntax,
    check_weights,
    git_commit,
    package_versions,
)
from keyframes.generation.session import Session, SessionModels
from keyframes.outputs.contact_sheet import write_contact_sheets
from keyframes.outputs.parts import merge_parts
from keyframes.outputs.processes import Processes
from keyframes.outputs.records import (
    Manifest,
    MemoryRecord,
    RunInfo,
    SpeedRecord,
    SweepRecord,
    derive_run_key,
    iso,
)
from keyframes.outputs.resume import earlier_run, previous_images
from keyframes.outputs.review_page import REVIEW_PAGE, run_rows, write_review
from keyframes.outputs.summary import summarize
from keyframes.pipeline.long_prompts import count_tokens
from keyframes.scoring.clip import ClipScorer
from keyframes.scoring.consistency import Keyframe, consistency_of
from keyframes.shotlist.jobs import ImageJob, JobSettings, plan_for
from keyframes.shotlist.load import Shotlist, load_shotlist

log = logging.getLogger("keyframes")


@dataclass(frozen=True)
class RunPlace:
    """Where a run goes and how it was asked for (the command line fills it)."""

    run_dir: Path
    overrides: tuple[str, ...] = ()
    experiment: str | None = None  # the MLflow experiment; None: the shotlist's title
    sweep: SweepRecord | None = None  # its place in a sweep
    processes: Processes = field(default_factory=Processes)  # accelerate launch: the group


class KeyframesRecipe:
    plan: RunPlan
    shotlist: Shotlist
    jobs: list[ImageJob]  # as planned, with the methods' per-job inputs
    methods: list[Method]

    def setup(
        self, config: Config, typed: Set[str] = frozenset(), announce: bool = True
    ) -> KeyframesRecipe:
        """The checked run (typed: the keys given on the command line; announce: log what it
        will do). Raises a KeyframesError (exit 2) naming every problem it finds."""
        self.started = time.time()
        # the tiny random-weight models are folders written once per machine, when named
        from keyframes.pipeline.tiny_models import provide_tiny_models

        upscale_path = getattr(config.upscale, "path", None)
        provide_tiny_models([config.model.path, config.controlnet.path, upscale_path])
        self.plan = make_plan(config, typed)
        cfg = self.plan.config
        self.shotlist = load_shotlist(cfg.shotlist, cfg.allow_external_paths)
        self.methods = methods_for(self.method_settings, self.method_context)
        self.jobs = prepare_all(
            self.methods, plan_for(self.shotlist, self.job_settings), self.shotlist
        )
        if cfg.prompt_weighting == "a1111":
            check_prompt_syntax(self.jobs)
        check_weights(cfg.model, cfg.scorer, self.methods)
        if announce:
            self._warn()
        # torch and diffusers load only once the input has passed: bad input fails in a second.
        from keyframes.pipeline.load import check_sampler, resolve_placement
        from keyframes.pipeline.memory import plan_memory
        from keyframes.pipeline.speed import check_speed

        check_sampler(cfg.sampler, cfg.steps, cfg.model)
        self.placement = resolve_placement(cfg.device, cfg.model.dtype)
        check_speed(cfg.speed, self.placement.device)
        second_model = any(m.second_model for m in self.methods)
        size = (cfg.batch_size, self.plan.width, self.plan.height)
        bytes_per_value = self.placement.dtype.itemsize
        self.memory = plan_memory(
            cfg.memory,
            self.placement.device,
            self.placement.dtype,
            cfg.model,
            *size,
            second_model,
            sum(m.memory_gb(bytes_per_value) for m in self.methods),
        )
        if announce:
            self._log_run()
        return self

    # The plan's parts, one for each stage that takes it.
    @property
    def job_settings(self) -> JobSettings:
        cfg = self.plan.config
        return JobSettings(
            style_prompt=cfg.style.prompt,
            style_negative=cfg.style.negative_prompt,
            negative_preset=cfg.negative.prompt,
            seed=cfg.seed,
            seed_mode=cfg.seed_mode,
            takes=cfg.takes,
            max_images=cfg.max_images,
        )

    @property
    def method_settings(self) -> dict[str, Any]:
        """The settings node of every group or list a method may be chosen by."""
        return {name: getattr(self.plan.config, name) for name in METHOD_SETTINGS}

    @property
    def method_context(self) -> MethodContext:
        cfg, plan = self.plan.config, self.plan
        return MethodContext(
            model=cfg.model,
            width=plan.width,
            height=plan.height,
            steps=cfg.steps,
            cfg_scale=cfg.cfg_scale,
            long_prompts=cfg.long_prompts,
            prompt_weighting=cfg.prompt_weighting,
            fuse_loras=cfg.fuse_loras,
            chosen={group: getattr(cfg, group).name for group in GROUPS},
            guidance_interval=bool(cfg.guidance_interval),
            deepcache=bool(cfg.speed.deepcache),
            compile=bool(cfg.speed.compile),
            jobs=self.job_settings,
        )

    @property
    def generation_settings(self) -> GenerationSettings:
        cfg = self.plan.config
        return GenerationSettings(
            steps=cfg.steps,
            cfg_scale=cfg.cfg_scale,
            width=self.plan.width,
            height=self.plan.height,
            batch_size=cfg.batch_size,
            fixed_batch=cfg.speed.compile,
            long_prompts=cfg.long_prompts,
            prompt_weighting=cfg.prompt_weighting,
            guidance_interval=tuple(cfg.guidance_interval) if cfg.guidance_interval else None,
            deepcache=cfg.speed.deepcache,
            guidance_rescale=cfg.guidance_rescale or 0.0,
        )

    def session(self, processes: Processes | None = None) -> Session:
        """The generation session of this run (not yet set up)."""
        cfg = self.plan.config
        models = SessionModels(cfg.model, cfg.sampler, cfg.speed, cfg.scorer)
        return Session(
            models,
            self.generation_settings,
            self.placement,
            self.memory,
            self.methods,
            processes or Processes(),
        )

    def image_settings(self) -> dict[str, Any]:
        """What every image record says of the settings it was made with."""
        cfg = self.plan.config
        return {
            "steps": cfg.steps,
            "cfg_scale": cfg.cfg_scale,
            "sampler": cfg.sampler.name,
            "sampler_label": cfg.sampler.label,
            "width": self.plan.width,
            "height": self.plan.height,
            "model": cfg.model.name,
            "style": cfg.style.name,
            "negative": cfg.negative.name,
            "guidance_interval": list(cfg.guidance_interval) if cfg.guidance_interval else None,
            "prediction": cfg.model.prediction,
            "zero_snr": bool(cfg.model.zero_snr),
            "guidance_rescale": cfg.guidance_rescale or 0.0,
            "deepcache": list(cfg.speed.deepcache) if cfg.speed.deepcache else None,
        }

    def resume_key(self, job: ImageJob) -> dict[str, Any]:
        """What must match for an image on disk to count as done when a run is resumed."""
        settings = self.image_settings()
        return {
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "seed": job.seed,
            **{k: settings[k] for k in ("steps", "cfg_scale", "sampler", "width", "height")},
            "model": settings["model"],
            **record_fields(self.methods, self.jobs[job.index]),
        }

    def generate(self, place: RunPlace) -> RenderResult:
        """Make every keyframe of the plan not already on disk; returns what the run made.
        Raises Interrupted or DiskFull carrying what was finished."""
        procs, run_dir = place.processes, place.run_dir
        earlier = earlier_run(run_dir, self.plan.resolved, self.plan.config.remake)
        if procs.main:  # after reading the folder's earlier settings
            (run_dir / "config.yaml").write_text(self.plan.yaml)
        with self.session(procs) as session:
            result = RenderResult(run_dir, self._run_record(place, session))
            done = previous_images(run_dir, self.jobs, earlier, result.run, self.resume_key)
            todo = [job for job in self.jobs if job.index not in done]
            procs.wait()  # every process has read the same finished work before any adds
            if done:
                log.info(
                    "resuming %s: %d of %d images already done", run_dir, len(done), len(self.jobs)
                )
            speed = self.plan.config.speed
            if todo and (speed.warm_up or speed.compile):
                session.warm_up(todo[0])
                result.run.timings = dict(session.timings)
            book = Bookkeeping(
                run_dir, result.run, self._record_inputs(session, todo), session.scorer, procs, done
            )
            self._keep(result, book, session)  # from the start, the folder says what it is
            try:
                book.run_all(session.generate(todo, self.jobs, run_dir), len(self.jobs))
            except KeyboardInterrupt:
                result.run.status = "interrupted"
                self._keep(result, book, session)
                if procs.main:  # what every process has finished; resume reads parts too
                    self._finish(place, self._merged(place, result), session.scorer)
                raise Interrupted(result) from None
            except OSError as e:
                if not is_disk_full(e):
                    raise
                raise self._disk_full(place, result, book, session, e) from None
            self._keep(result, book, session)
        return self._conclude(place, result, session.scorer)

    def _record_inputs(self, session: Session, todo: list[ImageJob]) -> RecordInputs:
        cfg = self.plan.config
        return RecordInputs(
            settings=self.image_settings(),
            long_prompts=cfg.long_prompts,
            prompt_weighting=cfg.prompt_weighting,
            planned=self.jobs,
            methods=self.methods,
            scenes={scene.id: scene for scene in self.shotlist.scenes},
            tokens=count_tokens(session.pipe, todo, cfg.long_prompts, cfg.prompt_weighting),
        )

    @staticmethod
    def _keep(result: RenderResult, book: Bookkeeping, session: Session) -> None:
        """This process's manifest (or part) as it stands, in the result too."""
        book.write_now(session.fallbacks)
        result.images = book.images

    @staticmethod
    def _merged(place: RunPlace, result: RenderResult) -> RenderResult:
        """Main process: every process's part merged into the result and manifest.json."""
        merged = merge_parts(place.run_dir, place.processes, Manifest(result.run, result.images))
        result.run, result.images = merged.run, merged.images
        return result

    def _conclude(
        self, place: RunPlace, result: RenderResult, scorer: ClipScorer | None
    ) -> RenderResult:
        """After every process has written its part: the main process merges and finishes."""
        place.processes.wait()  # every part is written
        if not place.processes.main:
            return result
        self._merged(place, result)
        failed = [r for r in result.images if not r.ok]
        result.run.status = "failed" if failed else "finished"
        self._finish(place, result, scorer)
        log.info(
            "%d keyframes in %s (%.2f s/image)%s",
            len(result.images) - len(failed),
            place.run_dir,
            result.summary.get("seconds_per_image_mean") or 0.0,
            f"; {len(failed)} failed" if failed else "",
        )
        return result

    def _disk_full(
        self,
        place: RunPlace,
        result: RenderResult,
        book: Bookkeeping,
        session: Session,
        error: OSError,
    ) -> DiskFull:
        """What a full disk leaves: the manifest with every keyframe on disk, status failed (the
        small manifest fits where the half-written PNG was), summary for MLflow, no contact
        sheet; and an estimate of the space the rest needs."""
        logging.raiseExceptions = False  # run.log cannot grow either: no traceback per log line
        result.run.status = "failed"
        result.run.error = f"disk full: {error.filename or place.run_dir}"
        try:
            self._keep(result, book, session)
            if place.processes.main:
                self._finish(place, self._merged(place, result), sheets=False)
        except OSError as again:  # not even that: the last manifest written stays as it was
            log.error("could not record the stop in the manifest either (%s)", again)
        pngs = [place.run_dir / r.file for r in book.records.values() if r.ok]
        sizes = [p.stat().st_size for p in pngs if p.is_file()]
        per_image = sum(sizes) / len(sizes) if sizes else self.plan.width * self.plan.height * 3
        left = len(self.jobs) - len(sizes)
        needed = int(per_image * left * 1.1)  # + manifest and contact sheet
        return DiskFull(result, str(error.filename or place.run_dir), needed, left)

    def _finish(
        self,
        place: RunPlace,
        result: RenderResult,
        scorer: ClipScorer | None = None,
        sheets: bool = True,
    ) -> None:
        """Contact sheet, summary and the final manifest, for whatever images exist."""
        cfg, timings, run_dir = self.plan.config, result.run.timings, place.run_dir
        title = f"{self.shotlist.title} · {cfg.style.name} · {cfg.model.name}"
        if sheets and result.images:
            write_contact_sheets(run_dir, result.images, title, self.plan.width, self.plan.height)
        result.summary = summarize(
            result.images, timings["model_load_seconds"], time.time() - self.started
        )
        if scorer is not None:
            result.summary |= self._measure_consistency(run_dir, result, scorer)
        for key in ("warmup_seconds", "compile_seconds"):
            if key in timings:
                result.summary[key] = timings[key]
        result.run.finished_at = iso(time.time())
        result.run.summary = result.summary
        if sheets and result.images:  # after the scores: the page shows them
            columns, rows = run_rows(run_dir, result.images)
            subtitle = f"{len(rows)} scenes · {result.run.command}"
            write_review(run_dir / REVIEW_PAGE, title, subtitle, columns, rows)
        result.write_manifest()

    def _measure_consistency(
        self, run_dir: Path, result: RenderResult, scorer: ClipScorer
    ) -> dict[str, float]:
        """The style and character figures of the keyframes on disk (a method's own images,
        such as reference portraits, are not keyframes); each record's character similarity."""
        scenes = {scene.id: scene for scene in self.shotlist.scenes}
        shown = [r for r in result.images if r.ok and r.scene_id in scenes]
        keyframes = [
            Keyframe(
                run_dir / r.file, r.scene_id, tuple(dict.fromkeys(scenes[r.scene_id].characters))
            )
            for r in shown
        ]
        sheet = self.shotlist.characters.values()
        references = {c.name: Path(c.reference) for c in sheet if c.reference}
        for method in self.methods:
            references |= {name: run_dir / file for name, file in method.references().items()}
        measured = consistency_of(keyframes, scorer, references)
        similarity = dict(zip((r.index for r in shown), measured.per_image, strict=True))
        result.images = [
            replace(r, character_similarity=similarity.get(r.index) or None) for r in result.images
        ]
        return measured.summary

    def _run_record(self, place: RunPlace, session: Session) -> RunInfo:
        """The run's record as it starts."""
        from keyframes.pipeline.load import describe_source

        cfg, plan, shotlist, scorer = self.plan.config, self.plan, self.shotlist, session.scorer
        command = "uv run python -m keyframes.run " + " ".join(map(shlex.quote, place.overrides))
        method_fields = {k: v for m in self.methods for k, v in m.run_record().items()}
        # keywords, not a dict: a misspelt field fails here instead of landing in `extra`
        return RunInfo(
            title=shotlist.title,
            shotlist=shotlist.path,
            shotlist_sha256=shotlist.sha256,
            shotlist_extra=shotlist.extra,
            characters={c.name: c.description for c in shotlist.characters.values()},
            config_hash=plan.config_hash,
            model=cfg.model.name,
            model_source=describe_source(cfg.model),
            model_family=cfg.model.family,
            model_fit=list(plan.model_fit),
            style=cfg.style.name,
            style_template=cfg.style.prompt,
            negative=cfg.negative.name,
            sampler=cfg.sampler.name,
            quality=cfg.quality.name,
            scorer=scorer.name if scorer else None,
            device=self.placement.device,
            dtype=str(self.placement.dtype).removeprefix("torch."),
            memory=MemoryRecord.from_json(self.memory.as_record()),
            versions=package_versions(),
            overrides=list(place.overrides),
            command=command,
            started_at=iso(self.started),
            experiment=place.experiment or shotlist.title,
            sweep=place.sweep,
            git_commit=git_commit(),
            host=socket.gethostname(),  # where it ran: sweeps may spread over machines
            pid=os.getpid(),
            run_key=derive_run_key(plan.config_hash, shotlist.sha256, self.started, place.run_dir),
            status="running",
            pipeline_cache="hit" if session.cache_hit else "miss",
            speed=SpeedRecord.from_json({"preset": cfg.speed.name, **session.loaded.speed}),
            timings=dict(session.timings),
            **RunInfo.own_and_extra(method_fields),
        )

    def _warn(self) -> None:
        """What planning changed or kept, and what the shotlist holds that the format does not."""
        shotlist = self.shotlist
        for note in self.plan.notes:
            log.warning(note)
        for note in shotlist.notes:
            log.warning("shotlist %s: %s", shotlist.path, note)
        if shotlist.unknown_fields:
            log.warning(
                "shotlist %s: unknown fields kept as metadata: %s",
                shotlist.path,
                ", ".join(shotlist.unknown_fields),
            )

    def _log_run(self) -> None:
        cfg, plan = self.plan.config, self.plan
        log.info(
            "%s: %d scenes, %d images at %dx%d, %d steps, cfg %g, %s, style %s, on %s",
            self.shotlist.title,
            len(self.shotlist.scenes),
            len(self.jobs),
            plan.width,
            plan.height,
            cfg.steps,
            cfg.cfg_scale,
            cfg.sampler.name,
            cfg.style.name,
            self.placement.device,
        )
        log.info(
            "memory mode %s (%s), speed %s", self.memory.mode, self.memory.reason, cfg.speed.name
        )


def check_sweep(job_overrides: list[list[str]], swept: list[str]) -> None:
    """Every job of a sweep checked as its run will check it, before the first one starts:
    one ConfigError naming each job that cannot run, by the values it sweeps (`swept`: the
    keys that vary), and why."""
    from keyframes.config.compose import composer
    from keyframes.config.overrides import override_keys
    from keyframes.errors import ConfigError

    problems = []
    with composer() as settings_of:
        for num, overrides in enumerate(job_overrides):
            keys = override_keys(overrides, False)
            values = " ".join(o for o, k in zip(overrides, keys, strict=True) if k in swept)
            typed = {k.lstrip("+~") for k in keys}
            try:
                KeyframesRecipe().setup(settings_of(overrides), typed, announce=False)
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
