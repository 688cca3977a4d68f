"""Checks the model tests share: a base + refiner image from a tiny SDXL, and "same text conditioning"
between two pipelines."""

from __future__ import annotations

import numpy as np
import torch


def render_base_refiner(pipes, prompt: str, seed: int = 20) -> np.ndarray:
    """One 64×64 image: 4 steps, the base to 0.75 and the refiner from there (as the renderer splits)."""
    gen = torch.Generator().manual_seed(seed)
    latents = pipes.base(
        prompt,
        height=64,
        width=64,
        num_inference_steps=4,
        denoising_end=0.75,
        output_type="latent",
        generator=gen,
    ).images
    image = pipes.refiner(
        prompt, image=latents, num_inference_steps=4, denoising_start=0.75, generator=gen
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def assert_same_conditioning(a, b, prompt: str) -> None:
    """Same token ids and the same text conditioning (up to float rounding: copied weights may sit at
    other memory alignments, and BLAS kernels round differently there)."""
    for tokenizer_a, tokenizer_b in ((a.tokenizer, b.tokenizer), (a.tokenizer_2, b.tokenizer_2)):
        assert tokenizer_a(prompt).input_ids == tokenizer_b(prompt).input_ids
    with torch.no_grad():
        got = a.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        want = b.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    for x, y in zip(got, want, strict=True):
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
