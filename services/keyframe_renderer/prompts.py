"""Frame prompts as rendered: the story's prompts (names already replaced by appearances) with the style
keyword in "generate an image in <keyword> style:" swapped for the learned style token.

The reference uses the keyword itself as the token, so then nothing changes; a trainer that binds the
embedding to a distinct token (``<dramatic-style>``) gets that token into every prompt instead.
"""

from __future__ import annotations

from dreamframe.story import FRAME_PREFIX_RE, Story


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
    """The render prompt of each selected frame (story order index → prompt)."""
    prompts = story.frame_prompts()
    return {i: with_style_token(prompts[i], style_token) for i in indices}
