"""Model presets shared by services: ``tiny`` (random, built from configs in code, CPU seconds) and the
real ones (loaded from a local path or hub id with the same code). Nothing here downloads in tests."""
