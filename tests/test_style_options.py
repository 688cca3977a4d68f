"""Style options: the reference schedule and the validation that names the bad field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dreamframe.errors import InvalidArgument
from services.style_trainer.options import (
    PROMPT_TEMPLATES,
    PROMPT_VARIATIONS,
    REFERENCE_LR_STAGES,
    ImageOptions,
    TrainOptions,
    learning_rate,
    resolve_resolution,
    stage_ends,
    validate_images,
    validate_train,
)


def test_defaults_are_the_reference_setting():
    o = TrainOptions()
    assert o.max_train_steps == 400 and o.gradient_accumulation_steps == 2 and o.total_passes == 800
    assert o.batch_size == 1 and o.weight_decay == 1e-2 and o.max_grad_norm == 1.0 and o.init_scale == 0.01
    assert (o.num_train_timesteps, o.beta_start, o.beta_end, o.beta_schedule) == (
        1000,
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert o.mirror
    assert PROMPT_TEMPLATES[0] == "generate an image in {} style" and len(PROMPT_TEMPLATES) == 5
    assert PROMPT_VARIATIONS == ("painting", "acryl", "art", "picture")
    assert ImageOptions().num_images == 20


def test_reference_stages_fall_linearly_from_1e3_to_3e4():
    steps = [n for n, _ in REFERENCE_LR_STAGES]
    lrs = [lr for _, lr in REFERENCE_LR_STAGES]
    assert steps == [4, 8, 13, 20, 35, 60, 100, 160] and sum(steps) == 400
    np.testing.assert_allclose(lrs, np.linspace(1e-3, 3e-4, 8), rtol=0, atol=1e-12)


def test_schedule_matches_the_reference_loop():
    # The reference: lr changes after the stage's step count of optimizer steps has been taken.
    expected = [lr for n, lr in REFERENCE_LR_STAGES for _ in range(n)]
    got = [learning_rate(step, 400, REFERENCE_LR_STAGES) for step in range(400)]
    assert got == expected


def test_schedule_scales_to_other_lengths():
    assert stage_ends(REFERENCE_LR_STAGES, 400) == [4, 12, 25, 45, 80, 140, 240, 400]
    assert stage_ends(REFERENCE_LR_STAGES, 800) == [8, 24, 50, 90, 160, 280, 480, 800]
    short = [learning_rate(step, 6, REFERENCE_LR_STAGES) for step in range(6)]
    assert short == sorted(short, reverse=True) and short[-1] == 3e-4
    assert learning_rate(0, 800, REFERENCE_LR_STAGES) == 1e-3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_train_steps": 0}, "options.max_train_steps"),
        ({"max_train_steps": 10_001}, "options.max_train_steps"),
        ({"gradient_accumulation_steps": 0}, "options.gradient_accumulation_steps"),
        ({"resolution": 100}, "options.resolution"),
        ({"lr_stages": ((4, 1e-3), (0, 1e-4))}, "options.lr_stages.1"),
        ({"templates": ("no placeholder",)}, "options.templates.0"),
        ({"checkpoint_every": -1}, "options.checkpoint_every"),
        ({"loss_read_every": 0}, "options.loss_read_every"),
        ({"attention_backend": "fastest"}, "options.attention_backend"),
    ],
)
def test_bad_train_options_name_the_field(change, field):
    with pytest.raises(InvalidArgument) as info:
        validate_train(dataclasses.replace(TrainOptions(), **change))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_images": 0}, "options.num_style_images"),
        ({"steps": 0}, "options.image_steps"),
        ({"size": 65}, "options.image_size"),
    ],
)
def test_bad_image_options_name_the_field(change, field):
    with pytest.raises(InvalidArgument) as info:
        validate_images(dataclasses.replace(ImageOptions(), **change))
    assert info.value.field == field


def test_speed_options_do_not_change_the_fingerprint():
    fast = dataclasses.replace(
        TrainOptions(),
        compile=True,
        compile_text_encoders=True,
        channels_last=True,
        loss_read_every=10,
        attention_backend="cudnn",
        batch_accumulation=True,
    )
    assert fast.fingerprint_fields() == TrainOptions().fingerprint_fields()


def test_resolution_is_768_capped_at_the_model_size():
    assert resolve_resolution(TrainOptions(), 1024) == 768
    assert resolve_resolution(TrainOptions(), 64) == 64
    assert resolve_resolution(TrainOptions(resolution=512), 1024) == 512
