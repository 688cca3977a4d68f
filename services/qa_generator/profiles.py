"""Dataset profiles: the trainer a dataset's conversation records are written for, and the rules of
that trainer's own data loader (``check.py`` verifies a dataset against them).

Both targets are LLaVA-style loaders; what differs is what they read and how far a question may sit in
the human turn. Each rule names the official code it follows (read from the public repositories):

- ``llama-vid``: dvlab-research/LLaMA-VID, llamavid/train/train.py ``LazySupervisedDataset.__getitem__``
  and ``preprocess_imgsp_v1`` (``--version imgsp_v1`` in scripts/video/train/stage_2_full_v7b_224_fps_1.sh),
  llamavid/model/llamavid_arch.py ``vlm_attention``. The default: the paper trains LLaMA-VID, and
  services/trainer's loader (data/records.py) reads every record this profile writes.
- ``llava-next-video``: LLaVA-VL/LLaVA-NeXT, llava/train/train.py ``LazySupervisedDataset._get_item`` and
  ``preprocess_multimodal``, llava/utils.py ``process_video_with_decord``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreamframe.errors import InvalidArgument
from dreamframe.limits import short_repr

LLAMA_VID = "llama-vid"
LLAVA_NEXT_VIDEO = "llava-next-video"
DEFAULT_PROFILE = LLAMA_VID
IMAGE_TOKEN = "<image>"
# LLaVA's conversation roles: train.py maps {"human", "gpt"} and asserts they alternate from "human".
HUMAN, GPT = "human", "gpt"


@dataclass(frozen=True)
class Profile:
    name: str
    loader: str
    # 'image' may be a list of files, each with its own <image> in the text (LLaVA-NeXT's multi-image
    # branch); LLaMA-VID opens 'image' as one file (os.path.join(image_folder, image_file)).
    image_list: bool
    # LLaMA-VID's text query: each human turn with <image> and newlines removed
    # (preprocess_imgsp_v1: ``.replace(DEFAULT_IMAGE_TOKEN, '').replace('\n', '')``), tokenized by
    # bert-base-uncased with truncation to 256 tokens, [CLS] and [SEP] included, from the left: the end
    # of the turn stays (llamavid_arch.py ``init_bert(..., truncation_side="left")``, vlm_attention
    # ``max_length=256``). None: the target has no text query.
    text_query_tokens: int | None
    # Both loaders keep every round(avg_fps / video_fps)-th frame with --video_fps 1 (LLaMA-VID
    # train.py ``sample_fps = round(vr.get_avg_fps()/self.data_args.video_fps)``, LLaVA-NeXT utils.py
    # process_video_with_decord): a video at 0.5 fps or less gives a step of 0 and the sample fails.
    video_fps: int = 1

    def frames_only_refusal(self) -> str:
        """Why this target cannot train on frames-only records (keyframe lists without an mp4)."""
        if self.image_list:
            reads = (
                "'video' (an mp4) or 'image' (one file, or a list with one <image> per file: a span's "
                "11 to 1,331 keyframes as separate images do not fit the context); it reads frame "
                "folders only under paths containing 'shareVideoGPTV'"
            )
        else:
            reads = "'video' (an mp4) or 'image' (one file)"
        return (
            f"profile {self.name!r}: the trainer reads a sample's visuals only from {reads}, never "
            "'frames' (records would train without visuals); add the video_mp4 format"
        )


PROFILES: dict[str, Profile] = {
    LLAMA_VID: Profile(
        name=LLAMA_VID,
        loader="dvlab-research/LLaMA-VID llamavid/train/train.py",
        image_list=False,
        text_query_tokens=256,
    ),
    LLAVA_NEXT_VIDEO: Profile(
        name=LLAVA_NEXT_VIDEO,
        loader="LLaVA-VL/LLaVA-NeXT llava/train/train.py",
        image_list=True,
        text_query_tokens=None,
    ),
}


def get_profile(name: str, *, field: str = "options.profile") -> Profile:
    """The named profile ('' means the default); InvalidArgument naming ``field`` if unknown."""
    name = name or DEFAULT_PROFILE
    if name not in PROFILES:
        raise InvalidArgument(
            f"unknown profile {short_repr(name)} (known: {', '.join(PROFILES)})", field=field
        )
    return PROFILES[name]
