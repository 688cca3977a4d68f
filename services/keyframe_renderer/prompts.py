"""Frame prompts as rendered: the story's prompts (names already replaced by appearances) with the style
keyword in "generate an image in <keyword> style:" swapped for the learned style token.

The reference uses the keyword itself as the token, so then nothing changes; a trainer that binds the
embedding to a distinct token (``<dramatic-style>``) gets that token into every prompt instead.

Long prompts: SDXL's CLIP text encoders read 77 tokens, start and end tokens included, and drop the rest.
A story's frame text is limited where the story enters (``limits.frame_text_chars``, 2,000 characters by
default; the reference story's longest frame has 341), and each prompt is cut here to its first
``MAX_PROMPT_WORDS`` (75) whitespace-separated words. Every word is at least one token, so the cut only
removes text the encoders would have dropped: the images are the same, and a long prompt costs no more
to tokenize and store than a short one.
"""

from __future__ import annotations

import itertools
import re

from dreamframe.story import FRAME_PREFIX_RE, Story

# CLIP's 77-token context less its start and end tokens.
MAX_PROMPT_WORDS = 75


_WORD_RE = re.compile(r"\S+")


def clip_prompt(prompt: str) -> str:
    """``prompt`` up to the end of its ``MAX_PROMPT_WORDS``-th word, spacing kept (unchanged when
    it has no more words)."""
    words = list(itertools.islice(_WORD_RE.finditer(prompt), MAX_PROMPT_WORDS + 1))
    if len(words) <= MAX_PROMPT_WORDS:
        return prompt
    return prompt[: words[MAX_PROMPT_WORDS - 1].end()]


def with_style_token(prompt: str, token: str) -> str:
    """Put ``token`` where the prompt names its style; prompts without the prefix get one."""
    if not token:
        return prompt
    match = FRAME_PREFIX_RE.match(prompt)
    if match and match.group("keyword").strip() == token:
        return prompt
    body = prompt[match.end() :] if match else prompt.strip()
    return f"generate an image in {token} style: {body}"


def frame_prompts(story: Story, indices: list[int], style_token: str = "") -> dict[int, str]:
    """The render prompt of each selected frame (story order index → prompt), cut to what the text
    encoders read (``clip_prompt``)."""
    prompts = story.frame_prompts()
    return {i: clip_prompt(with_style_token(prompts[i], style_token)) for i in indices}
