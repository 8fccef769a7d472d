"""LyCORIS LoHa and LoKr files, as kohya's sd-scripts and LyCORIS write them and A1111, Forge
and ComfyUI load them: per module `lora_unet_*` (the original block numbering, or diffusers'),
`lora_te1_*` / `lora_te2_*` (SDXL's encoders) or `lora_te_*` (SD 1.5's), with

    LoHa: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha
          update = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank     (Hadamard product)
    LoKr: lokr_w1 (or lokr_w1_a @ lokr_w1_b), lokr_w2 (or lokr_w2_a @ lokr_w2_b), alpha
          update = kron(w1, w2) * alpha / rank   (scale 1 when neither factor is split)

diffusers loads neither. Each update is added to its layer's weight at the LoRA's scale, and
the weights the run changed are kept on the CPU and put back afterwards: the cached pipeline
is the plain model again, exactly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from keyframes.pipeline.kohya_layout import kohya_name

# The text models each kohya prefix names (SD 1.5 has one encoder: lora_te_)
PARTS = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
}
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# Formats told apart by their tensor names: (name part, what it is). The first found decides.
UNSUPPORTED = (
    ("hada_t1", "LyCORIS LoHa with Tucker decomposition (hada_t1)"),
    ("lokr_t2", "LyCORIS LoKr with Tucker decomposition (lokr_t2)"),
    (".diff", "LyCORIS full (diff)"),
    ("oft_", "OFT / BOFT"),
    (".a1.weight", "GLoRA"),
    ("on_input", "(IA)^3"),
)
MERGED_FORMATS = ("loha", "lokr")


def lora_format(keys: list[str]) -> str:
    """lora (kohya's LoRA / LoCon or diffusers': diffusers loads it), loha, lokr, or the name
    of a format keyframes does not load."""
    for part, name in UNSUPPORTED:
        if any(part in key for key in keys):
            return name
    suffixes = {key.rsplit(".", 1)[-1] for key in keys}
    if suffixes & set(LOHA):
        return "loha"
    if suffixes & set(LOKR):
        return "lokr"
    return "lora"


def module_table(pipe) -> dict[str, torch.nn.Module]:
    """kohya's name -> layer, for every Linear and Conv2d of the UNet and text encoders (the
    UNet under both the original block numbering and diffusers' own)."""
    table = {}
    for prefix, part in PARTS.items():
        model = getattr(pipe, part, None)
        if model is None or (prefix == "lora_te_" and getattr(pipe, "text_encoder_2", None)):
            continue
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                continue
            table[prefix + name.replace(".", "_")] = module
            if part == "unet":
                table[kohya_name("unet", name, pipe.unet.config)] = module
            elif prefix != "lora_te_":
                table[kohya_name(part, name, None)] = module
            else:
                table[prefix + kohya_name(part, name, None).removeprefix("lora_te1_")] = module
    return table


def update(tensors: dict[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    """The weight update of one layer, in float32, shaped like its weight."""

    def get(key: str) -> torch.Tensor | None:
        value = tensors.get(f"{name}.{key}")
        return None if value is None else value.float()

    alpha, rank = get("alpha"), None
    if get("hada_w1_a") is not None:
        rank = get("hada_w1_b").shape[0]
        delta = (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b"))
    else:
        w1, w2 = get("lokr_w1"), get("lokr_w2")
        if w1 is None:
            w1, rank = get("lokr_w1_a") @ get("lokr_w1_b"), get("lokr_w1_b").shape[0]
        if w2 is None:
            w2, rank = get("lokr_w2_a") @ get("lokr_w2_b"), get("lokr_w2_b").shape[0]
        if w2.ndim == 4:  # a convolution's kernel, kept whole in w2
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
    scale = float(alpha) / rank if alpha is not None and rank is not None else 1.0
    return delta.reshape(shape) * scale


def module_names(tensors: dict) -> list[str]:
    return sorted({key.rsplit(".", 1)[0] for key in tensors})


@dataclass
class MergedUpdates:
    """The layers changed, with their weights from before (on the CPU), to put back."""

    originals: dict[torch.nn.Module, torch.Tensor] = field(default_factory=dict)

    def add(self, module: torch.nn.Module, delta: torch.Tensor, scale: float) -> None:
        weight = module.weight
        if module not in self.originals:
            self.originals[module] = weight.detach().to("cpu", copy=True)
        with torch.no_grad():
            weight.copy_((weight.float() + scale * delta.to(weight.device)).to(weight.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            for module, original in self.originals.items():
                module.weight.copy_(original.to(module.weight.device))
        self.originals.clear()


def unknown_layers(tensors: dict, table: dict) -> list[str]:
    return [name for name in module_names(tensors) if name not in table]


def merge(table: dict, files: list[tuple[dict, float]], merged: MergedUpdates) -> None:
    """Add every file's updates (tensors, scale) to the layers of `table` (module_table)."""
    for tensors, scale in files:
        for name in module_names(tensors):
            module = table[name]
            merged.add(module, update(tensors, name, module.weight.shape), scale)
