"""Faster kernels for PPO's passes that change nothing but float rounding (``PPOConfig.cpu_kernels``, ``compile``).

``cpu_kernels`` (:func:`fast_kernels`, on by default):

- fp32 GEMMs through oneDNN: PyTorch sends fp32 CPU matmuls to MKL's ``sgemm``, which on AMD CPUs takes its AVX2
  path (about 105 GFLOP/s on one Zen 5 core); oneDNN's JIT GEMM uses AVX-512 there (about 225 GFLOP/s). Same
  product, fp32 accumulation, another blocking: results differ from MKL's by rounding only (as between two CPUs).
- GPT-2's ``gelu_new`` (seven elementwise kernels forward, more backward) as the same function in fewer, faster
  passes: ``x·σ(2u)`` forward (PyTorch's fused tanh-GELU kernel is twice as slow on CPU), its ``gelu_backward``.
- under CPU bf16 autocast: the no-grad passes cast each weight to bf16 once per block instead of once per call, and
  the update's backward passes use SDPA's math kernel (PyTorch's CPU flash-attention backward is slow in bf16).
- glibc ``malloc`` keeps freed memory: by default it returns big freed blocks to the OS, so every minibatch
  page-faults its activation buffers in again (about 25k faults per PPO step on the benchmark workload).

:func:`fast_kernels` swaps the forwards of the models' ``nn.Linear``/``Conv1D`` and ``NewGELUActivation`` modules for
the duration of a block (instance attributes, removed on exit: nothing persists, copies and checkpoints see the
plain modules). A swapped linear falls back to the module's own forward for anything but CPU fp32 parameters (and
fp32 or bf16-autocast compute), so GPU, bf16 and fp16 runs keep PyTorch's kernels.

``compile`` (:func:`compiled_layers`, off by default): ``torch.compile`` of the decoder layers during the update.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import platform
import types
import warnings
from collections.abc import Iterator
from typing import Any

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


def _gemm(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          transposed: bool = False) -> torch.Tensor:
    """``x2d @ W.T + bias`` by oneDNN, where ``W`` (``[out, in]``) is ``weight``, or ``weight.T`` for a ``transposed``
    weight stored ``[in, out]`` (GPT-2's ``Conv1D``). Any strides: the weight operand is read in place."""
    return torch.ops.mkldnn._linear_pointwise(x2d, weight.t() if transposed else weight, bias, "none", [], "")


def _gradients(gemm, needs_input_grad, grad: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, has_bias: bool,
               transposed: bool):
    """The input and weight gradients of ``x2d @ W.T + bias`` are GEMMs too. The weight gradient is computed in the
    weight's own layout (``x2d.T @ grad`` for ``[in, out]``, ``grad.T @ x2d`` for ``[out, in]``), so autograd need
    not transpose it into a contiguous copy (a transposing copy costs about a fifth of the GEMM at these sizes)."""
    # oneDNN reads zero-stride operands (e.g. the expanded gradient of a sum) about 300x slower: make them plain
    grad, x2d = grad.contiguous(), x2d.contiguous()
    grad_x = gemm(grad, weight, None, not transposed) if needs_input_grad[0] else None
    grad_weight = None
    if needs_input_grad[1]:
        grad_weight = gemm(x2d.t(), grad.t(), None) if transposed else gemm(grad.t(), x2d.t(), None)
    grad_bias = grad.sum(0) if has_bias and needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias, None


class _Linear(torch.autograd.Function):
    """The eager path (the lighter one: about 40 us less per call than the custom op below)."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                transposed: bool) -> torch.Tensor:
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias, ctx.transposed = bias is not None, transposed
        return _gemm(x2d, weight, bias, transposed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return _gradients(_gemm, ctx.needs_input_grad, grad, *ctx.saved_tensors, ctx.has_bias, ctx.transposed)


@torch.library.custom_op("lit_vhead::onednn_linear", mutates_args=())
def _linear_op(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               transposed: bool = False) -> torch.Tensor:
    """The same GEMM as one opaque op for ``torch.compile`` (Inductor's own oneDNN lowering wants frozen weights)."""
    return _gemm(x2d, weight, bias, transposed)


@_linear_op.register_fake
def _(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False) -> torch.Tensor:
    return x2d.new_empty(x2d.shape[0], weight.shape[1] if transposed else weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x2d, weight, bias, transposed = inputs
    ctx.save_for_backward(x2d, weight)
    ctx.has_bias, ctx.transposed = bias is not None, transposed


_linear_op.register_autograd(
    lambda ctx, grad: _gradients(
        _linear_op, ctx.needs_input_grad, grad, *ctx.saved_tensors, ctx.has_bias, ctx.transposed
    ),
    setup_context=_setup_context,
)


_BF16_COPIES: dict[int, torch.Tensor] | None = None  # inside fast_kernels: bf16 copies of weights, see linear()


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           transposed: bool = False) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` by oneDNN (``weight.T`` for a ``transposed`` ``[in, out]`` weight), or None
    where the module's own forward should run (not CPU fp32 parameters, empty input, fp16 autocast).

    Under CPU bf16 autocast only the no-grad calls are taken (generation, the rollout and reference passes): they
    compute what autocast would, but cast each weight to bf16 once per ``fast_kernels`` block instead of once per
    call (33 forwards per rollout on the benchmark). The first grad-enabled call drops those copies: the optimizer
    may change the weights from then on, and autocast casts per call again.
    """
    params = (weight,) if bias is None else (weight, bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in params) or x.numel() == 0 or weight.dim() != 2:
        return None
    grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params))
    if torch.is_autocast_enabled("cpu"):
        if not _autocast_bf16() or torch.compiler.is_compiling() or _BF16_COPIES is None:
            return None
        if grad:
            _BF16_COPIES.clear()
            return None
        copies = [_BF16_COPIES.setdefault(id(t), t.detach().to(torch.bfloat16)) for t in params]
        weight, bias = copies[0], (copies[1] if bias is not None else None)
        x = x.to(torch.bfloat16)
    elif x.dtype != torch.float32:
        return None
    x2d = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        out = _linear_op(x2d, weight, bias, transposed)
    elif grad:
        out = _Linear.apply(x2d, weight, bias, transposed)
    else:
        out = _gemm(x2d, weight, bias, transposed)
    return out.view(*x.shape[:-1], out.shape[-1])


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = linear(x, self.weight, self.bias)
    return type(self).forward(self, x) if out is None else out


def _conv1d_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = linear(x, self.weight, self.bias, transposed=True)  # Conv1D keeps its weight as [in, out]
    return type(self).forward(self, x) if out is None else out


_GELU_2C = 2 * math.sqrt(2 / math.pi)  # tanh-GELU = 0.5·x·(1 + tanh u), u = c·(x + 0.044715·x³) = x·σ(2u)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU as ``x·σ(2u)``: the same function in five passes, twice as fast as PyTorch's CPU kernel (whose
    vectorised ``tanh`` is slow); the two differ by float rounding (about 1e-7)."""
    s = x * x
    s.mul_(_GELU_2C * 0.044715).add_(_GELU_2C).mul_(x).sigmoid_()
    return s.mul_(x)


class _GeluTanh(torch.autograd.Function):
    """:func:`_gelu_tanh` forward; PyTorch's own ``gelu_backward`` (as fast as any rewrite of it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _gelu_tanh(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_backward(grad, ctx.saved_tensors[0], approximate="tanh")


def _gelu_tanh_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Below about 16k elements, or for other dtypes and devices, PyTorch's one fused kernel is the faster.
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() < 16384 or torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    return _GeluTanh.apply(x) if torch.is_grad_enabled() and x.requires_grad else _gelu_tanh(x)


def _fast_forward(module: nn.Module, gemms: bool):
    """The replacement forward of ``module`` (a plain function of ``(self, x)``), or None to leave it as it is."""
    if "forward" in module.__dict__:  # already swapped by someone (e.g. trunk reuse): leave it alone
        return None
    cls = type(module)
    if gemms and cls.forward is nn.Linear.forward:
        return _linear_forward
    if gemms and Conv1D is not None and cls.forward is Conv1D.forward:
        return _conv1d_forward
    if NewGELUActivation is not None and cls.forward is NewGELUActivation.forward:
        return _gelu_tanh_forward
    return None


@contextlib.contextmanager
def fast_kernels(*models: nn.Module | None, enabled: bool = True, backward: bool = False) -> Iterator[None]:
    """Run the block with the fast forwards swapped into ``models`` (duplicates and None are skipped).

    ``backward``: the block runs backward passes (the PPO update; not a rollout). Gradients of a graph built inside
    the block may be computed after it: the GEMMs' backward is in the graph. The optimizer may change the weights
    inside the block only after a grad-enabled forward (see :func:`linear`).
    """
    global _BF16_COPIES
    if not enabled:
        yield
        return
    keep_freed_memory()
    gemms = onednn_available()
    swapped: list[nn.Module] = []
    seen: set[int] = set()
    outermost = _BF16_COPIES is None
    if outermost:
        _BF16_COPIES = {}
    try:
        for model in models:
            if model is None:
                continue
            for module in model.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                forward = _fast_forward(module, gemms)
                if forward is not None:  # bound, so a deep copy made inside the block binds to the copy
                    module.forward = types.MethodType(forward, module)
                    swapped.append(module)
        with _attention_backend(backward):
            yield
    finally:
        for module in swapped:
            del module.forward
        if outermost:
            _BF16_COPIES = None


def _attention_backend(backward: bool):
    """Under CPU bf16 autocast, blocks that run backward passes use SDPA's math kernel: PyTorch's CPU flash-attention
    backward is about 2.5x slower in bf16 than the math kernel at PPO's short sequences (its forward is a little
    faster, so rollouts keep it)."""
    if backward and _autocast_bf16():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


_COMPILED_FORWARDS: dict[type, Any] = {}


@contextlib.contextmanager
def compiled_layers(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the block with ``model``'s decoder layers' forwards compiled by ``torch.compile`` (``PPOConfig.compile``).

    One compiled function per layer class, shared by all its layers (their weights are graph inputs), compiled on
    first use and kept for the process; hooks and everything outside the layers stay eager. Layers are found by
    :data:`lit_vhead.reference.LAYER_PATTERNS`; a model none of them matches runs eager (with a warning).
    """
    if not enabled:
        yield
        return
    from lit_vhead.reference import find_layer_pattern, layer_module_names

    try:
        pattern, num_layers = find_layer_pattern(model)
    except ValueError as error:
        warnings.warn(f"ppo.compile: no decoder layers found, running eager ({error})", stacklevel=3)
        yield
        return
    layers = [model.get_submodule(path) for path in layer_module_names(model, num_layers, pattern)]
    layers = [layer for layer in layers if "forward" not in layer.__dict__]
    for layer in layers:
        cls = type(layer)
        if cls not in _COMPILED_FORWARDS:
            _COMPILED_FORWARDS[cls] = torch.compile(cls.forward)
        layer.forward = types.MethodType(_COMPILED_FORWARDS[cls], layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


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
