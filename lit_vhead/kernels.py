"""Faster CPU GEMMs for PPO's passes, changing nothing but float rounding (``PPOConfig.cpu_kernels``), and
``torch.compile`` of the PPO update's forward (``PPOConfig.compile``).

``cpu_kernels`` (:func:`fast_kernels`): PyTorch sends fp32 CPU matmuls to MKL's ``sgemm``, which on AMD CPUs takes its
AVX2 path where oneDNN's JIT GEMM uses AVX-512 (the rates measured: README, "Speed and memory"); on Intel CPUs with
AVX-512 the two run at the same rate. Inside :func:`fast_kernels` the fp32 GEMMs of ``nn.Linear``
(``F.linear``) and GPT-2's ``Conv1D`` (``torch.addmm``) go to oneDNN, with weight gradients computed in each weight's
own layout (no transposing copies). Routing is a ``TorchFunctionMode`` scoped to the block: nothing is set on the
models, so it survives transformers re-applying its Hub kernels on ``train()``/``eval()``, deep copies, PEFT, DDP and
FSDP2. Under CPU bf16 autocast the no-grad passes cast each weight to bf16 once per block instead of once per call,
and backward passes use SDPA's math kernel. glibc is told to keep freed memory (no page faults per minibatch).

``cpu_kernels="auto"`` (the default) measures once per process, at the model's GEMM shapes, whether oneDNN is clearly
faster here (>= :data:`AUTO_SPEEDUP`); elsewhere PyTorch's own kernels run and the update is PyTorch's to the bit.
Models with no fp32 CPU weights (on a GPU, in bf16/fp16) run none of this under any setting: no routing mode, no
attention-kernel choice, no glibc setting.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

AUTO_SPEEDUP = 1.2  # cpu_kernels="auto" takes oneDNN only where its GEMMs are at least this much faster
CPU_KERNEL_SETTINGS = ("auto", True, False)


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


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, transposed: bool = False,
           bf16_copies: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` by oneDNN (``weight.T`` for a ``transposed`` ``[in, out]`` weight), or None
    where PyTorch's own kernel should run (not CPU fp32 parameters, empty input, fp16 autocast).

    Under CPU bf16 autocast only no-grad calls are taken, and only with ``bf16_copies`` (the block's cache): they
    compute what autocast would, but cast each weight to bf16 once per block instead of once per call. The first
    grad-enabled call drops those copies: the optimizer may change the weights from then on.
    """
    params = (weight,) if bias is None else (weight, bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in params) or x.numel() == 0 or weight.dim() != 2:
        return None
    grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params))
    if torch.is_autocast_enabled("cpu"):
        if not _autocast_bf16() or torch.compiler.is_compiling() or bf16_copies is None:
            return None
        if grad:
            bf16_copies.clear()
            return None
        copies = [bf16_copies.setdefault(id(t), t.detach().to(torch.bfloat16)) for t in params]
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


class OneDNNGemms(TorchFunctionMode):
    """Inside the block, fp32 CPU ``F.linear`` and ``torch.addmm(bias, x, W)`` (GPT-2's ``Conv1D``, ``W`` stored
    ``[in, out]``) run by oneDNN; every other call, and these in other dtypes or devices, runs as it would."""

    def __init__(self) -> None:
        super().__init__()
        self.bf16_copies: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = linear(x, weight, bias, bf16_copies=self.bf16_copies)
        elif func is torch.addmm and len(args) == 3 and not kwargs:
            bias, x, weight = args
            if bias.dim() == 1 and x.dim() == 2 and weight.dim() == 2 and bias.shape[0] == weight.shape[1]:
                out = linear(x, weight, bias, transposed=True, bf16_copies=self.bf16_copies)
        return func(*args, **kwargs) if out is None else out


_ACTIVE = 0  # nesting depth of fast_kernels blocks that routed GEMMs


@contextlib.contextmanager
def fast_kernels(*models: nn.Module | None, enabled: bool | str = "auto",
                 backward: bool = False) -> Iterator[OneDNNGemms | None]:
    """Run the block with fp32 CPU GEMMs routed to oneDNN where ``enabled`` says so (``"auto"``: where the probe
    measured it clearly faster for these ``models``' shapes; ``True``: always, where oneDNN exists; ``False``: never).

    ``backward``: the block runs backward passes (the PPO update, not a rollout). Gradients of a graph built inside
    the block may be computed after it: the GEMMs' backward is in the graph. Nothing is set on ``models``. Yields
    the routing mode, or None where PyTorch's kernels run (also inside an outer block, which already routes).
    """
    global _ACTIVE
    if _ACTIVE or not use_cpu_kernels(enabled, *models):
        yield None
        return
    keep_freed_memory()
    _ACTIVE += 1
    try:
        with OneDNNGemms() as mode, _attention_backend(backward):
            yield mode
    finally:
        _ACTIVE -= 1


def _attention_backend(backward: bool):
    """Under CPU bf16 autocast, blocks that run backward passes use SDPA's math kernel: PyTorch's CPU flash-attention
    backward is about 2.5x slower in bf16 than the math kernel at PPO's short sequences (its forward is a little
    faster, so rollouts keep it)."""
    if backward and _autocast_bf16():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------- the auto decision
