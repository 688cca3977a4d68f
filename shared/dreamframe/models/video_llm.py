"""Video-LLM presets, shared by the trainer (fine-tunes them) and the evaluator (loads its checkpoints).

The model class is transformers' ``LlavaForConditionalGeneration`` with its ``LlavaProcessor``: a video
is N frames sampled uniformly and given to the model as N image entries of one user turn. That keeps the
whole path transformers-native and offline (the LLaVA-NeXT-Video/Video-LLaVA *video* processors need
torchvision), and the same class loads ``llava-hf/llava-1.5-7b-hf``, a Vicuna-7B-v1.5 model (the
language model the paper's LLaMA-VID baseline is built on).

- ``tiny``: the same classes with very small random configs (a byte-level BPE tokenizer trained in code,
  a 2-layer CLIP vision tower, a 2-layer Llama). Built once from a fixed seed, saved with
  ``save_pretrained`` into the model cache and loaded back by path like a real checkpoint.
- ``llava-1.5-7b``: the hub id above, or a local path given in ``model_paths``; any other value is taken
  as a local path or hub id of a Llava checkpoint (a trained DreamFrame model, for instance).
- ``llava-1.5-7b-random``: the same architecture with seeded random weights and a Llama-size (32,000)
  tokenizer, written once into the model cache in llava-hf's layout (``dreamframe.models.snapshots``)
  and loaded by path.

Every model is used with one conversation format, ``CHAT_TEMPLATE`` (Vicuna v1 with LLaVA-1.5's system
prompt, as LLaVA-1.5 and LLaMA-VID train); its ``{% generation %}`` markers let the processor return the
answer-token mask the trainer's loss uses.

API for callers: ``resolve_model_path``, ``load_video_llm``, ``read_video_frames``, ``prepare_inputs``,
``generate``; the trainer also uses ``encode_conversation``, ``conversation`` and ``image_token_count``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamframe.errors import FailedPrecondition, InvalidArgument
from dreamframe.models import build_once
from dreamframe.models.device import pick_device
from dreamframe.models.snapshot_cache import LLAVA_7B_RANDOM, snapshot_dir

TINY = "tiny"
LLAVA_7B = "llava-1.5-7b"
PRESETS = (TINY, LLAVA_7B, LLAVA_7B_RANDOM)
HUB_IDS = {LLAVA_7B: "llava-hf/llava-1.5-7b-hf"}
# Bump when the tiny configs change, so stale caches are rebuilt instead of reused.
TINY_VERSION = 1
TINY_SEED = 2024
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
IMAGE_TOKEN = "<image>"
DEFAULT_NUM_FRAMES = 4
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Vicuna v1 as LLaVA-1.5 trains: "<s>SYSTEM USER: <image>...\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>".
# Content may be a string or a list of {"type": "image"|"text"} items; each image item becomes one
# <image> placeholder (the processor expands it to the frame's visual tokens). Everything is one line:
# chat templates run with trim_blocks, which would eat literal newlines.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{{ messages[0]['content'] }}"
    "{% else %}{% for c in messages[0]['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{% endif %}"
    "{% else %}" + SYSTEM_PROMPT + "{% endif %}{{ ' ' }}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] if c['type'] in ('image', 'video') %}{{ '<image>' }}"
    "{% if loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{{ eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Text the tiny tokenizer's BPE merges are learnt from: any text still tokenizes (byte-level alphabet).
_TINY_CORPUS = [
    SYSTEM_PROMPT,
    "USER: What is happening in the video? ASSISTANT: A man is walking in the park.",
    "USER: Who is talking to the woman? ASSISTANT: The old man in a red coat is talking to her.",
    "USER: Where does the story take place? ASSISTANT: In a small town by the sea, at night.",
    "USER: Why is she sad? ASSISTANT: Because her friend left the city without saying goodbye.",
    "USER: How does the scene end? ASSISTANT: They hug, smile and walk home together.",
    "Describe the video in detail. The characters stand, sit, look, talk, hold, squat, walk and hug.",
    "Best option:(A) (B) (C) (D) yes no the a an of in on at to is are was were and or but",
    "Subtitles: generate an image in Dramatic style: at a park, a woman looks like an actress in blue",
]


def conversation(
    frames: Sequence[Any] | int, turns: Sequence[tuple[str, str | None]], *, system: str | None = None
) -> list[dict]:
    """Chat messages for ``turns`` of (question, answer or None): the frames (PIL images, or just how many
    placeholders when an int) open the first user turn; an answer of None ends the list at that question."""
    if isinstance(frames, int):
        images = [{"type": "image"} for _ in range(frames)]
    else:
        images = [{"type": "image", "image": frame} for frame in frames]
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    for i, (question, answer) in enumerate(turns):
        content = (images if i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


# --- presets -------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, "<video>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS * 8, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": "<video>"},
        model_max_length=1024,
    )


def build_tiny_video_llm(seed: int = TINY_SEED):
    """(model, processor): a tiny random LLaVA (CLIP vision 32 px / patch 8 → 16 tokens a frame, 2-layer
    Llama of width 64), fp32 on CPU."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tok = _tiny_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=TINY_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE,
            patch_size=TINY_PATCH_SIZE,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        ),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def llava_7b_config():
    """The LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 + Vicuna-7B), for random-weight benchmarks
    without a download. Mirrors llava-hf/llava-1.5-7b-hf's config.json."""
    from transformers import LlamaConfig, LlavaConfig

    from dreamframe.models.clip_vision import vit_large_patch14_config

    return LlavaConfig(
        vision_config=vit_large_patch14_config(336),
        text_config=LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            pad_token_id=32001,
        ),
        image_token_id=32000,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _quiet() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def save_video_llm(model, processor, directory: Path) -> None:
    """``save_pretrained`` of model (safetensors) and processor into ``directory``."""
    _quiet()
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)


