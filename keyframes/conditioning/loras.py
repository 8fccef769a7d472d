"""LoRA adapters through diffusers' LoRA support (PEFT backend): several at once, each with
its scale, optionally fused into the weights; LyCORIS LoHa and LoKr files merged into the
weights (conditioning/lycoris.py). Files load from safetensors only; a file's format is read
from its tensor names before anything loads."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from keyframes.conditioning.base import Method, register
from keyframes.conditioning.lycoris import (
    MERGED_FORMATS,
    MergedUpdates,
    lora_format,
    merge,
    module_names,
    module_table,
    unknown_layers,
)
from keyframes.config.schema import LoraConfig
from keyframes.config.weights import PICKLE_SUFFIXES, pickle_problem, safetensors_keys
from keyframes.errors import ConfigError, ModelUnavailableError, first_line

log = logging.getLogger("keyframes")


def lora_name(lora: LoraConfig) -> str:
    return lora.name or Path(lora.path).stem or lora.path


def _local(lora: LoraConfig) -> Path | None:
    path = Path(lora.path).expanduser()
    return path if path.exists() else None


def check_loras(loras: list[LoraConfig], allow_pickle: bool = False) -> None:
    """Before anything loads: local files exist and are safetensors (a pickle only where
    allowed, also the one a folder would fall back to); names are distinct."""
    names = [lora_name(lora) for lora in loras]
    if len(set(names)) < len(names):
        raise ConfigError(f"loras: two adapters share a name ({', '.join(names)}); set name=")
    for lora in loras:
        path = _local(lora)
        if path is None and (lora.path.startswith((".", "/", "~")) or lora.path.count("/") != 1):
            raise ConfigError(f"loras: {lora.path}: no such file (nor a hub id like org/repo)")
        if path is not None and path.is_dir():
            path = _folder_file(path, lora)
        if path is not None and path.is_file():
            refused = pickle_problem(path, "loras", allow_pickle)
            if refused:
                raise ConfigError(refused)
            if path.suffix.lower() not in PICKLE_SUFFIXES:
                # a renamed pickle or a cut-off download fails here; so does a format not loaded
                found = lora_format(safetensors_keys(path, "loras"))
                if found not in ("lora", *MERGED_FORMATS):
                    raise ConfigError(
                        f"loras: {lora.path}: a {found} file, which keyframes does not load "
                        "(it loads LoRA and LoCon, in kohya's or diffusers' layout, LoHa, LoKr)"
                    )


def _folder_file(folder: Path, lora: LoraConfig) -> Path | None:
    """The file diffusers would load from a LoRA folder: weight_name, else its safetensors
    file, else the pickle it falls back to."""
    if lora.weight_name:
        return folder / lora.weight_name
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def file_format(lora: LoraConfig) -> str:
    """lora, loha or lokr (a hub id or a pickle: lora, diffusers tells)."""
    path = _local(lora)
    if path is not None and path.is_dir():
        path = _folder_file(path, lora)
    if path is None or not path.is_file() or path.suffix.lower() in PICKLE_SUFFIXES:
        return "lora"
    return lora_format(safetensors_keys(path, "loras"))


def short_sha256(path: Path) -> str:
    """The first 12 hex digits of the file's SHA-256: the short hash image browsers show."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def lora_records(loras: list[LoraConfig]) -> list[dict]:
    """What made the images: name, source, scale, and the file's SHA-256 (first 12 hex
    digits, the short hash image browsers show) where the file is local."""
    records = []
    for lora in loras:
        path = _local(lora)
        if path is not None and path.is_dir():
            path = path / (lora.weight_name or "pytorch_lora_weights.safetensors")
        digest = short_sha256(path) if path is not None and path.is_file() else None
        records.append(
            {
                "name": lora_name(lora),
                "path": lora.path,
                "scale": lora.scale,
                "sha256": digest,
                "format": file_format(lora),
            }
        )
    return records


