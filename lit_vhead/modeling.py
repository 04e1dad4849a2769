"""TRL's value-head models (``PreTrainedModelWrapper`` and its causal / seq2seq subclasses) on transformers 5.

Same public names, signatures and checkpoint format as TRL (``v_head.summary.*`` keys next to the HF keys), minus
TRL's bugs: the wrapper nests in a LightningModule or DDP (``state_dict`` recursion works, ``load_state_dict``
round-trips), the plain constructor gives a working model, the head's dropout follows the wrapper's train/eval mode,
``forward`` keeps no per-layer hidden states, local shards load, and no hub call is made for a local path.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from lit_vhead.checkpoint import V_HEAD_PREFIX, CheckpointError
from lit_vhead.loading import KBIT_KWARGS, is_peft_model, load_pretrained, load_reward_adapter
from lit_vhead.saving import push_to_hub, save_pretrained
from lit_vhead.sequence import mask_values
from lit_vhead.value_head import DEFAULT_INITIALIZER_RANGE, ValueHead, check_init_strategy


class PreTrainedModelWrapper(nn.Module):
    """Wraps a ``transformers.PreTrainedModel`` (or a ``peft.PeftModel``) and adds heads to it.

    Subclasses set ``transformers_parent_class`` (the Auto class that loads the base) and ``supported_args`` (the
    keyword arguments that configure the head rather than the base).
    """

    transformers_parent_class: Any = None
    supported_args: tuple[str, ...] = ()
    supported_modules = ("v_head",)
    supported_rm_modules = ("score",)
    supported_pretrained_model_architectures: tuple[type, ...] = (PreTrainedModel,)  # and peft.PeftModel

    def __init__(
        self,
        pretrained_model: PreTrainedModel | None = None,
        score_module: nn.Module | None = None,
        supports_rm_adapter: bool = False,
        rm_adapter_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not (isinstance(pretrained_model, self.supported_pretrained_model_architectures)
                or is_peft_model(pretrained_model)):
            raise ValueError(
                f"pretrained_model must be a transformers PreTrainedModel or a peft PeftModel, got "
                f"{type(pretrained_model).__name__}; build it with `{type(self).__name__}.from_pretrained(...)`."
            )
        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self.is_peft_model = is_peft_model(pretrained_model)
        self.is_loaded_in_8bit = getattr(pretrained_model, "is_loaded_in_8bit", False)
        self.is_loaded_in_4bit = getattr(pretrained_model, "is_loaded_in_4bit", False)
        self.is_sequential_parallel = False
        self.supports_rm_adapter = supports_rm_adapter
        self.rm_adapter_name = rm_adapter_name
        self.policy_adapter_name = pretrained_model.active_adapter if self.is_peft_model else "default"
        if score_module is not None:
            self.score = score_module

    # ---------------------------------------------------------------- attributes users expect from a HF model
    @property
    def current_device(self) -> torch.device:
        return next(self.pretrained_model.parameters()).device

    device = current_device

    @property
    def dtype(self) -> torch.dtype:
        return self.pretrained_model.dtype

    @property
    def generation_config(self):
        return self.pretrained_model.generation_config

    @property
    def hf_model(self) -> PreTrainedModel:
        """The transformers model under any PEFT wrapping."""
        return self.pretrained_model.get_base_model() if self.is_peft_model else self.pretrained_model

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict:
        return self.pretrained_model.prepare_inputs_for_generation(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the base's layers (non-reentrant unless told otherwise); a PEFT base also gets gradients on its
        input embeddings, without which checkpointed layers with frozen inputs would give the adapters none."""
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        self.pretrained_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if self.is_peft_model:
            self.pretrained_model.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        self.pretrained_model.gradient_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        self.pretrained_model.enable_input_require_grads()

    # ---------------------------------------------------------------- loading
    @classmethod
    def _split_kwargs(cls, kwargs: dict) -> tuple[dict, dict, dict]:
        """Split into (head kwargs, transformers kwargs, kbit-training kwargs) by the callee's real parameters.

        TRL matched against ``co_varnames`` (local variable names too), silently stealing kwargs such as ``name``.
        """
        head, hf, kbit = {}, {}, {}
        for key, value in kwargs.items():
            (head if key in cls.supported_args else kbit if key in KBIT_KWARGS else hf)[key] = value
        return head, hf, kbit

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """Load the base model (hub id, local dir or instance), optional PEFT adapters and the saved value head.

        Keyword arguments named in ``supported_args`` configure the head; ``peft_config``, ``is_trainable``,
        ``reward_adapter`` and ``reward_adapter_name`` configure PEFT; the rest go to transformers
        (:func:`lit_vhead.loading.load_pretrained`).
        """
        return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def add_and_load_reward_modeling_adapter(
        cls,
        pretrained_model: Any,
        adapter_model_id: str,
        adapter_name: str = "reward_model_adapter",
        token: str | None = None,
    ) -> nn.Module:
        """Load a sequence-classification LoRA as a second, frozen adapter and return its ``score`` head.

        Warns when the adapter was trained on another base than the policy's (its scores would be meaningless), and
        raises a one-line ``ValueError`` when its shapes do not fit the policy.
        """
        return load_reward_adapter(cls, pretrained_model, adapter_model_id, adapter_name, token)

    # ---------------------------------------------------------------- state
    def post_init(self, state_dict: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict:
        """TRL's format at the top level: the HF keys plus ``v_head.*`` (PEFT: the ``v_head.*`` keys only).

        When a parent module (a LightningModule, DDP) recurses into the wrapper, ``destination`` or ``prefix`` is
        set and the ordinary ``nn.Module`` keys are produced, so nesting just works.
        """
        if args or destination is not None or prefix:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        state = {} if self.is_peft_model else self.pretrained_model.state_dict(keep_vars=keep_vars)
        for module_name in self.supported_modules:
            for key, value in getattr(self, module_name).state_dict(keep_vars=keep_vars).items():
                state[f"{module_name}.{key}"] = value
        return state

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Accepts both TRL's format (what ``state_dict()`` returns) and the nested ``nn.Module`` format."""
        if any(k.startswith("pretrained_model.") for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        heads = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in self.supported_modules}
        base = {k: v for k, v in state_dict.items() if k not in heads}
        missing, unexpected = [], []
        if base or not self.is_peft_model:
            result = self.pretrained_model.load_state_dict(base, strict=strict, assign=assign)
            missing += result.missing_keys
            unexpected += result.unexpected_keys
        for module_name in self.supported_modules:
            own = {k[len(module_name) + 1 :]: v for k, v in heads.items() if k.startswith(f"{module_name}.")}
            result = getattr(self, module_name).load_state_dict(own, strict=strict, assign=assign)
            missing += [f"{module_name}.{k}" for k in result.missing_keys]
            unexpected += [f"{module_name}.{k}" for k in result.unexpected_keys]
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Write the base (or its adapters) and the value head, atomically, so that the directory reloads offline.

        Full models: one HF checkpoint with the ``v_head.*`` tensors inside (loads in TRL and in plain transformers).
        PEFT models: the adapter files plus ``model.safetensors`` holding only the ``v_head.*`` tensors (TRL wrote a
        pickle; ``safe_serialization=False`` still writes ``pytorch_model.bin``). When the base cannot be found again
        offline from what the adapters record (built from a config, or a hub id not in the cache), the base is saved
        too, in ``base_model/``, and ``base_model_name_or_path`` points there. The directory need not exist (a symlink
        to one stays a symlink); if it does, only the files this save writes and the weight files of a previous save
        (its shards, adapters, ``base_model/``) are replaced or removed: everything else (a tokenizer, notes, your
        own files and symlinks) stays untouched, and a failed or killed save leaves the directory as it was (see
        ``lit_vhead.atomic``). Files follow the umask. Under FSDP2 or DDP call it on every rank with
        ``is_main_process=<rank 0>``: sharded weights are gathered on every rank and written once.
        """
        save_pretrained(self, save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload model with value head", **kwargs: Any) -> Any:
        """Upload what ``save_pretrained`` writes (value head included, also for PEFT models) to the hub.

        Unlike TRL, the base model is not mutated (TRL attached ``v_head`` to it for good).
        """
        return push_to_hub(self, repo_id, commit_message, **kwargs)

    # ---------------------------------------------------------------- running
    def _decoder(self) -> nn.Module:
        """The module whose output is the last hidden state, looked up once (kept out of the module tree)."""
        decoder = self.__dict__.get("_decoder_module")
        if decoder is None:
            decoder = self.__dict__["_decoder_module"] = self.hf_model.get_decoder()
        return decoder

    def _base_forward(self, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        """Run the base model; return (its output, the decoder's last hidden state).

        TRL read ``hidden_states[-1]`` with ``output_hidden_states=True``, which keeps every layer's output alive; a
        hook on the decoder keeps only the last one, which the LM head reads anyway. The hook lives only during the
        call, so deep copies and pickles carry none.
        """
        kwargs["return_dict"] = True
        captured: list[torch.Tensor] = []
        handle = self._decoder().register_forward_hook(lambda module, inputs, output: captured.append(output[0]))
        try:
            output = self.pretrained_model(**kwargs)
        finally:
            handle.remove()
        return output, captured[-1]

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``generate`` of the base model (token ids, no values)."""
        return self.pretrained_model.generate(*args, **kwargs)

    def compute_reward_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Per-token scores ``[B, T, num_labels]`` of the reward adapter, without gradients.

        The policy adapter and the train/eval mode are restored afterwards (TRL left the model in eval mode).
        """
        if not self.supports_rm_adapter:
            raise ValueError("This model does not support reward modeling adapter.")
        was_training = self.training
        previous = self.pretrained_model.active_adapter
        self.eval()
        try:
            self.pretrained_model.set_adapter(self.rm_adapter_name)
            with torch.no_grad():
                _, hidden = self._base_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                return self.score(hidden.to(self.score.weight.dtype))
        finally:
            self.pretrained_model.set_adapter(previous)
            self.train(was_training)


class _ValueHeadModel(PreTrainedModelWrapper):
    """What the causal and seq2seq classes share: the head, its init, loading its weights, the forward pass.

    ``lm_head_namings`` (TRL's class attribute) names the language-model head: a base without a module of one of these
    names is rejected, and the value head goes to the LM head's device. Extend it for a model whose head is named
    otherwise.
    """

    supported_args = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")
    lm_head_namings: tuple[str, ...] | list[str] = ("lm_head", "embed_out")

    def __init__(self, pretrained_model: PreTrainedModel, **kwargs: Any) -> None:
        head_kwargs, _, _ = self._split_kwargs(kwargs)
        check_init_strategy(head_kwargs.get("v_head_init_strategy"))
        super().__init__(pretrained_model, **kwargs)
        lm_head = self._lm_head()
        self.v_head = ValueHead(self.config, **head_kwargs)
        self._init_weights(**head_kwargs)
        self.v_head.to(next(lm_head.parameters(), self.v_head.summary.weight).device)
        self.train(pretrained_model.training)  # the head's dropout follows the base's mode

    @property
    def _cache_argument(self) -> str:
        """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40)."""
        return "cache" if "cache" in inspect.signature(self.hf_model.forward).parameters else "past_key_values"

    def _lm_head(self) -> nn.Module:
        """The base's language-model head: its first module named one of ``lm_head_namings`` (TRL 0.7.10's check)."""
        for name, module in self.hf_model.named_modules():
            if name.rsplit(".", 1)[-1] in self.lm_head_namings:
                return module
        raise ValueError(
            f"{type(self.hf_model).__name__} has no language-model head: none of its modules is named one of "
            f"{type(self).__name__}.lm_head_namings={list(self.lm_head_namings)}. Load it with "
            f"{self.transformers_parent_class.__name__} (e.g. GPT2LMHeadModel, not GPT2Model), or, if its head has "
            "another name, add that name to lm_head_namings."
        )

    def _init_weights(self, **kwargs: Any) -> None:
        """Initialise the head: ``v_head_init_strategy`` None (nn.Linear default) or "normal" (N(0, range), bias 0)."""
        self.v_head.reset_parameters(
            kwargs.get("v_head_init_strategy"), kwargs.get("v_head_initializer_range", DEFAULT_INITIALIZER_RANGE)
        )

    def post_init(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load value-head weights, given with or without the ``v_head.`` prefix (other keys are ignored)."""
        head = {k[len(V_HEAD_PREFIX) :] if k.startswith(V_HEAD_PREFIX) else k: v for k, v in state_dict.items()}
        head = {k: v for k, v in head.items() if k in ("summary.weight", "summary.bias")}
        expected = self.v_head.summary.weight.shape
        if "summary.weight" in head and head["summary.weight"].shape != expected:
            raise CheckpointError(
                f"The saved value head has shape {tuple(head['summary.weight'].shape)} but this "
                f"{type(self.hf_model).__name__} needs {tuple(expected)}: the checkpoint is from another architecture."
            )
        self.v_head.load_state_dict(head, strict=True)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        return_past_key_values: bool = False,
        **kwargs: Any,
    ) -> tuple:
        """Returns ``(lm_logits fp32, loss or None, value [B, T])`` and, if asked, the past key values.

        Values at padding positions (``attention_mask == 0``; ``decoder_attention_mask`` for seq2seq) are zero.
        """
        if past_key_values is not None:
            kwargs[self._cache_argument] = past_key_values
        if return_past_key_values:
            kwargs["use_cache"] = True
        output, value = self.forward_with_values(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        lm_logits = output.logits if output.logits.dtype == torch.float32 else output.logits.float()
        result = (lm_logits, output.loss, value)
        if not return_past_key_values:
            return result
        return (*result, output.get("cache", output.get("past_key_values")))

    def forward_with_values(self, **model_inputs: Any) -> tuple[Any, torch.Tensor]:
        """The base model's output (logits in the model's dtype) and the values ``[B, T]`` in the head's dtype.

        The one forward path of the value-head models: ``forward`` (TRL's tuple) and PPO's log-prob/value passes both
        run it. Values at padding positions are zero. ``logits_to_keep`` and other base-model arguments pass through.
        """
        output, hidden = self._base_forward(**model_inputs)
        value = self.v_head(hidden).squeeze(-1)
        return output, mask_values(value, self._value_mask(model_inputs.get("attention_mask"), model_inputs, value))

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs: Any) -> torch.Tensor:
        """The values ``[B, T]`` alone (:class:`lit_vhead.interfaces.ValueFunction`), zero at padding."""
        return self.forward_with_values(input_ids=input_ids, attention_mask=attention_mask, **model_inputs)[1]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters PPO updates: the value head's and the base model's that require gradients (a PEFT base's
        adapters, not its frozen weights)."""
        return (p for p in self.parameters() if p.requires_grad)

    def _value_mask(self, attention_mask: torch.Tensor | None, kwargs: dict, value: torch.Tensor):
        return attention_mask if attention_mask is not None and attention_mask.shape == value.shape else None


class AutoModelForCausalLMWithValueHead(_ValueHeadModel):
    """A causal LM with a value head: ``forward`` returns ``(lm_logits, loss, value)``."""

    transformers_parent_class = AutoModelForCausalLM


class AutoModelForSeq2SeqLMWithValueHead(_ValueHeadModel):
    """An encoder-decoder LM with a value head on the decoder's last hidden state: ``value`` is ``[B, T_dec]``."""

    transformers_parent_class = AutoModelForSeq2SeqLM
    lm_head_namings = ["lm_head", "embed_out", "output_projection"]
    is_encoder_decoder = True

    def _lm_head(self) -> nn.Module:
        lm_head = super()._lm_head()
        if not getattr(self.config, "is_encoder_decoder", False):
            raise ValueError(
                f"{type(self.hf_model).__name__} is not an encoder-decoder model; use "
                "AutoModelForCausalLMWithValueHead for decoder-only models."
            )
        return lm_head

    def forward(self, input_ids: torch.Tensor | None = None, past_key_values: Any = None, attention_mask=None,
                return_past_key_values: bool = False, **kwargs: Any) -> tuple:
        decoder_inputs = ("decoder_input_ids", "labels", "decoder_inputs_embeds")
        if all(kwargs.get(k) is None for k in decoder_inputs):
            raise ValueError("A seq2seq forward needs `decoder_input_ids` (or `labels`) besides `input_ids`.")
        return super().forward(input_ids, past_key_values, attention_mask, return_past_key_values, **kwargs)

    forward.__doc__ = _ValueHeadModel.forward.__doc__

    def _value_mask(self, attention_mask: torch.Tensor | None, kwargs: dict, value: torch.Tensor):
        mask = kwargs.get("decoder_attention_mask")
        return mask if mask is not None and mask.shape == value.shape else None
