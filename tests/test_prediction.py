"""v-prediction community checkpoints: a single file that carries the `v_pred` and `ztsnr`
marker tensors (as NoobAI-XL v-pred ships them, and as A1111 and ComfyUI read them) is
sampled as v-prediction with zero terminal SNR, exactly as with the scheduler set by hand;
a file without them stays epsilon, as before."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from safetensors.torch import load_file, save_file

from keyframes.config.model_source import resolve_prediction
from keyframes.config.schema import ModelConfig, SamplerConfig
from keyframes.errors import ConfigError
from keyframes.generation.generator import GenerationSettings, KeyframeGenerator
from keyframes.pipeline.load import apply_sampler, check_sampler, load_pipeline, resolve_placement
from keyframes.pipeline.sgm_layout import write_single_file
from keyframes.pipeline.tiny import build_tiny_pipeline
from tests.helpers import assert_same_picture, demo_jobs, pixel_gap

EULER = SamplerConfig(name="euler", label="Euler", scheduler="EulerDiscreteScheduler")
SETTINGS = GenerationSettings(4, 5.0, 64, 64, 1, guidance_rescale=0.7)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny SDXL as a diffusers folder (the configs a single file takes) and as single
    files: plain, with both markers, with v_pred only."""
    folder = tmp_path_factory.mktemp("vpred")
    base = build_tiny_pipeline()
    base.save_pretrained(folder / "configs")
    plain = write_single_file(base, folder / "plain.safetensors")
    state = load_file(plain)
    marked = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}  # empty, as published
    save_file({**state, **marked}, folder / "vpred.safetensors")
    save_file({**state, "v_pred": marked["v_pred"]}, folder / "vpred_only.safetensors")
    return folder


def model(files, name: str, **settings) -> ModelConfig:
    return ModelConfig(
        name=name,
        path=str(files / f"{name}.safetensors"),
        config=str(files / "configs"),
        **settings,
    )


def picture(pipe, settings=SETTINGS):
    apply_sampler(pipe, EULER, pipe.scheduler.config)
    made = next(KeyframeGenerator(pipe, settings).run(demo_jobs(1)))[0].image
    return np.asarray(made, dtype=np.int16)


def test_the_markers_say_v_prediction_and_zero_snr_and_settings_win(files):
    assert resolve_prediction(model(files, "plain")) == ("epsilon", False)
    assert resolve_prediction(model(files, "vpred")) == ("v_prediction", True)
    assert resolve_prediction(model(files, "vpred_only")) == ("v_prediction", False)
    assert resolve_prediction(model(files, "vpred", prediction="epsilon")) == ("epsilon", False)
    assert resolve_prediction(model(files, "plain", prediction="v_prediction")) == (
        "v_prediction",
        False,
    )
    assert resolve_prediction(model(files, "vpred", zero_snr=False)) == ("v_prediction", False)


def test_a_marked_file_makes_the_picture_of_the_v_prediction_scheduler_set_by_hand(files):
    cpu = resolve_placement("cpu", "float32")
    detected = load_pipeline(model(files, "vpred"), cpu)
    assert detected.scheduler.config.prediction_type == "v_prediction"
    made = picture(detected)
    by_hand = load_pipeline(model(files, "plain"), cpu)
    plain_config = dict(by_hand.scheduler.config)
    assert plain_config["prediction_type"] == "epsilon"  # no markers: as before
    assert not plain_config.get("rescale_betas_zero_snr")
    epsilon = picture(by_hand)
    by_hand.scheduler = EulerDiscreteScheduler.from_config(
        plain_config,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    reference = picture(by_hand)
    assert_same_picture(made, reference, "detected v-prediction")
    # how far the bug was: sampled as epsilon, the picture is another one altogether
    assert pixel_gap(epsilon, reference).mean > 10
    # and the guidance rescale the zero-SNR models need changes it too
    assert pixel_gap(picture(detected, GenerationSettings(4, 5.0, 64, 64, 1)), made).mean > 0.5


def test_a_sampler_that_cannot_sample_zero_snr_is_refused_before_loading(files):
    pndm = SamplerConfig(name="pndm", label="PNDM", scheduler="PNDMScheduler")
    with pytest.raises(
        ConfigError,
        match="sampler=pndm: PNDMScheduler cannot sample this model "
        r"\(prediction_type=v_prediction, rescale_betas_zero_snr=True, "
        r"timestep_spacing=trailing\): it has no rescale_betas_zero_snr setting",
    ):
        check_sampler(pndm, 4, model(files, "vpred"))
    check_sampler(pndm, 4, model(files, "vpred_only"))  # v-prediction alone: PNDM has it
    check_sampler(EULER, 4, model(files, "vpred"))


def test_a_v_prediction_run_records_it_in_manifest_png_and_mlflow(files, cli_in_process):
    from mlflow.tracking import MlflowClient

    from keyframes.outputs.png import read_png_metadata
    from tests.conftest import read_manifest

    code, err, run_dir, store = cli_in_process(
        "model=local",
        f"model.path={files / 'vpred.safetensors'}",
        f"model.config={files / 'configs'}",
        "sampler=euler",
        "takes=1",
    )
    assert code == 0, err[-2000:]
    record = read_manifest(run_dir)["images"][0]
    assert (record["prediction"], record["zero_snr"], record["guidance_rescale"]) == (
        "v_prediction",
        True,
        0.7,
    )
    parameters = read_png_metadata(run_dir / record["file"])["parameters"]
    assert "Prediction: v_prediction, Zero terminal SNR: True, CFG rescale: 0.7" in parameters
    client = MlflowClient(f"sqlite:///{store}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["model.prediction"] == "v_prediction"
    assert run.data.params["guidance_rescale"] == "0.7"


def test_a_sampler_that_cannot_sample_it_is_exit_2_before_loading(files, cli_in_process):
    code, err, run_dir, _ = cli_in_process(
        "model=local",
        f"model.path={files / 'vpred.safetensors'}",
        f"model.config={files / 'configs'}",
        "sampler.scheduler=HeunDiscreteScheduler",
    )
    assert code == 2, err[-2000:]
    assert "HeunDiscreteScheduler cannot sample this model" in err and "Traceback" not in err
    assert not run_dir.exists()