def tiny_video_llm_dir(cache_dir: Path) -> Path:
    """The tiny preset on disk, built on first use into a temp dir and renamed (race-safe: concurrent
    builders produce identical files from the same seed)."""
    return build_once(
        Path(cache_dir) / f"tiny-video-llm-v{TINY_VERSION}",
        lambda tmp: save_video_llm(*build_tiny_video_llm(), tmp),
        complete=lambda target: (target / "config.json").exists(),
        tmp_prefix=".tiny-video-llm-",
    )


def resolve_model_path(
    name: str, model_paths: dict[str, str] | None = None, cache_dir: Path = Path(".dreamframe/models")
) -> str:
    """Where ``name``'s weights are: the tiny cache, a configured path, a preset's hub id, or ``name``
    itself (a local path or hub id)."""
    model_paths = model_paths or {}
    if not name:
        raise InvalidArgument("a model preset, path or hub id is required", field="base_model")
    if name in model_paths:
        return model_paths[name]
    if name == TINY:
        return str(tiny_video_llm_dir(cache_dir))
    if name == LLAVA_7B_RANDOM:
        return str(snapshot_dir(LLAVA_7B_RANDOM, cache_dir))
    return HUB_IDS.get(name, name)


def load_processor(path: str | Path):
    """The checkpoint's processor with DreamFrame's chat template (the one format we train and score with)."""
    from transformers import AutoProcessor

    _quiet()
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(
            f"cannot load a processor from {str(path)!r}: {exc}", field="base_model"
        ) from exc
    processor.chat_template = CHAT_TEMPLATE
    if processor.tokenizer.pad_token is None:
        # Llama tokenizers often ship without one; padding is masked out, so unk is a safe choice.
        processor.tokenizer.pad_token = processor.tokenizer.unk_token
    return processor


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    from transformers import LlavaForConditionalGeneration

    _quiet()
    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(
            f"cannot load a Llava model from {str(path)!r}: {exc}", field="base_model"
        ) from exc
    return model.to(device)


def load_video_llm(path: str | Path, device: str | torch.device = "auto", dtype: torch.dtype | None = None):
    """(model, processor) from a local directory or hub id, in eval mode on ``device`` ("auto": CUDA if
    present). dtype defaults to bf16 on GPUs and fp32 on CPUs."""
    dev = pick_device(device) if isinstance(device, str) else device
    dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    processor = load_processor(path)
    model = load_model(path, device=dev, dtype=dt).eval()
    return model, processor


def fetch_model(store, manifest_key: str, dest: Path, *, bucket: str | None = None) -> Path:
    """Download a model the trainer exported (``runs/<run>/final/manifest.json`` lists its files with
    size and sha256) into ``dest``, verifying each file; returns ``dest`` for ``load_video_llm``."""
    import posixpath

    manifest = store.get_json(manifest_key, bucket=bucket)
    prefix = posixpath.dirname(manifest_key) + "/"
    dest = Path(dest)
    for entry in manifest["files"]:
        target = dest / entry["key"].removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        ref = store.get_readonly_file(entry["key"], target, bucket=bucket)
        if ref.sha256 != entry["sha256"]:
            raise FailedPrecondition(f"{entry['key']!r} does not match the model's manifest", field="model")
    return dest


