"""FP8 linear layers: e4m3 weights and activations with one scale per row, bf16 out (``torch._scaled_mm``).

Weights get one scale per output channel (computed once), activations one per token (computed on the
fly). Per-token scales keep a row's result independent of the other rows in the batch (a per-tensor
scale would take the whole batch's maximum), so a frame renders the same whatever batch it lands in.
FP8 tensor cores need compute capability 8.9 (Ada, Hopper) or newer; PyTorch also runs it on CPUs
(slowly), which is what the tests use.

Why not torchao's: its FP8 weight tensors (``Float8DynamicActivationFloat8WeightConfig``, per row) are
tensor subclasses, and torch.compile of one SDXL UNet with them had not finished after 8 minutes on an
H100 (plain bf16 compiles both UNets and the VAE in ~3); its training ``Float8Linear`` rejects 3-D inputs
with per-row scales. This module is the same arithmetic in plain tensor ops, which compile quickly and
fuse the activation scaling into the kernels around each matmul.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MIN_CAPABILITY = (8, 9)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
LinearFilter = Callable[[str, torch.nn.Linear], bool]


def unavailable_reason(device: torch.device) -> str | None:
    """Why FP8 matmuls can't run fast on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"FP8 tensor cores need a CUDA GPU, this is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return f"FP8 tensor cores need compute capability ≥ 8.9, this GPU has {major}.{minor}"
    return None


def _rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [R, K] → (e4m3 values, fp32 scales [R, 1]) with ``values * scales ≈ x`` row by row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_matmul(
    values: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(values·scale) @ (weight·weight_scale)ᵀ + bias`` in one FP8 GEMM: the bias is added in the
    GEMM's epilogue (a separate add re-reads the whole output), and the tensor cores' fast accumulation
    is on (as torchao's FP8 inference does)."""
    return torch._scaled_mm(
        values,
        weight.t(),
        scale_a=scale,
        scale_b=weight_scale,
        bias=bias,
        out_dtype=out_dtype,
        use_fast_accum=True,
    )


class Float8Linear(torch.nn.Module):
    """Inference-only stand-in for an ``nn.Linear``: same inputs, outputs in the linear's dtype."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> None:
        """``weight`` [out, in] e4m3, row-major (its ``.t()`` is the column-major operand the GEMM
        wants); ``weight_scale`` [1, out] fp32; ``bias`` [out] or None."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Float8Linear:
        weight, scale = _rowwise(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale.t().contiguous(), bias, linear.weight.dtype)

    def rows(self, start: int, stop: int) -> Float8Linear:
        """The layer computing output features ``start:stop`` of this one, its weights a view of
        this one's (no copy)."""
        bias = None if self.bias is None else self.bias[start:stop]
        scale = self.weight_scale[:, start:stop].contiguous()  # a few floats
        return Float8Linear(self.weight[start:stop], scale, bias, self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, scale = _rowwise(x.reshape(-1, self.in_features))
        out = scaled_matmul(values, scale, self.weight, self.weight_scale, self.bias, self.out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


def linears(model: torch.nn.Module, include: LinearFilter) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` that ``include(name, layer)`` accepts, by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and include(name, module)
    }


def _swap(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_linears(model: torch.nn.Module, include: LinearFilter) -> dict[str, torch.nn.Linear]:
    """Replace the chosen linear layers with ``Float8Linear`` in place; returns the originals by name
    (``restore_linears`` puts them back; dropping them frees their weights)."""
    chosen = linears(model, include)
    for name, layer in chosen.items():
        _swap(model, name, Float8Linear.from_linear(layer))
    return chosen


def restore_linears(model: torch.nn.Module, originals: dict[str, torch.nn.Linear]) -> None:
    """Undo ``quantize_linears`` with the layers it returned."""
    for name, layer in originals.items():
        _swap(model, name, layer)
