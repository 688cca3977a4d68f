"""What a story request may ask for: the counts of the three-level expansion and the sampling, checked
here so bad input fails before any LLM call, with an InvalidArgument naming the request field."""

from __future__ import annotations

from dataclasses import dataclass, fields

from dreamframe.errors import InvalidArgument

MAX_THEME_CHARS = 500

# The reference's shape: 11 substories × 11 tiny stories × 11 frames, 6 dialogues and 2 QA per tiny
# story, at least 12 locations.
REFERENCE_COUNTS = {
    "substories": 11,
    "tiny_stories": 11,
    "frames_per_tiny_story": 11,
    "dialogues_per_tiny_story": 6,
    "qa_per_tiny_story": 2,
    "min_locations": 12,
    "max_characters": 6,
}
# Inclusive ranges; the upper bounds keep one story (and one answer) a sane size.
COUNT_RANGES = {
    "substories": (1, 32),
    "tiny_stories": (1, 32),
    "frames_per_tiny_story": (1, 32),
    "dialogues_per_tiny_story": (0, 32),
    "qa_per_tiny_story": (0, 16),
    "min_locations": (1, 64),
    "max_characters": (1, 16),
}


@dataclass(frozen=True)
class StoryOptions:
    """The shape and sampling of one story. ``model`` is resolved by the service (empty = default)."""

    substories: int = REFERENCE_COUNTS["substories"]
    tiny_stories: int = REFERENCE_COUNTS["tiny_stories"]
    frames_per_tiny_story: int = REFERENCE_COUNTS["frames_per_tiny_story"]
    dialogues_per_tiny_story: int = REFERENCE_COUNTS["dialogues_per_tiny_story"]
    qa_per_tiny_story: int = REFERENCE_COUNTS["qa_per_tiny_story"]
    min_locations: int = REFERENCE_COUNTS["min_locations"]
    max_characters: int = REFERENCE_COUNTS["max_characters"]
    model: str = ""
    temperature: float | None = None
    seed: int = 0
    max_parallel_calls: int | None = None

    def __post_init__(self) -> None:
        for name, (low, high) in COUNT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidArgument(
                    f"must be an integer in [{low}, {high}], got {value!r}", field=f"options.{name}"
                )
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise InvalidArgument(f"must be in [0, 2], got {self.temperature!r}", field="options.temperature")
        if self.max_parallel_calls is not None and not 1 <= self.max_parallel_calls <= 1024:
            raise InvalidArgument(
                f"must be in [1, 1024], got {self.max_parallel_calls!r}", field="options.max_parallel_calls"
            )
        if not -(2**63) <= self.seed < 2**63:
            raise InvalidArgument("must fit in int64", field="options.seed")

    @property
    def total_calls(self) -> int:
        """LLM calls for a whole story: 1 (level 1) + substories (level 2) + substories × tiny stories."""
        return 1 + self.substories + self.substories * self.tiny_stories

    def counts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in COUNT_RANGES}


def validate_theme(theme: str, *, field: str = "theme") -> str:
    """The theme, stripped: non-empty, at most MAX_THEME_CHARS, no control characters but newlines."""
    if not isinstance(theme, str) or not theme.strip():
        raise InvalidArgument("must not be empty", field=field)
    theme = theme.strip()
    if len(theme) > MAX_THEME_CHARS:
        raise InvalidArgument(f"must be at most {MAX_THEME_CHARS} characters, got {len(theme)}", field=field)
    if any(ord(ch) < 32 and ch not in "\n\t" for ch in theme):
        raise InvalidArgument("must not contain control characters", field=field)
    return theme
