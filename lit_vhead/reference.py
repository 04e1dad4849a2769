"""PPO's frozen reference: ``create_reference_model`` and the ``Reference`` that computes reference log-probs.

``create_reference_model`` makes a frozen copy of the policy whose lower layers really share the policy's memory.
TRL's ``num_shared_layers`` froze the policy's lower layers but still deep-copied them (the reference was always full
size), and a typo'd pattern froze the whole policy. Here the shared parameters are never copied (not even transiently),
the inputs are validated before anything changes, and seq2seq models (T5, BART) have patterns too.

``ReferenceConfig`` names how the reference is made (``configs/ref``):
- ``copy``: a frozen full copy of the policy;
- ``shared``: a frozen copy whose lower ``num_shared_layers`` layers are the policy's own (frozen) storage, and whose
  forward starts from the policy's layer-k output (trunk reuse);
- ``peft``: no second model: the policy with its adapters disabled, or a named frozen adapter.
``Reference.from_model`` wraps a reference model the user built (TRL's ``ref_model``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_vhead.layers import layer_module_names, shared_parameter_names


def create_reference_model(
    model: nn.Module, num_shared_layers: int | None = None, pattern: str | None = None
) -> nn.Module:
    """A frozen, eval-mode copy of ``model``.

    With ``num_shared_layers=k`` the parameters below layer ``k`` (embeddings included) are frozen in ``model`` and the
    reference holds the very same storage (``data_ptr`` equal); only the upper layers are copied.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "DeepSpeed ZeRO-3 is enabled and is not compatible with `create_reference_model()`. Please instantiate "
            "your reference model directly with `AutoModelForCausalLM.from_pretrained()`, or use the PEFT "
            "(adapter-disabled) reference."
        )
    shared = set() if num_shared_layers is None else set(shared_parameter_names(model, num_shared_layers, pattern))
    # Pre-seeding deepcopy's memo makes the copy reuse the shared tensors instead of copying them.
    memo: dict[int, object] = {}
    for name, param in model.named_parameters():
        if name in shared:
            param.requires_grad_(False)
            memo[id(param)] = nn.Parameter(param.data, requires_grad=False)
    reference = copy.deepcopy(model, memo)
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference.eval()


def tie_shared_parameters(reference: nn.Module, model: nn.Module) -> int:
    """Point the reference's shared parameters back at the policy's storage after a device or dtype move.

    ``Module.to()`` replaces each parameter's data separately, which silently un-shares them. Returns how many were
    re-tied. Only parameters already on the policy's device and dtype are re-tied: a reference deliberately kept in
    another dtype or on another device (bf16, CPU offload) is left as it is rather than made half one, half the other.
    """
    policy = dict(model.named_parameters())
    tied = 0
    for name, ref_param in reference.named_parameters():
        own = policy.get(name)
        if own is not None and not own.requires_grad and own.shape == ref_param.shape:
            if (ref_param.dtype, ref_param.device) != (own.dtype, own.device):
                continue
            if ref_param.data_ptr() != own.data_ptr() and torch.equal(ref_param.data, own.data):
                ref_param.data = own.data
                tied += 1
    return tied


_UNSET = object()


@contextlib.contextmanager
def instance_forward(module: nn.Module, forward: Any) -> Iterator[None]:
    """Shadow ``module``'s forward with ``forward`` inside the block, then restore exactly what was there before (an
    instance forward or none); a forward that another party bound meanwhile is theirs and is left in place."""
    before = module.__dict__.get("forward", _UNSET)
    module.__dict__["forward"] = forward
    try:
        yield
    finally:
        if module.__dict__.get("forward", _UNSET) is forward:
            if before is _UNSET:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = before


REFERENCE_MODES = ("copy", "shared", "peft")


@dataclass
class Reference:
    """What computes the reference log-probs: ``model`` (a value-head wrapper) run inside ``context()``.

    Trunk reuse (``trunk``: the module paths of the shared layers 0..k-1): the policy's rollout forward, run inside
    ``capture(policy)``, keeps the output of its layer k-1; the reference forward then skips its layers 0..k-1 and
    starts from that output. The shared layers are the same frozen storage and see the same inputs, so the result is
    exactly what a full reference forward gives, for k/L less work.
    """

    model: nn.Module
    mode: str  # copy | shared | peft | model (a reference model the user passed)
    adapter_name: str | None = None
    trunk: tuple[str, ...] = ()
    captured: Any = field(default=None, repr=False)

    @classmethod
    def from_model(cls, model: nn.Module) -> Reference:
        """A reference model built by the user (TRL's ``ref_model``), frozen and in eval mode."""
        model.requires_grad_(False)
        return cls(model.eval(), "model")

    @contextlib.contextmanager
    def capture(self, policy: nn.Module) -> Iterator[None]:
        """Keep the output of the policy's last shared layer during the forward run inside this block."""
        if not self.trunk:
            yield
            return

        def keep(module: nn.Module, inputs: Any, output: Any) -> None:
            self.captured = output

        handle = policy.get_submodule(self.trunk[-1]).register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Run the reference forward inside this block (adapters switched, or the shared trunk skipped)."""
        if self.trunk:
            with self._skip_trunk():
                yield
            return
        if self.mode != "peft":
            yield
            return
        peft_model = self.model.pretrained_model
        if self.adapter_name is None:
            with peft_model.disable_adapter():
                yield
            return
        previous = peft_model.active_adapter
        peft_model.set_adapter(self.adapter_name)
        try:
            yield
        finally:
            peft_model.set_adapter(previous)

    @contextlib.contextmanager
    def _skip_trunk(self) -> Iterator[None]:
        if self.captured is None:
            raise RuntimeError("Trunk reuse: run the policy's forward inside `reference.capture(policy)` first.")
        captured, self.captured = self.captured, None
        # Skipping a module's computation takes a forward swap: a pre-hook can change a layer's inputs but not skip
        # it, and the layers' parent model calls them itself. The layers are the reference copy's own modules (deep
        # copies made by create_reference_model), never the user's. A swap lost to someone re-binding `forward` in
        # between (transformers' kernels on train()/eval()) only costs the saving: the shared layers then compute
        # the very output that was captured.
        skip = lambda *args, **kwargs: captured  # noqa: E731
        with contextlib.ExitStack() as stack:
            for path in self.trunk:
                stack.enter_context(instance_forward(self.model.get_submodule(path), skip))
            yield

    def follow(self, policy: nn.Module) -> None:
        """Move to the policy's device and dtype, then re-share the storage that the move un-shared."""
        if self.mode == "peft":
            return
        self.model.to(device=policy.device, dtype=policy.dtype)
        self.model.v_head.to(policy.v_head.summary.weight.dtype)
        if self.mode == "shared":
            tie_shared_parameters(self.model, policy)


