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

import argparse
import asyncio
import json
import sys

from google.protobuf import json_format

from dreamframe.config import get_settings
from dreamframe.serving import make_channel
from dreamframe.v1 import common_pb2, train_pb2, train_pb2_grpc

pb = train_pb2
METHODS = {"lora": pb.TRAIN_METHOD_LORA, "full": pb.TRAIN_METHOD_FULL, "": pb.TRAIN_METHOD_UNSPECIFIED}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.trainer.cli", description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None, help="host:port of the trainer")
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a run (prints its id)")
    start.add_argument("--dataset", action="append", required=True, metavar="KEY[@WEIGHT]")
    start.add_argument("--bucket", default="")
    start.add_argument("--base-model", default="")
    start.add_argument("--method", choices=["lora", "full"], default="")
    start.add_argument("--run-id", default="")
    start.add_argument("--job-id", default="")
    start.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="hyperparameters")
    start.add_argument("--watch", action="store_true", help="then follow it until it ends")
    for name in ("watch", "get", "cancel"):
        sub.add_parser(name).add_argument("run_id")
    sub.add_parser("list").add_argument("--job-id", default="")
    return p.parse_args(argv)


def start_request(args: argparse.Namespace) -> pb.StartRunRequest:
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


async def _run(args: argparse.Namespace, out) -> int:
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
