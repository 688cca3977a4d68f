"""FP8 linear layers (dreamframe.models.fp8) on the CPU: PyTorch runs the same scaled matmuls there."""

from __future__ import annotations

import pytest
import torch

from dreamframe.models import fp8

pytestmark = pytest.mark.usefixtures("one_thread")


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_float8_linear_stays_close_to_the_linear(dtype, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=bias).to(dtype)
    x = torch.randn(3, 7, 64, dtype=dtype)
    quantized = fp8.Float8Linear.from_linear(linear)
    with torch.inference_mode():
        out, ref = quantized(x), linear(x)
    assert out.shape == ref.shape == (3, 7, 96) and out.dtype == dtype
    assert quantized.weight.dtype == fp8.FP8
    # e4m3 keeps 3 mantissa bits: a few percent, not more (bf16 alone is ~0.3 % here).
    assert 0 < relative_error(out, ref) < 0.06


def test_each_row_is_scaled_on_its_own():
    """A token's result doesn't depend on the other rows of the batch (unlike a per-tensor scale)."""
    torch.manual_seed(1)
    layer = fp8.Float8Linear.from_linear(torch.nn.Linear(32, 16))
    x = torch.randn(4, 32)
    x[3] *= 1000  # one loud row must not change the others' quantization
    with torch.inference_mode():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(4)])
    # Equal up to the matmul's float rounding; one scale for the whole batch would have flushed the
    # quiet rows' values to a few e4m3 steps next to the loud one.
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_quantize_and_restore_swap_only_the_chosen_layers():
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Sequential(torch.nn.Linear(32, 16))
    )
    first, inner = model[0], model[2][0]
    originals = fp8.quantize_linears(model, lambda name, _layer: name == "2.0")
    assert list(originals) == ["2.0"] and originals["2.0"] is inner
    assert model[0] is first and isinstance(model[2][0], fp8.Float8Linear)
    fp8.restore_linears(model, originals)
    assert model[2][0] is inner


def test_cpu_is_not_an_fp8_device():
    assert "CUDA" in fp8.unavailable_reason(torch.device("cpu"))


def test_rows_are_views_computing_a_slice_of_the_outputs():
    torch.manual_seed(2)
    layer = fp8.Float8Linear.from_linear(torch.nn.Linear(32, 48))
    part = layer.rows(16, 32)
    assert part.weight.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
    assert (part.in_features, part.out_features) == (32, 16)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        torch.testing.assert_close(part(x), layer(x)[:, 16:32], rtol=1e-5, atol=1e-5)
