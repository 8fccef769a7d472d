"""LyCORIS LoHa and LoKr files, written here tensor by tensor from the published key layout
(kohya-style names: `lora_unet_` + the original block numbering, `lora_te1_`/`lora_te2_` +
transformers' CLIP names; LyCORIS's hada_*/lokr_* factors), with no code shared with the
loader. Applied, they make the pixels of their updates merged into the weights by hand, on
UNet attention and convolution layers and both text encoders; removed, the plain model."""

import pytest
import torch
from safetensors.torch import save_file

from keyframes.conditioning.loras import apply_loras, check_loras, lora_records, remove_loras
from keyframes.config.schema import LoraConfig
from keyframes.errors import ConfigError
from tests.helpers import assert_same_picture, demo_jobs, euler_tiny_pipe, image, pixel_gap

# kohya's name -> (pipeline part, the layer in diffusers/transformers naming), for the tiny
# SDXL (three levels, one layer each: input_blocks 3 is level 1's first layer)
LAYERS = {
    "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    "lora_unet_input_blocks_3_0_in_layers_2": ("unet", "down_blocks.1.resnets.0.conv1"),
    "lora_unet_middle_block_1_proj_in": ("unet", "mid_block.attentions.0.proj_in"),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
        "text_encoder",
        "encoder.layers.0.self_attn.q_proj",
    ),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": (
        "text_encoder_2",
        "text_model.encoder.layers.1.mlp.fc1",
    ),
}
RANK, ALPHA, SCALE = 4, 2.0, 0.8


def randn(*shape, g):
    return torch.randn(*shape, generator=g) * 0.3


def loha_tensors(pipe, g) -> tuple[dict, dict]:
    """(file tensors, updates by layer): update = (w1a @ w1b) * (w2a @ w2b) * alpha / rank."""
    tensors, updates = {}, {}
    for name, (part, layer) in LAYERS.items():
        weight = getattr(pipe, part).get_submodule(layer).weight
        out, fan_in = weight.shape[0], weight[0].numel()  # a conv: in * kh * kw
        w1a, w1b, w2a, w2b = (
            randn(out, RANK, g=g),
            randn(RANK, fan_in, g=g),
            randn(out, RANK, g=g),
            randn(RANK, fan_in, g=g),
        )
        tensors |= {
            f"{name}.hada_w1_a": w1a,
            f"{name}.hada_w1_b": w1b,
            f"{name}.hada_w2_a": w2a,
            f"{name}.hada_w2_b": w2b,
            f"{name}.alpha": torch.tensor(ALPHA),
        }
        updates[(part, layer)] = ((w1a @ w1b) * (w2a @ w2b) * ALPHA / RANK).reshape(weight.shape)
    return tensors, updates


def lokr_tensors(pipe, g) -> tuple[dict, dict]:
    """update = kron(w1, w2) * alpha / rank, rank that of the factor given split; both whole:
    scale 1 (a convolution keeps its kernel in w2). Every form of the layout appears."""
    tensors, updates = {}, {}
    for n, (name, (part, layer)) in enumerate(LAYERS.items()):
        weight = getattr(pipe, part).get_submodule(layer).weight
        out, fan_in = weight.shape[:2]
        a = next(f for f in (4, 2, 1) if out % f == 0)  # w1 is (a, b), w2 the rest
        b = next(f for f in (2, 1) if fan_in % f == 0)
        c, d = out // a, fan_in // b
        alpha = torch.tensor(ALPHA)
        if weight.ndim == 4:  # w1 whole, w2 whole with the kernel: scale 1
            w1, w2 = randn(a, b, g=g), randn(c, d, *weight.shape[2:], g=g)
            tensors |= {f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2, f"{name}.alpha": alpha}
            update = torch.kron(w1[:, :, None, None], w2)
        elif n % 2:  # w1 whole, w2 split: scale alpha / rank
            w1, w2a, w2b = randn(a, b, g=g), randn(c, RANK, g=g), randn(RANK, d, g=g)
            tensors |= {
                f"{name}.lokr_w1": w1,
                f"{name}.lokr_w2_a": w2a,
                f"{name}.lokr_w2_b": w2b,
                f"{name}.alpha": alpha,
            }
            update = torch.kron(w1, w2a @ w2b) * ALPHA / RANK
        else:  # w1 split, w2 whole
            w1a, w1b, w2 = randn(a, 1, g=g), randn(1, b, g=g), randn(c, d, g=g)
            tensors |= {
                f"{name}.lokr_w1_a": w1a,
                f"{name}.lokr_w1_b": w1b,
                f"{name}.lokr_w2": w2,
                f"{name}.alpha": alpha,
            }
            update = torch.kron(w1a @ w1b, w2) * ALPHA / 1
        updates[(part, layer)] = update.reshape(weight.shape)
    return tensors, updates


@pytest.fixture(scope="module")
def pipe():
    return euler_tiny_pipe()


def merged_by_hand(updates: dict):
    """A fresh tiny pipeline (the same seeded weights) with the updates added at SCALE."""
    reference = euler_tiny_pipe()
    with torch.no_grad():
        for (part, layer), update in updates.items():
            getattr(reference, part).get_submodule(layer).weight += SCALE * update
    return reference


