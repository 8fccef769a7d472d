"""One look across the film: the style_consistency figure and style_aligned shared attention."""

import numpy as np
import pytest
import torch

from keyframes.conditioning.style_aligned import SharedAttentionProcessor, share_attention
from keyframes.errors import ConfigError
from keyframes.generation.generator import GenerationSettings, KeyframeGenerator
from keyframes.scoring.clip import style_consistency
from keyframes.shotlist.jobs import reference_job
from tests.helpers import assert_same_picture, demo_jobs, euler_tiny_pipe


def test_style_consistency_is_mean_pairwise_cosine_across_and_within_scenes():
    features = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1
    )
    figures = style_consistency(features, ["a", "a", "b", "c"])
    # across: (a,b) 0, (a,c) .707 twice, (b,c) .707 -> mean of 5 pairs; within: the two a's
    assert figures["style_consistency"] == pytest.approx(100 * 3 * 2**-0.5 / 5)
    assert figures["style_consistency_takes"] == pytest.approx(100.0)
    assert style_consistency(features[:1], ["a"]) == {}  # no pair, no figure


@pytest.fixture(scope="module")
def setup():
    pipe = euler_tiny_pipe()
    jobs = demo_jobs(3)
    return pipe, jobs


def images(pipe, jobs, reference=None, batch_size=2):
    settings = GenerationSettings(3, 5.0, 64, 64, batch_size)
    made = KeyframeGenerator(pipe, settings, reference).run(jobs)
    return {g.job.index: np.asarray(g.image, dtype=np.int16) for batch in made for g in batch}


def shared(pipe):
    previous, processors = share_attention(pipe.unet)
    for processor in processors:
        processor.groups = 2  # classifier-free guidance at cfg 5
    return previous


def test_style_aligned_changes_the_others_and_leaves_the_reference_identical(setup):
    pipe, jobs = setup
    alone = images(pipe, jobs[:1], batch_size=1)[0]
    plain = images(pipe, jobs, reference=jobs[0])  # the same batches, attention not shared
    previous = shared(pipe)
    try:
        aligned = images(pipe, jobs, reference=jobs[0])
    finally:
        pipe.unet.set_attn_processor(previous)
    assert set(aligned) == {0, 1, 2}
    # the reference reads only itself: the same picture as made alone (another batch shape,
    # so within float noise) and as without sharing (another attention code path)
    assert_same_picture(aligned[0], alone, "reference vs alone")
    assert_same_picture(aligned[0], plain[0], "reference vs not shared")
    for i in (1, 2):
        assert np.abs(aligned[i] - plain[i]).mean() > 0.1
    # restored: the cached pipeline makes the plain images again (the same computation: exact)
    assert all((images(pipe, jobs, reference=jobs[0])[i] == plain[i]).all() for i in plain)


def test_style_aligned_resume_regenerates_the_reference_the_same_way(setup):
    pipe, jobs = setup
    previous = shared(pipe)
    try:
        full = images(pipe, jobs, reference=jobs[0], batch_size=1)
        resumed = images(pipe, jobs[1:], reference=jobs[0], batch_size=1)  # reference done
    finally:
        pipe.unet.set_attn_processor(previous)
    assert set(resumed) == {1, 2}  # the reference is made again but not reported again
    assert all((resumed[i] == full[i]).all() for i in (1, 2))


def test_only_self_attention_is_shared(setup):
    pipe, _ = setup
    previous, processors = share_attention(pipe.unet)
    try:
        kinds = {n.rsplit(".", 2)[-2]: type(p) for n, p in pipe.unet.attn_processors.items()}
        assert kinds["attn1"] is SharedAttentionProcessor and kinds["attn2"] is not kinds["attn1"]
        assert len(processors) == sum(n.endswith("attn1.processor") for n in previous)
    finally:
        pipe.unet.set_attn_processor(previous)


def test_reference_scene_must_exist(setup):
    _, jobs = setup
    assert reference_job(jobs, None) is jobs[0]
    assert reference_job(jobs, jobs[2].scene_id) is jobs[2]
    with pytest.raises(ConfigError, match="consistency.reference=nope: no such scene"):
        reference_job(jobs, "nope")
