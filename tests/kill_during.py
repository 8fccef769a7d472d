"""`python tests/kill_during.py STAGE OVERRIDES...`: `python -m keyframes.run OVERRIDES...`
that kills itself with SIGKILL in the middle of STAGE, as a power cut or the OOM killer
would. No switch in the product: the stage's own function is wrapped here.

Stages: store (the new SQLite store's 800th SQL statement, of about 1,700), generation (the
third batch), png (the third keyframe, half written), journal (the second batch's records,
half a line), manifest (the second full manifest, half written), contact_sheet (half
written), mlflow (the third artifact upload)."""

import os
import signal
import sys


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def on_call(number: int, then):
    """A counter: the number-th call runs then() instead of returning."""
    calls = []

    def count():
        calls.append(1)
        if len(calls) == number:
            then()

    return count


def half_written(module, number: int):
    """module.atomic_write's number-th call writes half of its file, then dies."""
    original, count = module.atomic_write, []

    def atomic_write(path, write):
        count.append(1)
        if len(count) < number:
            return original(path, write)
        tmp = path.with_name(f".{path.name}.tmp")  # where atomic_write writes first
        write(tmp)
        os.truncate(tmp, tmp.stat().st_size // 2)
        die()

    module.atomic_write = atomic_write


def arm(stage: str) -> None:
    if stage == "store":
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        tick = on_call(800, die)
        event.listen(Engine, "before_cursor_execute", lambda *args: tick())
    elif stage == "generation":
        from diffusers import StableDiffusionXLPipeline

        original, tick = StableDiffusionXLPipeline.__call__, on_call(3, die)

        def call(self, *args, **kwargs):
            tick()
            return original(self, *args, **kwargs)

        StableDiffusionXLPipeline.__call__ = call
    elif stage == "png":
        import keyframes.outputs.png

        half_written(keyframes.outputs.png, 3)
    elif stage == "manifest":
        import keyframes.outputs.manifest

        half_written(keyframes.outputs.manifest, 2)
    elif stage == "contact_sheet":
        import keyframes.outputs.contact_sheet

        half_written(keyframes.outputs.contact_sheet, 1)
    elif stage == "journal":
        from keyframes.outputs import manifest

        original, calls = manifest.ManifestWriter.append, []

        def append(self, records):
            calls.append(1)
            if len(calls) < 2:
                return original(self, records)
            line = manifest.json.dumps(records[0].to_json()).encode()
            with open(manifest.journal_of(self.path), "ab") as f:
                f.write(line[: len(line) // 2])
            die()

        manifest.ManifestWriter.append = append
    elif stage == "mlflow":
        from mlflow.tracking import MlflowClient

        original, tick = MlflowClient.log_artifact, on_call(3, die)

        def log_artifact(self, *args, **kwargs):
            tick()
            return original(self, *args, **kwargs)

        MlflowClient.log_artifact = log_artifact
    else:
        raise SystemExit(f"unknown stage {stage}")


if __name__ == "__main__":
    arm(sys.argv.pop(1))
    from keyframes.run import cli

    cli()