@dataclass(frozen=True)
class GemmProbe:
    """PyTorch's and oneDNN's fp32 GEMM rates at a model's shapes on this machine."""

    shapes: tuple[tuple[int, int], ...]  # (in, out) of the GEMMs timed
    threads: int
    pytorch_gflops: float
    onednn_gflops: float

    @property
    def speedup(self) -> float:
        return self.onednn_gflops / self.pytorch_gflops

    @property
    def use_onednn(self) -> bool:
        return self.speedup >= AUTO_SPEEDUP


def gemm_shapes(*models: nn.Module | None, largest: int = 1) -> tuple[tuple[int, int], ...]:
    """The ``(in, out)`` shapes of the ``largest`` distinct fp32 CPU linear weights of ``models`` (by size): the
    GEMMs that dominate a PPO step. Empty if the models have none (GPU, bf16)."""
    shapes = set()
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype != torch.float32:
                continue
            if weight.device.type != "cpu" or isinstance(module, nn.Embedding):
                continue
            if isinstance(module, nn.Linear):
                shapes.add((module.in_features, module.out_features))
            elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight [in, out]
                shapes.add(tuple(weight.shape))
    return tuple(sorted(shapes, key=lambda s: (s[0] * s[1], s), reverse=True)[:largest])


@functools.cache
def probe_gemms(shapes: tuple[tuple[int, int], ...], threads: int | None = None, rounds: int = 4) -> GemmProbe:
    """Time PyTorch's fp32 GEMMs against oneDNN's at ``shapes``: each shape's forward product and the two of its
    backward (input and weight gradients, whose operand layouts differ), in interleaved rounds (the best round of
    each counts, so a busy moment hits both alike). Once per process and shape set: about 5 ms for the benchmark
    workload, 50 ms at GPT-2 small. Each GEMM gets as many rows as keep it near 15 MFLOP (16 to 256): the rates,
    not the sizes, decide."""
    threads = threads or torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    operands, flops = [], 0
    for i, o in shapes:
        rows = max(16, min(256, 7_500_000 // (i * o)))
        x, w, g = (torch.rand(*shape, generator=generator) for shape in ((rows, i), (o, i), (rows, o)))
        operands.append((x, w, g))
        flops += 3 * 2 * rows * i * o
    onednn = torch.ops.mkldnn._linear_pointwise

    def pytorch_gemms(x, w, g):  # what autograd runs for F.linear: forward, grad_input, grad_weight
        F.linear(x, w), torch.mm(g, w), torch.mm(g.t(), x)

    def onednn_gemms(x, w, g):  # what _Linear runs (see _gradients)
        onednn(x, w, None, "none", [], ""), onednn(g, w.t(), None, "none", [], "")
        onednn(g.t().contiguous(), x.t(), None, "none", [], "")

    paths = {"pytorch": pytorch_gemms, "onednn": onednn_gemms}
    best = dict.fromkeys(paths, float("inf"))
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first round warms up
            for name, gemms in paths.items():
                tic = time.perf_counter()
                for ops in operands:
                    gemms(*ops)
                best[name] = min(best[name], time.perf_counter() - tic)
    return GemmProbe(shapes, threads, flops / best["pytorch"] / 1e9, flops / best["onednn"] / 1e9)


_LOGGED: set[tuple] = set()


def use_cpu_kernels(setting: bool | str, *models: nn.Module | None) -> bool:
    """Whether ``cpu_kernels=setting`` routes the GEMMs of ``models`` to oneDNN here. ``"auto"`` decides by
    :func:`probe_gemms` and logs the decision once per process and shape set."""
    if setting is False or setting == "false":
        return False
    if not onednn_available():
        return False
    shapes = gemm_shapes(*models)
    if not shapes and any(m is not None for m in models):  # GPU or low-precision models: PyTorch's kernels, always
        return False
    if setting is True or setting == "true":
        return True
    if not shapes:
        return False
    probe = probe_gemms(shapes)
    key = (shapes, probe.threads)
    if key not in _LOGGED:
        _LOGGED.add(key)
        choice = "oneDNN GEMMs" if probe.use_onednn else "PyTorch's GEMMs"
        log.info(
            "cpu_kernels=auto: %s (oneDNN %.0f vs PyTorch %.0f GFLOP/s = %.2fx at this model's shapes %s, %d "
            "thread(s), on %s; oneDNN is taken from %.1fx)", choice, probe.onednn_gflops, probe.pytorch_gflops,
            probe.speedup, list(shapes), probe.threads, cpu_name(), AUTO_SPEEDUP,
        )
    return probe.use_onednn


@functools.cache
def cpu_name() -> str:
    """The CPU model as the OS names it (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# ----------------------------------------------------------------------------------------- compile
_COMPILED: dict[Any, Any] = {}


def compiled(fn):
    """``torch.compile(fn)``, made once per function and kept for the process (``PPOConfig.compile``). ``fn`` is
    our own function that calls the model; nothing is set on the model."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


# ----------------------------------------------------------------------------------------- memory
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
