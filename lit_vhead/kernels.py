"""Faster CPU kernels for PPO's passes that change nothing but float rounding (``PPOConfig.cpu_kernels``).

- fp32 GEMMs through oneDNN: PyTorch sends fp32 CPU matmuls to MKL's ``sgemm``, which on AMD CPUs takes its AVX2
  path (about 105 GFLOP/s on one Zen 5 core); oneDNN's JIT GEMM uses AVX-512 there (about 235 GFLOP/s). Same
  product, fp32 accumulation, another blocking: results differ from MKL's by rounding only (as between two CPUs).
- GPT-2's ``gelu_new`` (seven elementwise kernels forward, more backward) as the one fused kernel
  ``F.gelu(approximate="tanh")``: the same formula.
- glibc ``malloc`` keeps freed memory: by default it returns big freed blocks to the OS, so every minibatch
  page-faults its activation buffers in again (about 25k faults per PPO step on the benchmark workload).

:func:`fast_kernels` swaps the forwards of the models' ``nn.Linear``/``Conv1D`` and ``NewGELUActivation`` modules for
the duration of a block (instance attributes, removed on exit: nothing persists, copies and checkpoints see the
plain modules). A swapped linear falls back to the module's own forward for anything but fp32 CPU tensors outside
autocast, so GPU, bf16 and ``*-mixed`` runs are unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers' GPT-2 linear layer (weights stored [in, out]) and its Python tanh-GELU
    from transformers.activations import NewGELUActivation
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = NewGELUActivation = None


def onednn_available() -> bool:
    """Whether oneDNN's fp32 linear kernel is usable here (x86-64 CPU builds of PyTorch have it)."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _onednn_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d @ weight.T + bias`` by oneDNN (``weight`` ``[out, in]``, any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` whose three GEMMs (forward, input gradient, weight gradient) run in oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x2d, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad2d, weight.t(), None).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = _onednn_linear(grad2d.t(), x2d.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad2d.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` by oneDNN, or None where it does not apply (not fp32 CPU, autocast, empty)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if (
        any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
        or torch.is_autocast_enabled("cpu")
        or x.numel() == 0
        or weight.dim() != 2
    ):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def _linear_forward(module: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = linear(x, module.weight, module.bias)
        return type(module).forward(module, x) if out is None else out

    return forward


def _conv1d_forward(module: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = linear(x, module.weight.t(), module.bias)  # Conv1D keeps its weight as [in, out]
        return type(module).forward(module, x) if out is None else out

    return forward


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _fast_forward(module: nn.Module, gemms: bool):
    """The replacement forward of ``module``, or None to leave it as it is."""
    if "forward" in module.__dict__:  # already swapped by someone (e.g. trunk reuse): leave it alone
        return None
    cls = type(module)
    if gemms and cls.forward is nn.Linear.forward:
        return _linear_forward(module)
    if gemms and Conv1D is not None and cls.forward is Conv1D.forward:
        return _conv1d_forward(module)
    if NewGELUActivation is not None and cls.forward is NewGELUActivation.forward:
        return _gelu_tanh
    return None


@contextlib.contextmanager
def fast_kernels(*models: nn.Module | None, enabled: bool = True) -> Iterator[None]:
    """Run the block with the fast forwards swapped into ``models`` (duplicates and None are skipped).

    Gradients of a graph built inside the block may be computed after it: the GEMMs' backward is in the graph.
    """
    if not enabled:
        yield
        return
    keep_freed_memory()
    gemms = onednn_available()
    swapped: list[nn.Module] = []
    seen: set[int] = set()
    try:
        for model in models:
            if model is None:
                continue
            for module in model.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                forward = _fast_forward(module, gemms)
                if forward is not None:
                    module.forward = forward
                    swapped.append(module)
        yield
    finally:
        for module in swapped:
            del module.forward


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep up to 1 GiB of freed memory instead of returning it to the OS (once per process).

    Big tensors are then served from memory already mapped, not from fresh pages that fault in zeroed. Peak RSS is
    unchanged (the memory was in use a moment before); RSS just does not drop between minibatches. Returns whether
    the setting is in force (glibc only; older glibc caps the mmap threshold at 32 MiB).
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    for keep in (1 << 30, 32 << 20):
        if libc.mallopt(_M_MMAP_THRESHOLD, keep) and libc.mallopt(_M_TRIM_THRESHOLD, keep):
            return True
    return False
