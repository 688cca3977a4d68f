"""The training process: ``python -m services.trainer.worker --run-dir DIR`` (one process) or, for
several GPUs, ``torchrun --nproc_per_node=N -m services.trainer.worker --run-dir DIR``.

The run manager writes ``DIR/launch.json`` (the run's spec and the trainer's runtime settings) and
talks to the worker through files in DIR, which rank 0 reads and writes:

- ``progress.json``  rank 0's latest Progress (atomically replaced, at most a few times a second)
- ``control.json``   the manager's stop request: ``{"stop": "cancel" | "shutdown"}``
- ``result.json``    how the run ended: status, final model and metrics refs, or the error

Storage comes from the process's DreamFrame settings (the environment the manager passes on).
SIGTERM, or the manager process going away, is a shutdown request: checkpoint and exit, to be resumed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from dreamframe import commandline
from dreamframe.errors import described

LAUNCH, PROGRESS, CONTROL, RESULT = "launch.json", "progress.json", "control.json", "result.json"


def write_json_atomic(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value: object) -> object:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class FileHooks:
    """Rank 0's progress and stop channel through the run directory."""

    def __init__(self, run_dir: Path, manager_pid: int | None, min_interval: float = 0.25) -> None:
        from .contract import Stop

        self.run_dir = run_dir
        self.manager_pid = manager_pid
        self.min_interval = min_interval
        self.last_write = 0.0
        self.last_checkpoint = None
        self.terminated = False
        self.Stop = Stop

    def on_progress(self, progress) -> None:
        now = time.monotonic()
        # The same key (latest.json) names every checkpoint; its hash tells them apart.
        checkpoint = progress.checkpoint.sha256 if progress.checkpoint else None
        final = progress.step >= progress.total_steps
        if now - self.last_write >= self.min_interval or checkpoint != self.last_checkpoint or final:
            write_json_atomic(self.run_dir / PROGRESS, progress.to_dict())
            self.last_write, self.last_checkpoint = now, checkpoint

    def should_stop(self):
        control = read_json(self.run_dir / CONTROL) or {}
        if control.get("stop") == "cancel":
            return self.Stop.CANCEL
        if control.get("stop") == "shutdown" or self.terminated or not self._manager_alive():
            return self.Stop.SHUTDOWN
        return self.Stop.NONE

    def _manager_alive(self) -> bool:
        if not self.manager_pid:
            return True
        try:
            os.kill(self.manager_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


app = typer.Typer(add_completion=False)


@app.command(help="The training process of one run (torchrun starts one per GPU).")
def work(run_dir: Annotated[Path, typer.Option(help="the run directory (launch.json is in it)")]) -> int:
    """Train the run ``run_dir/launch.json`` describes; 0 when it ended (succeeded, cancelled or
    interrupted), 1 when it failed."""
    launch = json.loads((run_dir / LAUNCH).read_text())
    rank = int(os.environ.get("RANK", "0"))

    # Libraries' deprecation chatter would fill every run's log; real problems still surface.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    from dreamframe.config import get_settings
    from dreamframe.errors import DreamFrameError
    from dreamframe.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log)

    from dreamframe.storage import open_store

    from .contract import Runtime
    from .spec import RunSpec
    from .training import run_training

    hooks = FileHooks(run_dir, launch.get("manager_pid"))
    signal.signal(signal.SIGTERM, lambda *_: setattr(hooks, "terminated", True))
    spec = RunSpec.from_dict(launch["spec"])
    runtime = Runtime(
        **{k: (Path(v) if k in ("work_dir", "model_cache_dir") else v) for k, v in launch["runtime"].items()}
    )
    trainer_settings = getattr(settings, "trainer", None)
    if trainer_settings is not None:
        runtime.loader_workers = trainer_settings.loader_workers
        runtime.loader_prefetch = trainer_settings.loader_prefetch
    store = open_store(settings.storage)
    result: dict
    code = 0
    try:
        outcome = run_training(spec, store, runtime, hooks)
        if rank == 0:
            write_json_atomic(run_dir / PROGRESS, outcome.progress.to_dict())
        result = {
            "status": outcome.status,
            "progress": outcome.progress.to_dict(),
            "final_model": outcome.final_model,
            "final_model_prefix": outcome.final_model_prefix,
            "metrics": outcome.metrics,
            "checkpoints_dropped": outcome.checkpoints_dropped,
        }
    except DreamFrameError as exc:
        result, code = {"status": "failed", "error": exc.message, "field": exc.field}, 1
    except Exception as exc:  # noqa: BLE001 - the run's record must say why it died
        result, code = {"status": "failed", "error": described(exc)}, 1
        import traceback

        traceback.print_exc()
    if rank == 0:
        write_json_atomic(run_dir / RESULT, result)
    store.close()
    return code


def main(argv: list[str] | None = None) -> int:
    return commandline.run(app, argv)


if __name__ == "__main__":
    sys.exit(main())
