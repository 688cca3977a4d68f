"""Attack suite: one test per attack a hostile caller or a planted object could try (issue 19)."""
