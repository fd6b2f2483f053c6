"""FLOP counting shared by the models' start-up print and the benchmarks.

Counts what `torch.utils.flop_counter.FlopCounterMode` counts: matmuls,
convolutions and attention (1 multiply-add = 2 FLOPs). Element-wise ops,
normalisation and interpolation are not counted; they are cheap in FLOPs
(though not always in time), and every model is measured the same way.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                            out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's registry covers the CUDA attention kernels but not the CPU flash kernel that
# F.scaled_dot_product_attention dispatches to on CPU, so attention would count as 0 FLOPs
# there (the prototype's transformer would look 10-25 % cheaper than it is).
_CPU_ATTENTION = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CPU_ATTENTION = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
    }


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    # torch's formula ignores `groups` for the weight gradient, counting a depthwise conv's as dense
    # (EdgeFace-xxs fwd+bwd read 0.55 instead of 0.28 GFLOP); each requested gradient costs one forward.
    fwd = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return fwd * (int(output_mask[0]) + int(output_mask[1]))


_CUSTOM = {**_CPU_ATTENTION, torch.ops.aten.convolution_backward: _conv_backward_flop}


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    raise TypeError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def count_flops(model: nn.Module, *inputs: torch.Tensor, backward: bool = True) -> float:
    """FLOPs of one call `model(*inputs)`, plus its backward pass when `backward`.

    The backward pass is what a training step runs: gradients w.r.t. the
    trainable parameters (and w.r.t. inputs only if they require grad), so the
    first layer's input gradient is not counted. Gradients are taken with
    `torch.autograd.grad`, leaving every `.grad` untouched.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    leaves = params + [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        with torch.set_grad_enabled(backward and bool(leaves)):
            out = _first_tensor(model(*inputs))
            if backward and leaves and out.requires_grad:
                # A random cotangent, not ones: the count does not depend on it, and it
                # avoids special cases (e.g. a zero-mean gradient through a final norm).
                torch.autograd.grad(out, leaves, grad_outputs=torch.randn_like(out), allow_unused=True)
    return float(counter.get_total_flops())


def gflops_per_image(model: nn.Module, input_shape: Sequence[int], backward: bool = True) -> float:
    """GFLOPs per image for an input of `input_shape`: (C, H, W) or (B, C, H, W), divided by B."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (C, H, W) or (B, C, H, W), got {tuple(input_shape)}")
    try:
        ref = next(model.parameters())
        device, dtype = ref.device, ref.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    x = torch.rand(shape, device=device, dtype=dtype)
    return count_flops(model, x, backward=backward) / shape[0] / 1e9
