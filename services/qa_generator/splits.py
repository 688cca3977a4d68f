"""Train/validation/test by story, so no story's frames or QA leak from one split into another.

Stories are ordered by a seeded hash of their id (not by request order), then cut by the fractions:
the same stories and seed always give the same splits, whatever order the stories were listed in.
"""

from __future__ import annotations

import hashlib


def assign_splits(
    story_ids: list[str], *, validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """story id → "train" | "validation" | "test"."""
    order = sorted(story_ids, key=lambda sid: hashlib.sha256(f"{seed}\0{sid}".encode()).hexdigest())
    n = len(order)
    n_test = round(n * test_fraction)
    n_validation = round(n * validation_fraction)
    # Rounding must not swallow train while the fractions leave room for it.
    while n_test + n_validation > n or (
        n_test + n_validation == n and validation_fraction + test_fraction < 1 and n
    ):
        if n_validation >= n_test and n_validation > 0:
            n_validation -= 1
        elif n_test > 0:
            n_test -= 1
        else:
            break
    splits: dict[str, str] = {}
    for i, sid in enumerate(order):
        splits[sid] = "test" if i < n_test else "validation" if i < n_test + n_validation else "train"
    return splits