# --- frames ----------------------------------------------------------------------------------------


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames (the centre of each of ``count`` equal
    segments); with fewer frames than asked for, frames repeat."""
    if total <= 0 or count <= 0:
        raise InvalidArgument("need at least one frame to sample from and to sample", field="num_frames")
    return [min(total - 1, int((i + 0.5) * total / count)) for i in range(count)]


def read_video_frames(source: bytes | str | Path, num_frames: int) -> list[Any]:
    """``num_frames`` RGB PIL images sampled uniformly from an mp4 (bytes or a path), decoded with PyAV."""
    import av

    handle = io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)
    with av.open(handle) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    if not frames:
        raise ValueError("the video has no decodable frames")
    return [frames[i].convert("RGB") for i in uniform_indices(len(frames), num_frames)]


def sample_frames(images: Sequence[Any], num_frames: int) -> list[Any]:
    """Uniformly sample ``num_frames`` from an already-decoded frame list (e.g. keyframe PNGs)."""
    return [images[i] for i in uniform_indices(len(images), num_frames)]


# --- inputs and generation -------------------------------------------------------------------------


def image_token_count(processor) -> int:
    """Visual tokens one frame becomes (576 for LLaVA-1.5 at 336 px, 16 for tiny)."""
    from PIL import Image

    crop = processor.image_processor.crop_size
    blank = Image.new("RGB", (int(crop["width"]), int(crop["height"])))
    ids = processor(text=IMAGE_TOKEN, images=[blank], return_tensors="pt")["input_ids"][0]
    return int((ids == processor.image_token_id).sum())


def encode_conversation(processor, messages: list[dict], *, add_generation_prompt: bool = False) -> dict:
    """Tokenize one conversation (images inside its messages): 1-D ``input_ids``, ``attention_mask``,
    ``labels`` (the assistant tokens; every other position -100) and ``pixel_values`` [frames, 3, H, W]
    (absent without images)."""
    out = processor.apply_chat_template(
        [messages],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=not add_generation_prompt,
        add_generation_prompt=add_generation_prompt,
        return_tensors="pt",
    )
    encoded = {"input_ids": out["input_ids"][0], "attention_mask": out["attention_mask"][0]}
    if "assistant_masks" in out:
        encoded["labels"] = out["input_ids"][0].masked_fill(out["assistant_masks"][0] == 0, -100)
    if "pixel_values" in out:
        encoded["pixel_values"] = out["pixel_values"]
    return encoded


def prepare_inputs(processor, frames: Sequence[Any], prompt: str, answer: str | None = None) -> dict:
    """Model inputs (batch of one) for frames + one question. With ``answer`` the inputs carry ``labels``
    on the answer tokens only (for a loss); without, they end in the assistant prompt (for generation)."""
    messages = conversation(frames, [(prompt, answer)])
    encoded = encode_conversation(processor, messages, add_generation_prompt=answer is None)
    return {k: (v if k == "pixel_values" else v.unsqueeze(0)) for k, v in encoded.items()}


def max_positions(config) -> int:
    """The language model's positions (a Llava config's text_config; 0 when the config does not say)."""
    text = getattr(config, "text_config", config)
    return int(getattr(text, "max_position_embeddings", 0) or 0)


def check_fits_context(model, input_ids) -> None:
    """INVALID_ARGUMENT (field num_frames) when a prompt is longer than the language model's positions:
    a LLaVA-1.5 7B past 4,096 tokens (8 frames of 576) runs without error but answers from positions
    it never saw in training, so a score from it would mean nothing."""
    limit = max_positions(model.config)
    length = int(input_ids.shape[-1])
    if limit and length > limit:
        raise InvalidArgument(
            f"the prompt is {length:,} tokens with its frames, more than the model's {limit:,} positions: "
            "sample fewer frames",
            field="num_frames",
        )


def model_inputs(model, encoded) -> dict:
    """A processor's tensors for ``model``: checked against its positions (``check_fits_context``), on
    its device, pixel values in its dtype."""
    check_fits_context(model, encoded["input_ids"])
    param = next(model.parameters())
    return {
        k: v.to(param.device, param.dtype) if k == "pixel_values" else v.to(param.device)
        for k, v in encoded.items()
    }


@torch.inference_mode()
def generate(
    model,
    processor,
    frames: Sequence[Any],
    prompt: str,
    *,
    max_new_tokens: int = 64,
    answer_prefix: str = "",
    **generate_kwargs,
) -> str:
    """Greedy answer to ``prompt`` about ``frames`` (PIL images). ``answer_prefix`` pre-fills the answer
    turn (MVBench's "Best option:("); the returned text is what the model added after it."""
    if answer_prefix:
        messages = conversation(frames, [(prompt, answer_prefix)])
        out = processor.apply_chat_template(
            [messages], tokenize=True, return_dict=True, continue_final_message=True, return_tensors="pt"
        )
        inputs = dict(out)
    else:
        inputs = prepare_inputs(processor, frames, prompt)
    inputs = model_inputs(model, inputs)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def random_frames(count: int, size: int = TINY_IMAGE_SIZE, seed: int = 0) -> list[Any]:
    """Random RGB frames (tests, benchmarks)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
