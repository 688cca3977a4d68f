"""``dreamframe``: the command line for local runs and for any DreamFrame coordinator.

dreamframe up / down                start what is not running / stop every local service process
dreamframe restart SERVICE          stop one local service and start it again on its port
dreamframe submit --theme "..."     submit a job (``--watch`` to follow it)
dreamframe watch JOB                a progress bar per stage
dreamframe status JOB | ls | cancel JOB
dreamframe import-story FILE        upload a story file (reference or native format)
dreamframe export-story JOB         write a job's story in the reference format
dreamframe run --theme "..."        up + submit + watch + export to runs/<job>/ + down (`make run`)
"""

from __future__ import annotations

from dreamframe.cli.commands import app

__all__ = ["app"]
