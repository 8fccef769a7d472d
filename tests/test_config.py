import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import keyframes.run  # noqa: F401  (registers the schema)
from keyframes.config.validate import resolve_size, validate
from keyframes.errors import ConfigError
from tests.helpers import CONF, settings

GROUPS = {
    "model": {
        "sdxl_base",
        "sdxl_random",
        "sdxl_turbo",
        "sdxl_lightning",
        "sd15",
        "tiny",
        "tiny_sd15",
        "local",
    },
    "style": {
        "none",
        "cinematic",
        "dramatic",
        "noir",
        "documentary",
        "anime",
        "watercolor",
        "vintage_film",
        "file",
    },
    "negative": {"default", "strict", "none"},
    "sampler": {"euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc"},
    "quality": {"draft", "standard", "high"},
    "scorer": {"clip", "tiny", "none"},
    "memory": {"auto", "none", "balanced", "low_vram", "minimal"},
    "speed": {"sdpa", "fast", "compile", "deepcache"},
    "consistency": {"none", "style_aligned", "ip_adapter", "character_ref", "story"},
    "upscale": {"none", "hires", "refiner", "tiny_refiner"},
    "controlnet": {"none", "canny_sdxl", "depth_sdxl", "canny_sd15", "depth_sd15"},
}


def test_defaults_are_sdxl_base_cinematic_16_9_at_1344x768():
    cfg = settings()
    assert cfg.model.id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (cfg.style.name, cfg.quality.name, cfg.steps, cfg.cfg_scale) == (
        "cinematic",
        "standard",
        30,
        7.0,
    )
    assert validate(cfg) == (1344, 768)


def test_every_group_has_the_promised_options():
    for group, options in GROUPS.items():
        assert {p.stem for p in (CONF / group).glob("*.yaml")} == options


@pytest.mark.parametrize(
    "group, option", [(g, o) for g, opts in GROUPS.items() for o in sorted(opts)]
)
def test_every_option_composes_and_validates(group, option):
    extra = ["model.path=/some/folder"] if option == "local" else []
    cfg = settings(f"{group}={option}", *extra)
    # style=file names the preset read from style.file (tests/test_styles.py)
    assert getattr(cfg, group).name == ("" if option == "file" else option)
    validate(cfg)


def test_command_line_steps_win_over_quality_preset_and_experiment():
    assert settings("quality=high").steps == 50
    assert settings("quality=high", "steps=40").steps == 40
    assert settings("experiment=smoke").steps == 4
    assert settings("experiment=smoke", "steps=40", "cfg_scale=6").steps == 40
    assert settings("experiment=smoke", "cfg_scale=6").cfg_scale == 6.0


def test_smoke_experiment_is_tiny_offline_cpu():
    cfg = settings("experiment=smoke")
    from keyframes.pipeline.tiny_models import tiny_model_path

    # the tiny model: a local folder like any other, written once per machine
    assert Path(cfg.model.path).expanduser() == tiny_model_path("sdxl")
    assert cfg.scorer.model == "tiny" and cfg.device == "cpu"
    assert cfg.shotlist == "demo"
    assert validate(cfg) == (256, 144)


def test_wrong_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as info:
        settings("model.wrong=1")
    assert "Key 'wrong' not in 'ModelConfig'" in str(info.value.__cause__)


def test_a_preset_file_with_a_misspelt_key_fails(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "style" / "mine.yaml").write_text('name: mine\nprompt: "{prompt}"\ncolour: red\n')
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as info:
            compose("config", overrides=["style=mine"])
    assert "Key 'colour' not in 'StyleConfig'" in str(info.value)


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as info:
        settings("steps=many")
    assert isinstance(info.value.__cause__, ValidationError)


