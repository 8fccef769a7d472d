"""Count the parameters of the SDXL base architecture and its FLOPs at the SDXL training
sizes (and 512x512), on the meta device, and keep them in the package
(keyframes/data/sdxl_base/counts.json) for memory=auto and scripts/bench.py:

uv run python scripts/count_architecture.py
"""

import json
from dataclasses import asdict

import torch

from keyframes.config.validate import SDXL_BUCKETS
from keyframes.pipeline.architectures import build_components, count_parameters, counts_path
from keyframes.pipeline.flops import count_flops

NAME = "sdxl_base"

if __name__ == "__main__":
    parameters = count_parameters(NAME)
    for component, count in parameters.items():
        print(f"{component}: {count:,} parameters")
    unet, vae, text_encoder, text_encoder_2 = build_components(NAME, "meta")
    flops = {}
    for width, height in (*SDXL_BUCKETS, (512, 512)):
        counted = count_flops(unet, vae, (text_encoder, text_encoder_2), width, height)
        flops[f"{width}x{height}"] = asdict(counted)
        print(
            f"{width}x{height}: UNet {counted.unet_per_sample_step / 1e12:.3f} TFLOP per "
            f"sample and step, VAE decode {counted.vae_decode / 1e12:.3f} TFLOP, "
            f"30 steps with CFG {counted.per_image(30, 5.0) / 1e12:.1f} TFLOP per image"
        )
    data = {
        "architecture": NAME,
        "method": "meta device; FLOPs by torch.utils.flop_counter, 2 per multiply-add, "
        "matmul + convolution + attention only",
        "torch": torch.__version__,
        "parameters": parameters,
        "flops": flops,
    }
    counts_path(NAME).write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {counts_path(NAME)}")
