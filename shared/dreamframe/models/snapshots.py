"""Real-size models with seeded random weights, written once into the model cache in the hub's layout.

The ``sdxl-random`` presets run the real architectures without downloading weights: each model is built
from its published config with a fixed seed (on the GPU when there is one: seconds, where 7 B parameters
take minutes on a CPU), saved with ``save_pretrained`` into ``<cache>/<name>-v<version>/`` (model_index.json
or config.json, every component's config, the real tokenizers' files, safetensors) through
``build_once`` (temp folder + atomic rename), and loaded by path with the same ``from_pretrained`` code
as hub weights. Every process that shares the cache loads the same files, so replicas hold identical
weights. (Random init on different kinds of device draws different numbers: the first writer's device
decides; write them ahead with ``python -m dreamframe.models.snapshots``.)

    sdxl-random                    SDXL 1.0 base + refiner (fp16), CLIP's real BPE tokenizers
    llava-1.5-7b-random            LLaVA-1.5-7B (CLIP ViT-L/14-336 + a 7 B Llama, bf16) with a 32,000-token
                                   byte-level BPE trained in code; <image> 32000, <pad> 32001 (llava-hf's)
    clip-vit-large-patch14-random  CLIP ViT-L/14 vision tower + projection (fp16), the evaluator's encoder

The writers take the configs, so the tests write and load the same layouts at a tiny size. The cache
itself (which snapshots there are, their folders, writing each once) is ``snapshot_cache``, which the
model modules use to find theirs; it names the writers here and imports them only to write.
"""

from __future__ import annotations

import argparse
import logging
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dreamframe.models.device import pick_device
from dreamframe.models.snapshot_cache import (  # noqa: F401 - the cache's names, used from here too
    CLIP_L_RANDOM,
    LLAVA_7B_RANDOM,
    SDXL_RANDOM,
    SNAPSHOTS,
    Snapshot,
    snapshot_dir,
)

LLAMA_VOCAB_SIZE = 32000  # Llama / Vicuna: <unk> <s> </s>, bytes, merges
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"


# --- writers (take the configs) ----------------------------------------------------------------------


def _device(device: str | torch.device) -> torch.device:
    return pick_device(device) if isinstance(device, str) else device


def write_sdxl(
    directory: Path,
    *,
    configs: dict[str, dict] | None = None,
    refiner_unet: dict | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> None:
    """``<dir>/base`` and ``<dir>/refiner`` as the hub's SDXL 1.0 repositories lay them out, with CLIP's
    real BPE tokenizers. ``configs``: real_sdxl_base_configs()-style dicts (default: the real ones)."""
    from dreamframe.models import clip_bpe
    from dreamframe.models.sdxl import save_sdxl
    from dreamframe.models.sdxl_configs import build_random_sdxl, real_sdxl_base_configs

    configs = configs or real_sdxl_base_configs()
    pipes = build_random_sdxl(
        _device(device),
        dtype,
        with_refiner=True,
        seed=seed,
        configs=configs,
        refiner_unet=refiner_unet,
        tokenizers=clip_bpe.sdxl_tokenizers(),
    )
    # The builder points pooling at <|endoftext|>; the files keep the published configs (load_sdxl
    # applies the same fix to hub weights and to these).
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipes.base, name).config.eos_token_id = configs[name]["eos_token_id"]
    directory = Path(directory)
    save_sdxl(pipes, directory)
    for sub, name in (("base", "tokenizer"), ("base", "tokenizer_2"), ("refiner", "tokenizer_2")):
        clip_bpe.save_tokenizer(getattr(pipes.base, name), directory / sub / name)


def stdlib_corpus() -> list[str]:
    """Python's standard-library modules (top level, sorted): text every machine has offline. The same
    Python version gives the same corpus, so the same tokenizer."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [path.read_text(encoding="utf-8", errors="replace") for path in sorted(root.glob("*.py"))]


def llama_size_tokenizer(vocab_size: int = LLAMA_VOCAB_SIZE, corpus: list[str] | None = None):
    """A byte-level BPE with Llama's layout: <unk> 0, <s> 1, </s> 2, then ``vocab_size - 3`` bytes and
    merges (trained in code, 2 s for 32,000 on the stdlib), then <image> and <pad> as llava-hf adds them
    (32000, 32001 at full size). Any text encodes (byte level)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dreamframe.models.video_llm import CHAT_TEMPLATE

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus if corpus is not None else stdlib_corpus(), trainer)
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus gives {backend.get_vocab_size()} tokens, not {vocab_size}")
    # extra_special_tokens adds <image> right after the trained vocabulary; <pad> comes next (llava-hf).
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def write_video_llm(directory: Path, **build_args) -> None:
    """A LLaVA checkpoint (config.json, safetensors, processor + tokenizer) as llava-hf lays it out."""
    from dreamframe.models.video_llm import save_video_llm

    save_video_llm(*build_video_llm(**build_args), Path(directory))


