"""TRL's value-head models (``PreTrainedModelWrapper`` and its causal / seq2seq subclasses) on transformers 5.

Same public names, signatures and checkpoint format as TRL (``v_head.summary.*`` keys next to the HF keys), minus
TRL's bugs: the wrapper nests in a LightningModule or DDP (``state_dict`` recursion works, ``load_state_dict``
round-trips), the plain constructor gives a working model, the head's dropout follows the wrapper's train/eval mode,
``forward`` keeps no per-layer hidden states, local shards load, and no hub call is made for a local path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from lit_vhead.atomic import atomic_directory
from lit_vhead.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_MODEL_DIR,
    PICKLE_WEIGHTS,
    SAFE_WEIGHTS,
    V_HEAD_PREFIX,
    CheckpointError,
    _fetch,
    check_finite,
    check_weight_files,
    is_findable_offline,
    load_value_head_state,
    read_tensors,
)
from lit_vhead.sequence import mask_values
from lit_vhead.value_head import DEFAULT_INITIALIZER_RANGE, ValueHead, check_init_strategy

logger = logging.getLogger(__name__)

_HUB_KWARGS = ("token", "revision", "cache_dir", "local_files_only", "force_download", "subfolder")
# ``peft.prepare_model_for_kbit_training``'s keyword arguments (routed there, not to transformers, with peft_config)
_KBIT_KWARGS = ("use_gradient_checkpointing", "gradient_checkpointing_kwargs")
# TRL-era loading keywords that transformers 5 removed: False is dropped, True becomes a BitsAndBytesConfig
_QUANTIZATION_KWARGS = ("load_in_8bit", "load_in_4bit")


def _full_tensors(state_dict: dict) -> dict:
    """The state dict with FSDP2-sharded ``DTensor`` values gathered into full tensors (a collective when sharded)."""
    return {k: v.full_tensor() if type(v).__name__ == "DTensor" else v for k, v in state_dict.items()}


def _peft() -> Any:
    """peft, imported on first need: the value-head models load without it (TRL's test_no_peft), and a plain model
    never imports it."""
    try:
        import peft
    except ImportError:  # pragma: no cover - exercised only where peft is absent
        return None
    return peft


def _is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``, without importing peft (nothing is one before peft is loaded)."""
    peft = sys.modules.get("peft")
    return peft is not None and hasattr(peft, "PeftModel") and isinstance(model, peft.PeftModel)


def _quantization_config(hf_kwargs: dict) -> None:
    """Map TRL-era ``load_in_8bit``/``load_in_4bit`` (and their ``bnb_4bit_*`` companions) to transformers 5's
    ``quantization_config``, in place: ``False`` is dropped; ``True`` needs bitsandbytes."""
    flags = {k: bool(hf_kwargs.pop(k)) for k in _QUANTIZATION_KWARGS if k in hf_kwargs}
    if not flags:
        return
    bnb = {k: hf_kwargs.pop(k) for k in list(hf_kwargs) if k.startswith(("bnb_4bit_", "llm_int8_"))}
    if not any(flags.values()):
        return
    asked = ", ".join(f"{k}=True" for k, v in flags.items() if v)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"{asked} needs bitsandbytes, which is not installed: pip install bitsandbytes (and a GPU it supports), "
            "or drop the argument to load the model unquantized."
        )
    if "quantization_config" in hf_kwargs:
        raise ValueError(f"Pass either {asked} or quantization_config=..., not both.")
    from transformers import BitsAndBytesConfig

    hf_kwargs["quantization_config"] = BitsAndBytesConfig(**flags, **bnb)


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
                or _is_peft_model(pretrained_model)):
            raise ValueError(
                f"pretrained_model must be a transformers PreTrainedModel or a peft PeftModel, got "
                f"{type(pretrained_model).__name__}; build it with `{type(self).__name__}.from_pretrained(...)`."
            )
        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self.is_peft_model = _is_peft_model(pretrained_model)
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
            (head if key in cls.supported_args else kbit if key in _KBIT_KWARGS else hf)[key] = value
        return head, hf, kbit

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """Load the base model (hub id, local dir or instance), optional PEFT adapters and the saved value head.

        Keyword arguments named in ``supported_args`` configure the head; ``peft_config``, ``is_trainable``,
        ``reward_adapter`` and ``reward_adapter_name`` configure PEFT; the rest go to transformers.
        """
        peft_config = kwargs.pop("peft_config", None)
        reward_adapter = kwargs.pop("reward_adapter", None)
        reward_adapter_name = kwargs.pop("reward_adapter_name", "reward_adapter")
        is_trainable = kwargs.pop("is_trainable", False)
        head_kwargs, hf_kwargs, kbit_kwargs = cls._split_kwargs(kwargs)
        # transformers' Hub kernels stay off unless asked for (`use_kernels=True`): they fetch code from the Hub at
        # run time (offline they cannot), and PPO's grad-enabled passes run in eval mode, where they install
        # inference-only kernels.
        hf_kwargs.setdefault("use_kernels", False)
        check_init_strategy(head_kwargs.get("v_head_init_strategy"))
        _quantization_config(hf_kwargs)
        if reward_adapter is not None and not isinstance(reward_adapter, (str, os.PathLike)):
            raise ValueError(
                "The `reward_adapter` argument should be a string representing the name of local path or the Hub "
                f"id to the Reward Modeling adapter; got {type(reward_adapter).__name__}."
            )
        if peft_config is not None and (_peft() is None or not isinstance(peft_config, _peft().PeftConfig)):
            raise ValueError(
                f"The `peft_config` argument should be an instance of `peft.PeftConfig` class, got "
                f"{type(peft_config).__name__}."
            )
        hub_kwargs = {k: hf_kwargs[k] for k in _HUB_KWARGS if k in hf_kwargs}
        v_head_state = None
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            path = os.fspath(pretrained_model_name_or_path)
            # Read the v_head and the other files' headers first: a truncated or corrupt weights file then raises a
            # CheckpointError naming the file, not whatever transformers/safetensors/peft raise for it.
            v_head_state = load_value_head_state(path, hub_kwargs)
            if os.path.isdir(path):
                check_weight_files(path)
            adapter_config = _fetch(path, ADAPTER_CONFIG, hub_kwargs) if _peft() is not None else None
            if adapter_config is not None:
                if peft_config is not None:
                    warnings.warn(f"`peft_config` ignored: a peft config file was found in {path}", stacklevel=2)
                base = cls._load_peft_base(path, hub_kwargs, *model_args, **hf_kwargs)
                base = _peft().PeftModel.from_pretrained(base, path, is_trainable=is_trainable, **hub_kwargs)
            else:
                with _v_head_keys_expected(), _progress_bars(_weights_bytes(path) > _PROGRESS_BAR_MIN_BYTES):
                    base = cls.transformers_parent_class.from_pretrained(path, *model_args, **hf_kwargs)
                base = cls._maybe_add_peft(base, peft_config, kbit_kwargs)
            if v_head_state is None:  # the usual start from a plain LM: said at info level (TRL said nothing)
                logger.info(
                    "No value-head weights (v_head.*) found in '%s': the value head is freshly initialised. This is "
                    "expected when starting PPO from a plain language model, not when resuming.", path,
                )
        elif isinstance(pretrained_model_name_or_path, cls.supported_pretrained_model_architectures) or _is_peft_model(
            pretrained_model_name_or_path
        ):
            base = pretrained_model_name_or_path
            if _is_peft_model(base) and peft_config is not None:
                warnings.warn("`peft_config` argument ignored since the model is already a PeftModel.", stacklevel=2)
            else:
                base = cls._maybe_add_peft(base, peft_config, kbit_kwargs)
        else:
            raise ValueError(
                "pretrained_model_name_or_path should be a string or a PreTrainedModel, but is "
                f"{type(pretrained_model_name_or_path)}"
            )

        is_peft = _is_peft_model(base)
        if is_peft and base.active_peft_config.is_prompt_learning:
            raise ValueError("PromptLearningConfig is not supported for PPO training.")
        score = None
        if reward_adapter is not None:
            if not is_peft:
                raise ValueError(
                    f"reward_adapter={os.fspath(reward_adapter)!r} needs a PEFT policy: the reward LoRA is loaded as a "
                    "second adapter of the policy's base. Pass peft_config=LoraConfig(...) (CLI: peft=lora)."
                )
            score = cls.add_and_load_reward_modeling_adapter(
                base, os.fspath(reward_adapter), reward_adapter_name, token=hub_kwargs.get("token")
            )
        model = cls(
            base,
            score_module=score,
            supports_rm_adapter=score is not None,
            rm_adapter_name=reward_adapter_name if score is not None else None,
            **head_kwargs,
        )
        if v_head_state is not None:
            model.post_init(v_head_state)
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            check_finite(model.named_parameters(), os.fspath(pretrained_model_name_or_path),
                         _base_name(model.pretrained_model))
        return model

    @classmethod
    def _load_peft_base(cls, path: str, hub_kwargs: dict, *model_args: Any, **hf_kwargs: Any) -> PreTrainedModel:
        """The base model under the adapters saved in ``path``: the copy saved beside them (``base_model/``, written
        when the base could not be found again) if there is one, else the recorded ``base_model_name_or_path``."""
        base_config = _fetch(path, f"{BASE_MODEL_DIR}/config.json", hub_kwargs)
        if base_config is not None:
            base_dir = os.path.dirname(base_config)
            if os.path.isdir(path):
                check_weight_files(base_dir)
            if not os.path.isdir(path):  # a hub repo: fetch the whole base_model/ folder
                from huggingface_hub import snapshot_download

                download = {k: v for k, v in hub_kwargs.items() if k != "subfolder"}
                snapshot = snapshot_download(path, allow_patterns=[f"{BASE_MODEL_DIR}/*"], **download)
                base_dir = os.path.join(snapshot, BASE_MODEL_DIR)
            with _progress_bars(_weights_bytes(base_dir) > _PROGRESS_BAR_MIN_BYTES):
                return cls.transformers_parent_class.from_pretrained(base_dir, *model_args, **hf_kwargs)
        base_path = _peft().PeftConfig.from_pretrained(path, **hub_kwargs).base_model_name_or_path
        if not base_path:
            raise CheckpointError(
                f"The adapters in '{path}' record no base model (base_model_name_or_path is null) and no "
                f"{BASE_MODEL_DIR}/ is saved beside them: load the base yourself and pass it, "
                f"{cls.__name__}.from_pretrained(PeftModel.from_pretrained(base, '{path}')), or re-save with lit_vhead "
                "(which saves such a base with the adapters)."
            )
        if os.path.isdir(base_path):
            check_weight_files(base_path)
        return cls.transformers_parent_class.from_pretrained(base_path, *model_args, **hf_kwargs)

    @staticmethod
    def _maybe_add_peft(base: PreTrainedModel, peft_config: Any, kbit_kwargs: dict) -> PreTrainedModel:
        if peft_config is None:
            return base
        if getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False):
            base = _peft().prepare_model_for_kbit_training(base, **kbit_kwargs)
        return _peft().get_peft_model(base, peft_config)

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
        hub_kwargs = {"token": token} if token else {}
        adapter_base = _check_adapter_base(pretrained_model, adapter_model_id, hub_kwargs)
        try:
            pretrained_model.load_adapter(adapter_model_id, adapter_name, is_trainable=False)
        except RuntimeError as err:
            mismatches = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
            if not mismatches:
                raise
            raise ValueError(
                f"The reward adapter '{adapter_model_id}' does not fit the policy: {len(mismatches)} tensors differ in "
                f"shape ({mismatches[0].rstrip('.')}). It was trained on base {adapter_base!r}; build the policy from "
                f"that base (CLI: model.name_or_path=<its dir>)."
            ) from None
        weights = None
        for filename in ADAPTER_WEIGHTS:
            weights = _fetch(adapter_model_id, filename, hub_kwargs)
            if weights is not None:
                break
        if weights is None:
            raise ValueError(
                f"Could not find adapter weights (adapter_model.safetensors or .bin) in '{adapter_model_id}'; "
                "make sure "
                "you have the correct adapter model id or path."
            )
        score_state = read_tensors(weights, lambda key: any(f"{name}." in key for name in cls.supported_rm_modules))
        if "weight" not in {k.rsplit(".", 1)[-1] for k in score_state}:
            raise ValueError(
                f"The adapter '{adapter_model_id}' has no `score` head weights; it must be a sequence-classification "
                "(task_type='SEQ_CLS') adapter."
            )
        score_state = {k.rsplit(".", 1)[-1]: v for k, v in score_state.items()}
        num_labels, hidden_dim = score_state["weight"].shape
        device = next(pretrained_model.parameters()).device
        score = nn.Linear(hidden_dim, num_labels, bias="bias" in score_state).to(device, pretrained_model.dtype)
        score.load_state_dict(score_state)
        score.requires_grad_(False)
        return score

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
        state_dict = _full_tensors(kwargs.pop("state_dict", None) or self.state_dict())
        if not kwargs.pop("is_main_process", True):  # FSDP/DDP: every rank gathers, one writes
            return
        safe = kwargs.get("safe_serialization", True)
        model_bytes = sum(p.numel() * p.element_size() for p in self.hf_model.parameters())
        self._check_not_into_own_base(save_directory)
        with atomic_directory(save_directory) as tmp, _progress_bars(model_bytes > _PROGRESS_BAR_MIN_BYTES):
            if self.is_peft_model:
                card = Path(save_directory, "README.md")
                if card.is_file():  # peft updates the model card it finds, as when it saves in place
                    shutil.copy2(card, tmp)
                heads = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k.startswith(V_HEAD_PREFIX)}
                if safe:
                    from safetensors.torch import save_file

                    save_file(heads, os.path.join(tmp, SAFE_WEIGHTS), metadata={"format": "pt"})
                else:
                    torch.save(heads, os.path.join(tmp, PICKLE_WEIGHTS))
                kwargs.pop("safe_serialization", None)
                self.pretrained_model.save_pretrained(tmp, *args, **kwargs)
                self._record_peft_base(tmp, os.path.abspath(save_directory), safe)
            else:
                self.pretrained_model.save_pretrained(tmp, *args, state_dict=state_dict, **kwargs)

    def _check_not_into_own_base(self, save_directory: str | os.PathLike) -> None:
        """Adapters saved into the directory of the base they load from would replace its weights with the value
        head's: refuse before writing anything."""
        base = _base_name(self.pretrained_model) if self.is_peft_model else None
        if base is not None and os.path.isdir(base) and _same_source(os.path.realpath(base),
                                                                      os.path.realpath(save_directory)):
            raise ValueError(
                f"save_pretrained('{save_directory}') would write the adapters and value head over the weights of "
                "their own base model, which is loaded from that directory: save into another directory."
            )

    def _record_peft_base(self, tmp: str, final_directory: str, safe: bool) -> None:
        """Make the adapters' ``base_model_name_or_path`` findable offline: an absolute path for a local base, or the
        base itself saved into ``base_model/`` when nothing on disk holds it."""
        recorded = _base_name(self.pretrained_model)
        if recorded is not None and os.path.isdir(recorded):
            recorded = os.path.abspath(recorded)
        elif not is_findable_offline(recorded):
            adapter_names = set(self.pretrained_model.peft_config)
            base_state = {}
            for key, value in self.hf_model.state_dict().items():
                parts = key.split(".")
                if any(part in adapter_names for part in parts):
                    continue  # an adapter's own tensor (lora_A.default..., modules_to_save.default...)
                key = ".".join(p for p in parts if p not in ("base_layer", "original_module"))
                base_state[key] = value
            self.hf_model.save_pretrained(
                os.path.join(tmp, BASE_MODEL_DIR), state_dict=base_state, safe_serialization=safe
            )
            recorded = os.path.join(final_directory, BASE_MODEL_DIR)
        for config_file in Path(tmp).rglob(ADAPTER_CONFIG):
            config = json.loads(config_file.read_text())
            config["base_model_name_or_path"] = recorded
            config_file.write_text(json.dumps(_portable_adapter_config(config), indent=2, sort_keys=True))

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload model with value head", **kwargs: Any) -> Any:
        """Upload what ``save_pretrained`` writes (value head included, also for PEFT models) to the hub.

        Unlike TRL, the base model is not mutated (TRL attached ``v_head`` to it for good).
        """
        from huggingface_hub import HfApi

        hub_args = {k: kwargs.pop(k) for k in ("token", "private", "revision", "create_pr") if k in kwargs}
        api = HfApi(token=hub_args.get("token"))
        repo = api.create_repo(repo_id, private=hub_args.get("private"), exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(os.path.join(tmp, "model"), **kwargs)
            return api.upload_folder(
                repo_id=repo.repo_id,
                folder_path=os.path.join(tmp, "model"),
                commit_message=commit_message,
                revision=hub_args.get("revision"),
                create_pr=hub_args.get("create_pr", False),
            )

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


# transformers' per-tensor progress bars ("Loading weights", "Writing model shards") are shown for big models only.
_PROGRESS_BAR_MIN_BYTES = 2**30


def _weights_bytes(path: str) -> float:
    """Bytes of the weight files in a local dir; infinite for a hub id (a download worth a progress bar)."""
    if not os.path.isdir(path):
        return float("inf")
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin"))


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' progress bars on or off for the duration of one load or save."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _v_head_keys_expected() -> Iterator[None]:
    """While transformers loads one of our checkpoints, the ``v_head.*`` tensors in it are expected: they are not
    reported as UNEXPECTED keys (they are read separately, by ``load_value_head_state``). Other keys still are."""
    original = getattr(PreTrainedModel, "_adjust_missing_and_unexpected_keys", None)
    if original is None:  # a transformers without this hook: its report stays as it is
        yield
        return

    def adjust(model: PreTrainedModel, loading_info: Any) -> None:
        original(model, loading_info)
        loading_info.unexpected_keys = {k for k in loading_info.unexpected_keys if not k.startswith(V_HEAD_PREFIX)}

    PreTrainedModel._adjust_missing_and_unexpected_keys = adjust
    try:
        yield
    finally:
        PreTrainedModel._adjust_missing_and_unexpected_keys = original


def _portable_adapter_config(config: dict) -> dict:
    """The adapter config without ``peft_version`` and the entries that still hold their defaults: older peft (TRL
    0.11.4's peft 0.13) rejects every field it does not know, and newer peft fills the defaults back in."""
    import dataclasses

    config_class = _peft().mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(config.get("peft_type"))
    if config_class is None:
        return config
    defaults = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()

    def as_json(value: Any) -> Any:
        return json.loads(json.dumps(value, sort_keys=True, default=lambda v: (
            dataclasses.asdict(v) if dataclasses.is_dataclass(v) else sorted(v) if isinstance(v, set) else str(v))))

    return {
        key: value for key, value in config.items()
        if key != "peft_version" and (key not in defaults or as_json(value) != as_json(defaults[key]))
    }


def _base_name(model: Any) -> str | None:
    """What a model records as its source (``config.name_or_path``): a hub id, a path, or None (built from a
    config)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "name_or_path", None) or getattr(base.config, "_name_or_path", None) or None


def _same_source(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.samefile(a, b)
    return a.rstrip("/") == b.rstrip("/")


def _check_adapter_base(pretrained_model: Any, adapter_model_id: str, hub_kwargs: dict) -> str | None:
    """Warn unless the reward adapter's recorded base is the policy's base; return the adapter's base name."""
    adapter_base = _peft().PeftConfig.from_pretrained(adapter_model_id, **hub_kwargs).base_model_name_or_path
    policy_base = _base_name(pretrained_model)
    if adapter_base is None:
        warnings.warn(
            f"The reward adapter '{adapter_model_id}' records no base model (base_model_name_or_path is null), so "
            "lit_vhead cannot check that it was trained on the policy's base; its scores are meaningful only there.",
            stacklevel=3,
        )
    elif not _same_source(adapter_base, policy_base):
        policy = repr(policy_base) if policy_base else "a model built from a config (random weights)"
        warnings.warn(
            f"The reward adapter '{adapter_model_id}' was trained on base {adapter_base!r}, but the policy's base is "
            f"{policy}: its scores are meaningful only on its own base. Build the policy from it (CLI: "
            f"model.name_or_path={adapter_base}).",
            stacklevel=3,
        )
    return adapter_base


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
