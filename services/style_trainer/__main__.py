"""``python -m services.style_trainer``: run the style-trainer gRPC service."""

from __future__ import annotations

from .server import main

main()
