"""``python -m services.keyframe_renderer.bench``: see the package's docstring."""

from services.keyframe_renderer.bench import main

main()