@pytest.mark.parametrize("make, kind", [(loha_tensors, "loha"), (lokr_tensors, "lokr")])
def test_a_file_makes_the_pixels_of_its_updates_merged_by_hand(pipe, tmp_path, make, kind):
    tensors, updates = make(pipe, torch.Generator().manual_seed(5))
    path = tmp_path / f"style_{kind}.safetensors"
    save_file(tensors, path, metadata={"ss_network_module": "lycoris.kohya"})
    lora = LoraConfig(path=str(path), scale=SCALE)
    check_loras([lora])  # the pre-flight knows the format
    assert lora_records([lora])[0]["format"] == kind
    job = demo_jobs(1)[0]
    plain = image(pipe, job)
    merged = apply_loras(pipe, [lora], fuse=False)
    try:
        made = image(pipe, job)
    finally:
        remove_loras(pipe, fused=False, merged=merged)
    assert_same_picture(made, image(merged_by_hand(updates), job), f"{kind} merged by hand")
    assert pixel_gap(made, plain).mean > 0.5  # the updates reach the picture
    assert (image(pipe, job) == plain).all()  # removed: the plain weights, exactly


def test_a_lycoris_file_beside_a_diffusers_lora_applies_both_and_removes_both(pipe, tmp_path):
    from keyframes.pipeline.replicas import LORA_KOHYA, _write_lora_pair

    _write_lora_pair(pipe, tmp_path)
    tensors, _ = loha_tensors(pipe, torch.Generator().manual_seed(6))
    save_file(tensors, tmp_path / "loha.safetensors")
    loras = [
        LoraConfig(path=str(tmp_path / "loha.safetensors"), scale=0.5),
        LoraConfig(path=str(tmp_path / LORA_KOHYA), scale=0.5),
    ]
    job = demo_jobs(1)[0]
    plain = image(pipe, job)
    singles = []
    for lora in loras:
        merged = apply_loras(pipe, [lora], fuse=False)
        singles.append(image(pipe, job))
        remove_loras(pipe, fused=False, merged=merged)
    merged = apply_loras(pipe, loras, fuse=True)
    both = image(pipe, job)
    remove_loras(pipe, fused=True, merged=merged)
    assert all(pixel_gap(both, single).mean > 0.3 for single in singles)
    assert (image(pipe, job) == plain).all()


@pytest.mark.parametrize(
    "suffixes, found",
    [
        ((".diff",), r"LyCORIS full \(diff\)"),
        ((".hada_w1_a", ".hada_t1"), r"LyCORIS LoHa with Tucker decomposition \(hada_t1\)"),
        ((".oft_blocks",), "OFT / BOFT"),
    ],
    ids=["full", "loha-tucker", "oft"],
)
def test_a_format_not_loaded_is_refused_in_the_pre_flight_by_name(tmp_path, suffixes, found):
    path = tmp_path / "community.safetensors"
    save_file({f"lora_unet_middle_block_1_proj_in{s}": torch.zeros(2, 2) for s in suffixes}, path)
    with pytest.raises(
        ConfigError, match=f"community.safetensors: a {found} file, which keyframes does not load"
    ):
        check_loras([LoraConfig(path=str(path))])


def test_a_file_for_other_layers_stops_with_nothing_changed(pipe, tmp_path):
    from keyframes.errors import ModelUnavailableError

    tensors, _ = loha_tensors(pipe, torch.Generator().manual_seed(7))
    tensors = {k.replace("input_blocks_3", "input_blocks_7"): v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "other.safetensors")
    job = demo_jobs(1)[0]
    plain = image(pipe, job)
    with pytest.raises(ModelUnavailableError, match="2 layers this model does not have"):
        apply_loras(pipe, [LoraConfig(path=str(tmp_path / "other.safetensors"))], fuse=False)
    assert (image(pipe, job) == plain).all()


def test_a_run_with_a_loha_records_it_and_leaves_the_cached_model_plain(cli_in_process, tmp_path):
    from tests.conftest import read_manifest
    from tests.helpers import tiny_pipe

    pipe = tiny_pipe()  # the pipeline the runs share
    tensors, _ = loha_tensors(pipe, torch.Generator().manual_seed(8))
    save_file(tensors, tmp_path / "film_loha.safetensors")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    code, err, run_dir, _ = cli_in_process(
        f"+loras=[{{path: {tmp_path / 'film_loha.safetensors'}, scale: 0.7}}]", "takes=1"
    )
    assert code == 0, err[-2000:]
    [record] = read_manifest(run_dir)["images"][0]["loras"]
    assert (record["name"], record["scale"], record["format"]) == ("film_loha", 0.7, "loha")
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weights_held_by_sequential_offload_are_refused_not_silently_skipped(tmp_path):
    """memory=minimal leaves meta tensors in the model (accelerate keeps the weights in its
    hooks): a merge there would change nothing and the picture would be plain, unsaid."""
    from keyframes.errors import ModelUnavailableError

    pipe = euler_tiny_pipe()
    tensors, _ = loha_tensors(pipe, torch.Generator().manual_seed(9))
    save_file(tensors, tmp_path / "loha.safetensors")
    layer = pipe.unet.get_submodule("mid_block.attentions.0.proj_in")
    layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight, device="meta"))
    with pytest.raises(ModelUnavailableError, match="memory=minimal"):
        apply_loras(pipe, [LoraConfig(path=str(tmp_path / "loha.safetensors"))], fuse=False)