def build_video_llm(
    *,
    config=None,
    tokenizer=None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
):
    """(model, processor) in memory. ``config`` defaults to ``llava_7b_config()``, ``tokenizer`` to the
    Llama-size one; they must agree on the <image> and <pad> ids."""
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    from dreamframe.models.video_llm import CHAT_TEMPLATE, llava_7b_config

    config = config or llava_7b_config()
    tok = tokenizer or llama_size_tokenizer()
    ids = {"image_token_id": tok.convert_tokens_to_ids(IMAGE_TOKEN), "pad_token_id": tok.pad_token_id}
    if (
        config.image_token_id != ids["image_token_id"]
        or config.text_config.pad_token_id != ids["pad_token_id"]
    ):
        raise ValueError(f"config and tokenizer disagree on special ids: tokenizer {ids}")
    if config.text_config.vocab_size < len(tok):
        raise ValueError(f"vocab_size {config.text_config.vocab_size} < the tokenizer's {len(tok)}")
    vision = config.vision_config
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": vision.image_size},
            crop_size={"height": vision.image_size, "width": vision.image_size},
        ),
        tokenizer=tok,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    config.text_config.bos_token_id, config.text_config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model = _build(lambda: LlavaForConditionalGeneration(config), _device(device), dtype, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def clip_vit_large_config():
    """openai/clip-vit-large-patch14's vision tower (224 px, patch 14, 24 layers of 1024, projection 768)."""
    from dreamframe.models.clip_vision import vit_large_patch14_config

    return vit_large_patch14_config(224)


def write_clip_vision(directory: Path, **build_args) -> None:
    """``CLIPVisionModelWithProjection`` + its PIL image processor, as the hub lays them out."""
    model, processor = build_clip_vision(**build_args)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)


def build_clip_vision(
    *,
    config=None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
):
    """(model, processor) in memory (config default: ViT-L/14)."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    config = config or clip_vit_large_config()
    model = _build(lambda: CLIPVisionModelWithProjection(config), _device(device), dtype, seed)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
    )
    return model, processor


def _build(make: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype, seed: int):
    """``make()`` run on ``device`` in ``dtype`` (random init there, no fp32 copy) from ``seed``."""
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = make()
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# --- the writers the cache names (dreamframe.models.snapshot_cache.SNAPSHOTS) ---------------------------


def write_sdxl_random(directory: Path) -> None:
    write_sdxl(directory, seed=0)


def write_llava_7b_random(directory: Path) -> None:
    write_video_llm(directory, seed=1)


def write_clip_l_random(directory: Path) -> None:
    write_clip_vision(directory, seed=2)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# Which snapshots a local preset (dreamframe up --preset NAME) uses.
PRESET_SNAPSHOTS = {"sdxl-random": (SDXL_RANDOM, LLAVA_7B_RANDOM, CLIP_L_RANDOM)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dreamframe.models.snapshots",
        description="Write the random-weight snapshots a preset loads into the model cache, ahead of time.",
    )
    parser.add_argument("command", choices=["write"])
    parser.add_argument("--preset", default="sdxl-random", choices=sorted(PRESET_SNAPSHOTS))
    parser.add_argument("--only", action="append", choices=sorted(SNAPSHOTS), help="just this snapshot")
    parser.add_argument("--cache-dir", type=Path, help="default: the models.cache_dir setting")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cache_dir is None:
        from dreamframe.config import get_settings

        args.cache_dir = get_settings().models.cache_dir
    for name in args.only or PRESET_SNAPSHOTS[args.preset]:
        started = time.monotonic()
        folder = snapshot_dir(name, args.cache_dir)
        print(
            f"{name}: {folder} ({folder_bytes(folder) / 2**30:.2f} GiB, {time.monotonic() - started:.1f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
