"""Build a dataset from finished jobs without a server: the same domain call the service makes.

    python -m services.qa_generator.cli --job job-a --job job-b --name my-dataset --test-fraction 0.1

Storage comes from the usual settings (DREAMFRAME_STORAGE__*); progress goes to stderr and the result
(manifest ref and counts) to stdout as JSON.
"""

from __future__ import annotations

import enum
import json
import sys
from typing import Annotated

import typer

from dreamframe import commandline
from dreamframe.config import get_settings
from dreamframe.errors import DreamFrameError
from dreamframe.progress import Progress
from dreamframe.storage import open_store

from .builder import BuildRequest, build_dataset
from .inputs import sources_from_jobs
from .options import FORMATS, make_options
from .profiles import PROFILES

app = typer.Typer(add_completion=False, rich_markup_mode=None)
Format = enum.Enum("Format", {f: f for f in FORMATS}, type=str)
ProfileName = enum.Enum("ProfileName", {p: p for p in PROFILES}, type=str)


@app.command(help=__doc__.split("\n")[0])
def build(
    job: Annotated[list[str], typer.Option(help="a finished job id (repeatable)")],
    name: Annotated[str, typer.Option(help="dataset name (default: the first job id)")] = "",
    format: Annotated[list[Format] | None, typer.Option(help="repeatable")] = None,  # noqa: A002 - the option
    fps: float = 0.0,
    validation_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    subtitles: Annotated[bool, typer.Option("--subtitles", help="put dialogues in the prompts")] = False,
    num_choices: int = 0,
    video_size: int = 0,
    profile: Annotated[
        ProfileName | None, typer.Option(help="trainer the records are for (default: qa.profile)")
    ] = None,
    max_video_seconds: Annotated[float, typer.Option(help="longest span video (default 300)")] = 0.0,
) -> int:
    settings = get_settings()
    store = open_store(settings.storage)

    def show(p: Progress) -> None:
        print(f"[{p.unit}] {p.done}/{p.total} {p.current_item} {p.message}".rstrip(), file=sys.stderr)

    try:
        options = make_options(
            formats=[f.value for f in format or []],
            fps=fps,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            seed=seed,
            include_subtitles=subtitles,
            num_choices=num_choices,
            video_size=video_size,
            profile=profile.value if profile else "",
            max_video_seconds=max_video_seconds,
            settings=settings.qa,
        )
        request = BuildRequest(job[0], name, sources_from_jobs(store, job), options)
        result = build_dataset(store, request, on_progress=show)
    except DreamFrameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    summary = {"manifest": result.manifest.__dict__, "prefix": result.prefix, "counts": result.counts}
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); the exit status (a usage error
    raises ``SystemExit(2)`` as argparse did)."""
    return commandline.run(app, argv)


if __name__ == "__main__":
    sys.exit(main())
