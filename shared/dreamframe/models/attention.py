"""Which scaled-dot-product-attention kernel the SDXL services prefer (renderer and style trainer)."""

from __future__ import annotations

import contextlib

BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def sdpa_context(backend: str) -> contextlib.AbstractContextManager:
    """Prefer ``backend`` for F.scaled_dot_product_attention inside the block ("auto": no change).

    The others stay enabled behind it (PyTorch's priority order), so shapes the preferred kernel can't
    run still run. Under torch.compile the choice is made when the graph is traced, so the same context
    must surround the compiling call and every later one (the engine always wraps the denoising)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    chosen = kernels[backend]
    order = [chosen] + [k for k in kernels.values() if k != chosen]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a PyTorch without priorities: the preferred kernel alone, math as the fallback
        return sdpa_kernel([chosen, SDPBackend.MATH] if chosen != SDPBackend.MATH else [chosen])
