"""A real DreamFrame server process for the graceful-shutdown tests (run as a subprocess).

PlotService.GenerateStory streams ``--messages`` progress messages, one every ``--interval`` seconds.
Logs go to stdout as JSON lines; the test reads the bound address from the "server started" line.
The shutdown hook writes ``--marker`` so the test can see that hooks ran.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from dreamframe import commandline
from dreamframe.config import LogSettings, ServerSettings
from dreamframe.logging import configure_logging
from dreamframe.serving import GrpcServer, Registration
from dreamframe.v1 import common_pb2, plot_pb2, plot_pb2_grpc


class SlowPlot(plot_pb2_grpc.PlotServiceServicer):
    def __init__(self, messages: int, interval: float) -> None:
        self.messages = messages
        self.interval = interval

    async def GenerateStory(self, request, context):  # noqa: N802
        for i in range(self.messages):
            await asyncio.sleep(self.interval)
            yield plot_pb2.GenerateStoryResponse(
                level=1, progress=common_pb2.Progress(unit="llm_calls", done=i + 1, total=self.messages)
            )


app = typer.Typer(add_completion=False)


@app.command()
def serve(
    grace: Annotated[float, typer.Option()],
    marker: Annotated[Path, typer.Option()],
    messages: Annotated[int, typer.Option()] = 8,
    interval: Annotated[float, typer.Option()] = 0.2,
) -> None:
    configure_logging(LogSettings(level="INFO", json=True), stream=sys.stdout)

    async def checkpoint() -> None:
        marker.write_text("checkpointed\n")

    async def amain() -> None:
        server = GrpcServer(
            [
                Registration.of(
                    plot_pb2,
                    plot_pb2_grpc.add_PlotServiceServicer_to_server,
                    SlowPlot(messages, interval),
                )
            ],
            ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=grace),
            service_name="slow-plot",
            shutdown_hooks=[checkpoint],
        )
        await server.run_forever()

    asyncio.run(amain())


def main(argv: list[str] | None = None) -> None:
    commandline.run(app, argv)


if __name__ == "__main__":
    main()
