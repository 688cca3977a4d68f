"""Run specs: defaults (zero means default), validation naming the field, JSON round trip; run records."""

from __future__ import annotations

import math

import pytest
from test_trainer_support import local_store

from dreamframe.errors import InvalidArgument, NotFound
from services.trainer.run_store import RunRecord, RunState, RunStore
from services.trainer.spec import DEFAULT_LR, DatasetSource, Hyperparameters, Method, RunSpec, build_spec


def _spec(**hp) -> RunSpec:
    return build_spec(
        run_id="r1",
        datasets=[DatasetSource(key="datasets/a/train.json")],
        base_model="tiny",
        method="lora",
        hyperparameters=hp,
    )


def test_zero_means_default_and_lr_depends_on_method():
    spec = _spec(epochs=0, per_device_batch_size=0, num_frames=0, max_bad_sample_fraction=0.0)
    assert spec.hyperparameters == Hyperparameters()
    assert spec.learning_rate == DEFAULT_LR[Method.LORA] == 2e-4
    full = build_spec(run_id="r2", datasets=[DatasetSource(key="d.json")], base_model="tiny", method="full")
    assert full.learning_rate == 2e-5  # the reference's
    assert (
        build_spec(run_id="r3", datasets=[DatasetSource(key="d.json")], base_model="x", method=None).method
        == "lora"
    )


@pytest.mark.parametrize(
    ("hp", "field"),
    [
        ({"learning_rate": -1.0}, "hyperparameters.learning_rate"),
        ({"learning_rate": math.nan}, "hyperparameters.learning_rate"),
        ({"warmup_ratio": 1.5}, "hyperparameters.warmup_ratio"),
        ({"per_device_batch_size": -2}, "hyperparameters.per_device_batch_size"),
        ({"num_frames": 1000}, "hyperparameters.num_frames"),
        ({"max_bad_sample_fraction": 2.0}, "hyperparameters.max_bad_sample_fraction"),
        ({"num_processes": 65}, "hyperparameters.num_processes"),
        ({"max_steps": -1}, "hyperparameters.max_steps"),
        ({"bogus": 1}, "hyperparameters.bogus"),
    ],
)
def test_bad_hyperparameters_name_the_field(hp, field):
    with pytest.raises(InvalidArgument) as err:
        _spec(**hp)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"run_id": "../x"}, "run_id"),
        ({"datasets": []}, "datasets"),
        ({"datasets": [DatasetSource(key="/abs.json")]}, "datasets[0].dataset.key"),
        (
            {"datasets": [DatasetSource(key="a.json"), DatasetSource(key="b.json", weight=-1)]},
            "datasets[1].weight",
        ),
        ({"datasets": [DatasetSource(key="a.json", bucket="Bad_Bucket")]}, "datasets[0].dataset.bucket"),
        ({"base_model": ""}, "base_model"),
        ({"base_model": "a b"}, "base_model"),
        ({"method": "qlora"}, "method"),
        ({"job_id": "no/slash"}, "job_id"),
    ],
)
def test_bad_requests_name_the_field(kwargs, field):
    args = (
        dict(run_id="r1", datasets=[DatasetSource(key="d.json")], base_model="tiny", method="full") | kwargs
    )
    with pytest.raises(InvalidArgument) as err:
        build_spec(**args)
    assert err.value.field == field


def test_dataset_weight_zero_means_one():
    spec = build_spec(
        run_id="r", datasets=[DatasetSource(key="d.json", weight=0)], base_model="tiny", method="full"
    )
    assert spec.datasets[0].weight == 1.0


def test_run_records_round_trip_and_list(tmp_path):
    store = RunStore(local_store(tmp_path))
    a = RunRecord(spec=_spec(max_steps=3))
    b = RunRecord(
        spec=build_spec(
            run_id="r2",
            job_id="job-7",
            datasets=[DatasetSource(key="d.json")],
            base_model="tiny",
            method="full",
        ),
        state=RunState.SUCCEEDED,
        created_at=a.created_at + 1,
    )
    store.save(a)
    store.save(b)
    assert store.load("r1") == a
    assert RunSpec.from_dict(a.spec.to_dict()) == a.spec
    assert [r.run_id for r in store.list()] == ["r1", "r2"]
    assert [r.run_id for r in store.list("job-7")] == ["r2"]
    assert not RunState.RUNNING.terminal and RunState.CANCELLED.terminal
    with pytest.raises(NotFound) as err:
        store.load("nope")
    assert err.value.field == "run_id"
