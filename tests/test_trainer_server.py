"""TrainService over real gRPC on 127.0.0.1:0 with a real worker process: StartRun → WatchRun until the
run succeeds; GetRun, ListRuns, CancelRun; bad requests come back as INVALID_ARGUMENT / NOT_FOUND naming
the field."""

from __future__ import annotations

import asyncio
import contextlib
import io

import grpc
import pytest
from test_trainer_runs import manager
from test_trainer_support import local_store, make_dataset

from dreamframe.config import ServerSettings
from dreamframe.serving import GrpcServer, Registration, error_detail_from
from dreamframe.v1 import common_pb2, train_pb2, train_pb2_grpc
from services.trainer import bench, cli, worker
from services.trainer.server import TrainServicer, spec_from_request

pb = train_pb2


@contextlib.asynccontextmanager
async def serving(m):
    await m.start()
    registration = Registration.of(pb, train_pb2_grpc.add_TrainServiceServicer_to_server, TrainServicer(m))
    server = GrpcServer(
        [registration], ServerSettings(host="127.0.0.1", port=0, metrics_port=-1), service_name="trainer-test"
    )
    try:
        async with server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                yield train_pb2_grpc.TrainServiceStub(channel), server.address
    finally:
        await m.shutdown()


def _request(ref, **hp) -> pb.StartRunRequest:
    return pb.StartRunRequest(
        run_id="grpc-run",
        job_id="job-1",
        datasets=[pb.DatasetMix(dataset=common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256), weight=1)],
        base_model="tiny",
        method=pb.TRAIN_METHOD_LORA,
        hyperparameters=pb.TrainHyperparameters(
            max_steps=3, learning_rate=1e-3, per_device_batch_size=2, num_frames=2, lora_rank=4, **hp
        ),
    )


async def _error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    detail = error_detail_from(err.value)
    return err.value.code(), detail.field if detail else ""


def test_request_conversion_keeps_the_callers_digits():
    spec = spec_from_request(
        pb.StartRunRequest(
            run_id="r",
            datasets=[pb.DatasetMix(dataset=common_pb2.ObjectRef(key="d.json"))],
            hyperparameters=pb.TrainHyperparameters(learning_rate=2e-5, warmup_ratio=0.1),
        ),
        "tiny",
    )
    assert spec.learning_rate == 2e-5 and spec.hyperparameters.warmup_ratio == 0.1
    assert spec.base_model == "tiny" and spec.method == "lora" and spec.datasets[0].weight == 1.0
    args = cli.parse_args(
        [
            "start",
            "--dataset",
            "a.json@3",
            "--dataset",
            "b.json",
            "--method",
            "full",
            "--set",
            "max_steps=7",
            "--set",
            "learning_rate=2e-5",
            "--set",
            "gradient_checkpointing=true",
        ]
    )
    spec = spec_from_request(cli.start_request(args), "tiny")
    assert [d.weight for d in spec.datasets] == [3.0, 1.0] and spec.method == "full"
    assert spec.hyperparameters.max_steps == 7 and spec.hyperparameters.gradient_checkpointing
    assert spec.learning_rate == 2e-5
    assert cli.parse_args(["--target", "h:1", "watch", "r"]) == cli.parse_args(["--target=h:1", "watch", "r"])
    assert vars(cli.parse_args(["list"])) == {"command": "list", "target": None, "job_id": ""}


@pytest.mark.parametrize(
    ("main", "argv", "code"),
    [
        (cli.parse_args, [], 2),  # no command
        (cli.parse_args, ["start"], 2),  # --dataset is required
        (cli.parse_args, ["start", "--dataset", "d.json", "--method", "half"], 2),
        (cli.parse_args, ["--help"], 0),
        (worker.main, [], 2),  # --run-dir is required
        (bench.parse_args, ["--precision", "fp16"], 2),
        (bench.parse_args, ["--help"], 0),
    ],
)
def test_command_lines_exit_as_argparse_did(main, argv, code):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == code


@pytest.mark.slow
def test_train_over_grpc(tmp_path):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=4)

    async def body():
        async with serving(manager(tmp_path, store)) as (stub, address):
            bad = await _error(stub.StartRun(_request(ref, warmup_ratio=3.0)))
            assert bad == (grpc.StatusCode.INVALID_ARGUMENT, "hyperparameters.warmup_ratio")
            missing = _request(ref)
            missing.datasets[0].dataset.key = "datasets/none/train.json"
            assert await _error(stub.StartRun(missing)) == (
                grpc.StatusCode.NOT_FOUND,
                "datasets[0].dataset.key",
            )
            unknown = await _error(stub.GetRun(pb.GetRunRequest(run_id="nope")))
            assert unknown == (grpc.StatusCode.NOT_FOUND, "run_id")

            started = await stub.StartRun(_request(ref), timeout=30)
            assert started.run_id == "grpc-run"
            statuses = [
                r.run async for r in stub.WatchRun(pb.WatchRunRequest(run_id="grpc-run"), timeout=240)
            ]
            got = await stub.GetRun(pb.GetRunRequest(run_id="grpc-run"))
            listed = await stub.ListRuns(pb.ListRunsRequest(job_id="job-1"))
            other_job = await stub.ListRuns(pb.ListRunsRequest(job_id="job-2"))
            cancelled = await stub.CancelRun(pb.CancelRunRequest(run_id="grpc-run"))
            printed = io.StringIO()
            code = await asyncio.to_thread(
                cli.main, ["--target", address, "list", "--job-id", "job-1"], printed
            )
            assert code == 0
            return statuses, got.run, listed.runs, other_job.runs, cancelled.run, printed.getvalue()

    statuses, got, listed, other_job, cancelled, printed = asyncio.run(body())
    final = statuses[-1]
    assert final.state == pb.RUN_STATE_SUCCEEDED, final.error
    assert [s.step for s in statuses] == sorted(s.step for s in statuses)
    assert final.step == final.total_steps == 3 and final.tokens_seen > 0 and final.samples_seen == 6
    assert final.final_model.key == "runs/grpc-run/final/manifest.json" and final.final_model_prefix
    assert store.stat(final.final_model.key).sha256 == final.final_model.sha256
    assert final.metrics.key == "runs/grpc-run/metrics.json"
    # Finished: its resume checkpoints were deleted (trainer.keep_checkpoints_after_success is off), and
    # the status no longer names one.
    assert not final.HasField("checkpoint") and not list(store.list("runs/grpc-run/checkpoints/"))
    assert final.base_model == "tiny" and final.method == pb.TRAIN_METHOD_LORA and final.job_id == "job-1"
    assert got == final
    assert [r.run_id for r in listed] == ["grpc-run"] and not other_job
    assert cancelled.state == pb.RUN_STATE_SUCCEEDED  # cancelling a finished run changes nothing
    assert (
        printed.startswith("grpc-run succeeded step 3/3")
        and "model: dreamframe/runs/grpc-run/final" in printed
    )
