"""The LAION aesthetic score: a small MLP over the unit CLIP ViT-L/14 image embedding the
scorer already computes (christophschuhmann/improved-aesthetic-predictor, trained on SAC,
LOGOS and AVA ratings; about 1 to 10, higher looks better to people). It costs one
768x1024 matrix product per image on top of the CLIP score.

scorer.aesthetic names the weights: `tiny` (random, fixed seed: offline tests), a local
.safetensors or .pth file, or `owner/repo/file` on the Hugging Face hub. .pth files are read
with torch.load(weights_only=True), which refuses anything but tensors.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from keyframes.errors import ModelUnavailableError, first_line

HIDDEN = (1024, 128, 64, 16)  # the published head; its state dict: layers.{0,2,4,6,7}
DROPOUT = (0.2, 0.2, 0.1)


class AestheticHead(nn.Module):
    """The published MLP; `width` is the CLIP embedding width (768 for ViT-L/14)."""

    def __init__(self, width: int):
        super().__init__()
        parts: list[nn.Module] = []
        for i, size in enumerate(HIDDEN):
            parts.append(nn.Linear(width if i == 0 else HIDDEN[i - 1], size))
            if i < len(DROPOUT):
                parts.append(nn.Dropout(DROPOUT[i]))
        parts.append(nn.Linear(HIDDEN[-1], 1))
        self.layers = nn.Sequential(*parts)

    def forward(self, unit_embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(unit_embeddings).squeeze(-1)


def load_aesthetic(spec: str | None, width: int) -> AestheticHead | None:
    if spec is None:
        return None
    if spec == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            head = AestheticHead(width)
        return head.eval()
    state = head_state(spec, weights_file(spec))
    head = AestheticHead(width)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ModelUnavailableError(
            f"scorer.aesthetic={spec}: not the LAION aesthetic head for a {width}-wide CLIP "
            f"embedding ({str(e).splitlines()[0]})"
        ) from None
    return head.eval()


def missing_aesthetic(spec: str | None) -> str | None:
    """Pre-flight: why the aesthetic head cannot be had or read (None: it can, or none is
    asked for). It is 3.7 MB: reading it here costs nothing and catches a damaged file."""
    if spec in (None, "tiny"):
        return None
    try:
        head_state(spec, weights_file(spec))
    except ModelUnavailableError as e:
        return str(e)
    return None


def head_state(spec: str, path: str) -> dict[str, torch.Tensor]:
    """The head's tensors, checked to be the published head's (any embedding width)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, a zip or safetensors error, ...
        raise ModelUnavailableError(
            f"scorer.aesthetic={spec}: {path} is not a readable weights file ({first_line(e)})"
        ) from None
    expected = set(AestheticHead(8).state_dict())
    if not isinstance(state, dict) or set(state) != expected:
        raise ModelUnavailableError(
            f"scorer.aesthetic={spec}: {path} is not the LAION aesthetic head (its tensors are "
            f"layers.0/2/4/6/7 weight and bias)"
        )
    return state


def weights_file(spec: str) -> str:
    """A local file, or `owner/repo/file` from the Hugging Face cache or hub."""
    from keyframes.pipeline import hub

    if os.path.isfile(spec):
        if not spec.endswith((".safetensors", ".pth")):
            raise ModelUnavailableError(
                f"scorer.aesthetic={spec}: a .safetensors or .pth file is needed"
            )
        return spec
    parts = spec.split("/")
    if len(parts) < 3:
        raise ModelUnavailableError(
            f"scorer.aesthetic={spec}: no such file, and not a hub file (owner/repo/file)"
        )
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    found = hub.fetch(repo, filename)
    if found is None:
        raise ModelUnavailableError(
            f"aesthetic predictor {spec} is not available.\n"
            f"  Looked for {filename} of {repo} in {hub.where()}.\n"
            f"  Download it on a machine with network: uv run hf download {repo} '{filename}'\n"
            "  Or score without it: scorer.aesthetic=null"
        )
    return str(found)
