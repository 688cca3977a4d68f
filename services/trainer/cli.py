"""Talk to a running trainer: start, watch, get, list and cancel runs over gRPC.

    python -m services.trainer.cli start --dataset datasets/pier-v1/manifest.json --base-model tiny \\
        --method lora --set max_steps=200 --set learning_rate=2e-4 --run-id pier-lora
    python -m services.trainer.cli watch pier-lora
    python -m services.trainer.cli list
    python -m services.trainer.cli cancel pier-lora

``--dataset KEY[@WEIGHT]`` may repeat (datasets are mixed by weight); ``--set NAME=VALUE`` sets any
field of TrainHyperparameters. The target defaults to the coordinator's trainer address setting.
"""

from __future__ import annotations

import asyncio
import json
import sys
from types import SimpleNamespace
from typing import Annotated, Literal

import typer
from google.protobuf import json_format

from dreamframe import commandline
from dreamframe.config import get_settings
from dreamframe.serving import make_channel
from dreamframe.v1 import common_pb2, train_pb2, train_pb2_grpc

pb = train_pb2
METHODS = {"lora": pb.TRAIN_METHOD_LORA, "full": pb.TRAIN_METHOD_FULL, "": pb.TRAIN_METHOD_UNSPECIFIED}

app = typer.Typer(help=__doc__.splitlines()[0], add_completion=False)
RunId = Annotated[str, typer.Argument(metavar="RUN_ID")]


# The command line is parsed into one namespace (``parse_args``): each command returns its options.
@app.callback()
def _common(
    ctx: typer.Context, target: Annotated[str | None, typer.Option(help="host:port of the trainer")] = None
) -> None:
    ctx.obj = {"target": target}


@app.command(help="start a run (prints its id)")
def start(
    ctx: typer.Context,
    dataset: Annotated[list[str], typer.Option(metavar="KEY[@WEIGHT]")],
    bucket: str = "",
    base_model: str = "",
    method: Annotated[Literal["lora", "full"] | None, typer.Option()] = None,
    run_id: str = "",
    job_id: str = "",
    hyperparameters: Annotated[list[str] | None, typer.Option("--set", metavar="NAME=VALUE")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="then follow it until it ends")] = False,
) -> SimpleNamespace:
    return SimpleNamespace(
        command="start",
        **ctx.obj,
        dataset=dataset,
        bucket=bucket,
        base_model=base_model,
        method=method or "",
        run_id=run_id,
        job_id=job_id,
        hyperparameters=hyperparameters or [],
        watch=watch,
    )


@app.command()
def watch(ctx: typer.Context, run_id: RunId) -> SimpleNamespace:
    return SimpleNamespace(command="watch", **ctx.obj, run_id=run_id)


@app.command()
def get(ctx: typer.Context, run_id: RunId) -> SimpleNamespace:
    return SimpleNamespace(command="get", **ctx.obj, run_id=run_id)


@app.command()
def cancel(ctx: typer.Context, run_id: RunId) -> SimpleNamespace:
    return SimpleNamespace(command="cancel", **ctx.obj, run_id=run_id)


@app.command("list")
def list_runs(ctx: typer.Context, job_id: str = "") -> SimpleNamespace:
    return SimpleNamespace(command="list", **ctx.obj, job_id=job_id)


def parse_args(argv: list[str] | None) -> SimpleNamespace:
    """The command and its options; ``--help`` exits 0, a usage error exits 2 (SystemExit)."""
    return commandline.run(app, argv)


def start_request(args: SimpleNamespace) -> pb.StartRunRequest:
    datasets = []
    for item in args.dataset:
        key, _, weight = item.partition("@")
        ref = common_pb2.ObjectRef(bucket=args.bucket, key=key)
        datasets.append(pb.DatasetMix(dataset=ref, weight=float(weight or 1)))
    hp = {}
    for item in args.hyperparameters:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs NAME=VALUE, got {item!r}")
        hp[name] = json.loads(value) if value not in ("true", "false") else value == "true"
    return pb.StartRunRequest(
        run_id=args.run_id,
        job_id=args.job_id,
        datasets=datasets,
        base_model=args.base_model,
        method=METHODS[args.method],
        hyperparameters=json_format.ParseDict(hp, pb.TrainHyperparameters()),
    )


def progress_line(run: pb.RunStatus) -> str:
    state = pb.RunState.Name(run.state).removeprefix("RUN_STATE_").lower()
    eta = f"{run.eta_seconds:.0f}s" if run.eta_seconds >= 0 else "?"
    line = (
        f"{run.run_id} {state} step {run.step}/{run.total_steps} epoch {run.epoch:.2f} loss {run.loss:.4f} "
        f"lr {run.learning_rate:.2e} {run.tokens_per_second:,.0f} tok/s eta {eta} bad {run.bad_samples}"
    )
    if run.error:
        line += f"\n  error: {run.error}"
    if run.final_model.key:
        line += f"\n  model: {run.final_model.bucket}/{run.final_model.key}"
    return line


async def _run(args: SimpleNamespace, out) -> int:
    settings = get_settings()
    target = args.target or settings.coordinator.trainer_address
    async with make_channel(target, settings.client) as channel:
        stub = train_pb2_grpc.TrainServiceStub(channel)
        if args.command == "start":
            response = await stub.StartRun(start_request(args))
            print(response.run_id, file=out)
            if not args.watch:
                return 0
            args.run_id = response.run_id
        if args.command in ("start", "watch"):
            run = None
            async for message in stub.WatchRun(pb.WatchRunRequest(run_id=args.run_id)):
                run = message.run
                print(progress_line(run), file=out, flush=True)
            return 0 if run is not None and run.state == pb.RUN_STATE_SUCCEEDED else 1
        if args.command == "get":
            run = (await stub.GetRun(pb.GetRunRequest(run_id=args.run_id))).run
            print(json_format.MessageToJson(run), file=out)
        elif args.command == "cancel":
            print(
                progress_line((await stub.CancelRun(pb.CancelRunRequest(run_id=args.run_id))).run), file=out
            )
        elif args.command == "list":
            for run in (await stub.ListRuns(pb.ListRunsRequest(job_id=args.job_id))).runs:
                print(progress_line(run), file=out)
    return 0


def main(argv: list[str] | None = None, out=None) -> int:
    return asyncio.run(_run(parse_args(argv), out or sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