@dataclass
class ReferenceConfig:
    """How PPO's reference is made from the policy; validated on construction, before any model exists."""

    mode: str = "copy"
    num_shared_layers: int | None = None
    pattern: str | None = None
    adapter_name: str | None = None
    adapter_path: str | None = None
    reuse_trunk: bool = True

    def __post_init__(self) -> None:
        if self.mode not in REFERENCE_MODES:
            raise ValueError(f"ref.mode={self.mode!r} is not one of {list(REFERENCE_MODES)}.")
        if self.mode == "shared" and self.num_shared_layers is None:
            raise ValueError("ref.mode=shared needs ref.num_shared_layers (how many lower layers to share).")
        if self.mode != "shared" and self.num_shared_layers is not None:
            raise ValueError(f"ref.num_shared_layers is only used with ref.mode=shared, not {self.mode!r}.")
        if self.adapter_path is not None and self.adapter_name is None:
            raise ValueError("ref.adapter_path needs ref.adapter_name (the name to load the reference adapter as).")

    def validate(self, policy: nn.Module) -> None:
        """Check the settings against the policy (or a meta-device skeleton of it) before anything is copied."""
        if self.mode == "peft" and not getattr(policy, "is_peft_model", False):
            raise ValueError("ref.mode=peft needs a PEFT policy: set peft=lora (or load an adapter checkpoint).")
        if self.mode == "shared":
            shared_parameter_names(policy, self.num_shared_layers, self.pattern)  # raises on a bad k or pattern

    @classmethod
    def default_for(cls, policy: nn.Module, num_shared_layers: int | None = None,
                    reuse_trunk: bool = True) -> ReferenceConfig:
        """The reference when none is chosen: the adapters-disabled base of a PEFT policy, else a frozen copy (its
        lower ``num_shared_layers`` layers shared with the policy)."""
        if getattr(policy, "is_peft_model", False):
            return cls(mode="peft")
        mode = "copy" if num_shared_layers is None else "shared"
        return cls(mode=mode, num_shared_layers=num_shared_layers, reuse_trunk=reuse_trunk)

    def build(self, policy: nn.Module) -> Reference:
        """The reference of ``policy``, made from its current (pretrained, untrained) weights."""
        self.validate(policy)
        if self.mode == "peft":
            if self.adapter_path is not None:
                policy.pretrained_model.load_adapter(self.adapter_path, self.adapter_name, is_trainable=False)
            return Reference(policy, "peft", self.adapter_name)
        layers = self.num_shared_layers if self.mode == "shared" else None
        reference = create_reference_model(policy, layers, self.pattern)
        reuse = self.reuse_trunk and self.mode == "shared"
        trunk = tuple(layer_module_names(policy, layers, self.pattern)) if reuse else ()
        return Reference(reference, self.mode, trunk=trunk)


def as_reference_config(ref: Any) -> ReferenceConfig | None:
    """A ``ReferenceConfig`` from a config, a mode string (``"copy"``, ``"shared"``, ``"peft"``), a dict or None."""
    if ref is None or isinstance(ref, ReferenceConfig):
        return ref
    if isinstance(ref, str):
        return ReferenceConfig(mode=ref)
    if isinstance(ref, Mapping):
        return ReferenceConfig(**ref)
    raise TypeError(
        "ref must be None (a frozen copy), a mode 'copy'/'shared'/'peft', a dict such as {'mode': 'shared', "
        f"'num_shared_layers': 1}}, or a lit_vhead.ReferenceConfig; got {type(ref).__name__} {ref!r}."
    )


def reference_fingerprint(reference: Reference) -> float | None:
    """A float64 sum of the reference's language-model weights (not its value head: the KL never reads it), so a
    resumed run can tell that it rebuilt the reference its checkpoint trained against. None for ``peft`` references
    (their base weights come back with the checkpoint) and for weights not materialised yet (meta tensors)."""
    params = [p for n, p in reference.model.named_parameters() if not n.startswith("v_head.")]
    if reference.mode == "peft" or any(p.is_meta for p in params):
        return None
    with torch.no_grad():  # in chunks: a float64 copy of a whole embedding matrix would raise peak memory
        return float(sum(c.sum(dtype=torch.float64).item() for p in params for c in p.reshape(-1).split(1 << 18)))
