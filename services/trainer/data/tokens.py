"""Token budgets and counts: the per-sample ``max_length`` and each conversation's exact token length
(visual tokens included)."""

from __future__ import annotations

from collections.abc import Sequence

from dreamframe.errors import InvalidArgument
from dreamframe.models import video_llm

from .records import Conversation


def resolve_max_length(requested: int, processor, num_frames: int, model_max_positions: int) -> int:
    """The per-sample token budget: as requested, or 2048 text tokens plus the frames' visual tokens,
    capped by the model's context. It must leave room for the frames and a short exchange."""
    visual = num_frames * video_llm.image_token_count(processor)
    length = requested or min(2048 + visual, model_max_positions or 2048 + visual)
    if length < visual + 16:
        raise InvalidArgument(
            f"{length} tokens cannot hold {num_frames} frames of {visual // num_frames} visual tokens "
            f"plus text; use >= {visual + 16} or fewer frames",
            field="hyperparameters.max_length",
        )
    return length


def token_lengths(
    processor, items: Sequence[tuple[int, Conversation]], *, prompt_only: bool = False
) -> list[int]:
    """Exact token counts (visual tokens included) of conversations with ``n`` frames each; with
    ``prompt_only``, of everything before the first answer."""
    if not items:
        return []
    per_image = video_llm.image_token_count(processor)
    texts = []
    for n_images, conv in items:
        turns = conv.turns[:1] if prompt_only else conv.turns
        if prompt_only:
            turns = ((turns[0][0], None),)
        messages = video_llm.conversation(n_images, turns, system=conv.system)
        texts.append(
            processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt_only)
        )
    encoded = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) + n * (per_image - 1) for ids, (n, _) in zip(encoded, items, strict=True)]