def apply_loras(
    pipe, loras: list[LoraConfig], fuse: bool, allow_pickle: bool = False
) -> MergedUpdates:
    """Load every adapter and set its scale (fused into the weights if asked). LoHa and LoKr
    files are merged first, into the plain layers; what they changed is returned, to restore."""
    merged = MergedUpdates()
    lycoris = [lora for lora in loras if file_format(lora) in MERGED_FORMATS]
    if lycoris:
        merge_lycoris(pipe, lycoris, merged)
    loras = [lora for lora in loras if lora not in lycoris]
    if not loras:
        return merged
    for lora in loras:
        source, weight_name = lora.path, lora.weight_name
        path = _local(lora)
        if path is not None and path.is_file():
            source, weight_name = str(path.parent), path.name
        try:  # use_safetensors=True: no silent fall-back to a pickle
            pipe.load_lora_weights(
                source,
                weight_name=weight_name,
                adapter_name=lora_name(lora),
                use_safetensors=None if allow_pickle else True,
            )
        except (OSError, ValueError) as e:
            remove_loras(pipe, fused=False, merged=merged)
            raise ModelUnavailableError(
                f"LoRA {lora.path} could not be loaded: {first_line(e)}"
            ) from None
    names = [lora_name(lora) for lora in loras]
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    if fuse:
        pipe.fuse_lora(adapter_names=names)
    return merged


def merge_lycoris(pipe, loras: list[LoraConfig], merged: MergedUpdates) -> None:
    """LoHa and LoKr files into the weights, each at its scale; a layer the model does not
    have stops it, with nothing changed."""
    from safetensors.torch import load_file

    files = [(load_file(_local(lora)), lora.scale) for lora in loras]
    table = module_table(pipe)
    for lora, (tensors, _) in zip(loras, files, strict=True):
        unknown = unknown_layers(tensors, table)
        if unknown:
            shown = ", ".join(unknown[:3]) + (
                f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            )
            raise ModelUnavailableError(
                f"LoRA {lora.path}: {len(unknown)} layers this model does not have ({shown}): "
                "a file for another model family or architecture"
            )
    offloaded = {n for t, _ in files for n in module_names(t) if table[n].weight.is_meta}
    if offloaded:  # accelerate's sequential offload keeps the real weights in its hooks
        raise ModelUnavailableError(
            f"LoRA {loras[0].path}: LoHa and LoKr are merged into the weights, which "
            "memory=minimal (sequential CPU offload) keeps outside the model; use "
            "memory=low_vram (whole-model offload) or memory=balanced"
        )
    merge(table, files, merged)


def remove_loras(pipe, fused: bool, merged: MergedUpdates | None = None) -> None:
    """Back to the plain model, for the next job of a sweep on the cached pipeline."""
    if any(pipe.get_list_adapters().values()):  # LoRAs loaded through diffusers
        if fused:
            pipe.unfuse_lora()
        pipe.unload_lora_weights()
    if merged is not None:
        merged.restore()


def prompt_tags(records: list[dict]) -> str:
    """The <lora:name:scale> tags image browsers read from a prompt."""
    return " ".join(f"<lora:{r['name']}:{r['scale']:g}>" for r in records)


@register("loras", "loras")
class Loras(Method):
    """loras=[...]: every adapter at its scale, optionally fused into the weights."""

    def prepare(self, jobs: list, shotlist) -> list:
        check_loras(self.settings, self.run.model.allow_pickle)
        self.records = lora_records(self.settings)
        return jobs

    def install(self, loaded, todo) -> None:
        fuse = self.run.fuse_loras
        self.merged = apply_loras(loaded.pipe, self.settings, fuse, self.run.model.allow_pickle)
        log.info("LoRA: %s%s", prompt_tags(self.records), " (fused)" if fuse else "")

    def remove(self, pipe) -> None:
        remove_loras(pipe, self.run.fuse_loras, getattr(self, "merged", None))

    def record(self, job) -> dict:
        return {"loras": self.records}

    def run_record(self) -> dict:
        return {"loras": self.records}
