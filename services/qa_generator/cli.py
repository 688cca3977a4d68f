"""Build a dataset from finished jobs without a server: the same domain call the service makes.

    python -m services.qa_generator.cli --job job-a --job job-b --name my-dataset --test-fraction 0.1

Storage comes from the usual settings (DREAMFRAME_STORAGE__*); progress goes to stderr and the result
(manifest ref and counts) to stdout as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from dreamframe.config import get_settings
from dreamframe.errors import DreamFrameError
from dreamframe.storage import open_store

from .builder import BuildRequest, Progress, build_dataset
from .inputs import sources_from_jobs
from .options import FORMATS, make_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.qa_generator.cli", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--job", action="append", required=True, help="a finished job id (repeatable)")
    parser.add_argument("--name", default="", help="dataset name (default: the first job id)")
    parser.add_argument("--format", action="append", default=[], choices=FORMATS, help="repeatable")
    parser.add_argument("--fps", type=float, default=0.0)
    parser.add_argument("--validation-fraction", type=float, default=0.0)
    parser.add_argument("--test-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subtitles", action="store_true", help="put dialogues in the prompts")
    parser.add_argument("--num-choices", type=int, default=0)
    parser.add_argument("--video-size", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = get_settings()
    store = open_store(settings.storage)

    def show(p: Progress) -> None:
        print(f"[{p.unit}] {p.done}/{p.total} {p.current_item} {p.message}".rstrip(), file=sys.stderr)

    try:
        options = make_options(
            formats=args.format,
            fps=args.fps,
            validation_fraction=args.validation_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            include_subtitles=args.subtitles,
            num_choices=args.num_choices,
            video_size=args.video_size,
            settings=settings.qa,
        )
        request = BuildRequest(args.job[0], args.name, sources_from_jobs(store, args.job), options)
        result = build_dataset(store, request, on_progress=show)
    except DreamFrameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    summary = {"manifest": result.manifest.__dict__, "prefix": result.prefix, "counts": result.counts}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