@pytest.mark.parametrize(
    "aspect, base, size",
    [
        ("16:9", 1024, (1344, 768)),
        ("1:1", 1024, (1024, 1024)),
        ("9:16", 1024, (768, 1344)),
        ("2.39:1", 1024, (1536, 640)),
        ("4:3", 1024, (1152, 896)),
        ("16:9", 768, (1008, 576)),
    ],
)
def test_aspect_maps_to_an_sdxl_training_resolution(aspect, base, size):
    assert resolve_size(aspect, base) == size


def test_explicit_width_and_height_win_over_aspect():
    assert resolve_size("16:9", 1024, 512, 512) == (512, 512)
    assert resolve_size("16:9", 1024, width=1024) == (1024, 576)
    assert resolve_size("2:1", 1024, height=512) == (1024, 512)


def test_all_bad_numbers_are_reported_together():
    cfg = settings(
        "steps=0",
        "cfg_scale=-1",
        "width=1001",
        "takes=0",
        "batch_size=0",
        "device=tpu",
        "aspect=wide",
    )
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.problems == [
        "steps=0: must be at least 1",
        "cfg_scale=-1.0: must be a number >= 0",
        "takes=0: must be between 1 and 1000",
        "batch_size=0: must be at least 1",
        "device=tpu: must be one of auto, cuda, mps, cpu",
        "width=1001: must be a multiple of 8 and at least 64",
        "aspect='wide': expected W:H, e.g. 16:9",
    ]


def test_style_without_prompt_placeholder_is_rejected():
    with pytest.raises(ConfigError, match="lacks \\{prompt\\}"):
        validate(settings("style.prompt=just words"))


def test_an_objective_needs_the_score_it_ranks_by():
    validate(settings("objective=aesthetic_score_mean"))  # the default scorer has the head
    for overrides, needs in (
        (("objective=aesthetic_score_mean", "scorer.aesthetic=null"), "scorer.aesthetic set"),
        (("objective=aesthetic_score_mean", "scorer=none"), "scorer.aesthetic set"),
        (("objective=clip_score_per_second", "scorer=none"), "needs a scorer"),
    ):
        with pytest.raises(ConfigError) as info:
            validate(settings(*overrides))
        assert [p for p in info.value.problems if needs in p], info.value.problems
    validate(settings("scorer=none"))  # the default objective: a grid sweep needs no value


def test_a_guidance_interval_is_a_share_of_the_steps_and_not_with_style_aligned():
    validate(settings("guidance_interval=[0.2,0.8]"))
    for overrides, problem in (
        (("guidance_interval=[0.6,0.2]",), "must be [start, end] with 0 <= start <= end <= 1"),
        (("guidance_interval=[0.5]",), "must be [start, end]"),
        (("guidance_interval=[0,0.5]", "consistency=style_aligned"), "use one or the other"),
    ):
        with pytest.raises(ConfigError) as info:
            validate(settings(*overrides))
        assert [p for p in info.value.problems if problem in p], info.value.problems


def test_deepcache_settings_are_checked_and_change_the_resume_hash():
    from keyframes.config.plan import config_hash

    validate(settings("speed=deepcache", "speed.deepcache_branch=1"))  # SDXL: three levels
    validate(settings("model=tiny", "speed=deepcache", "speed.deepcache_branch=1"))  # tiny too
    for overrides, problem in (
        (("speed.deepcache_interval=0",), "speed.deepcache_interval=0: must be at least 1"),
        (("speed=deepcache", "speed.deepcache_branch=2"), "must be 0..1"),
    ):
        with pytest.raises(ConfigError) as info:
            validate(settings(*overrides))
        assert [p for p in info.value.problems if problem in p], info.value.problems

    def hash_of(*overrides):  # the plan's hash of these settings, without making a plan
        cfg = settings("experiment=smoke", *overrides)
        return config_hash(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))

    plain = hash_of()
    # speed settings that keep the picture leave resume alone; feature reuse changes it
    assert hash_of("speed=fast") == hash_of("speed.deepcache_interval=1") == plain
    assert len({plain, hash_of("speed=deepcache"), hash_of("speed.deepcache_interval=2")}) == 3
