"""``PPOConfig``: ONE configuration class for every way into PPO (CLI, ``PPOModule``, ``PPOTrainer``).

It takes TRL 0.11.4's ``PPOConfig`` field names and defaults, so a classic script migrates by changing its import:
- the fields this project implements work;
- fields with no meaning here (``optimize_cuda_cache``, ``compare_steps``, ...) are accepted and warn once;
- an unknown field raises ``TypeError`` naming it and the closest known name.

Its fields, less TRL's PPOTrainer-only and run-time ones, are Hydra's schema for the ``ppo`` config group (and
``HeadConfig`` for ``head``; see ``lit_vhead.cli``), so ``ppo.learning_rate=abc`` or ``head.init=bogus`` fail at the
command line and unknown keys are rejected.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import sys
import tempfile
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from lit_vhead.ppo.functional import KL_PENALTY_KINDS
from lit_vhead.ppo.snapshot import open_undo_file
from lit_vhead.value_head import DEFAULT_INITIALIZER_RANGE, INIT_STRATEGIES

# The choices come from the code that implements them (one source each); the enums let Hydra reject a bad value.
HeadInit = Enum("HeadInit", {name: name for name in INIT_STRATEGIES if name is not None}, type=str)
HeadInit.__doc__ = "``v_head_init_strategy``: ``null`` keeps ``nn.Linear``'s init, ``normal`` draws N(0, range)."
KLPenalty = Enum("KLPenalty", {name: name for name in KL_PENALTY_KINDS}, type=str)
KLPenalty.__doc__ = "Per-token KL estimator used in the reward (and logged as ``objective/kl``); see ``kl_penalty``."


@dataclass
class HeadConfig:
    """The value head (``from_pretrained``'s ``v_head_*`` / ``summary_dropout_prob`` keyword arguments).

    The defaults are the model classes' own (``lit_vhead.value_head``): ``dropout`` None takes the model config's
    ``summary_dropout_prob``, else 0.1 (PPO runs with dropout off; it matters for other uses).
    """

    init: HeadInit | None = None
    dropout: float | None = None
    initializer_range: float = DEFAULT_INITIALIZER_RANGE

    def as_model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``AutoModel*WithValueHead.from_pretrained`` that configure the head."""
        init = self.init.value if isinstance(self.init, HeadInit) else self.init
        return {
            "v_head_init_strategy": init,
            "v_head_initializer_range": self.initializer_range,
            "summary_dropout_prob": self.dropout,
        }


@dataclass
class SamplingConfig:
    """Sampling settings of ``PPOModule``'s rollouts (TRL's usual PPO settings: pure sampling, no top-k/top-p).

    ``PPOTrainer`` users pass generation keyword arguments to ``generate`` instead, as in TRL.
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0  # set equal to max_new_tokens for fixed-length responses
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_at_eos: bool = True


SCORE_TOKENS = ("last", "next")  # where the sequence score lands (PPOConfig.score_token)

# Accepted for TRL compatibility, but nothing here reads them: setting one warns once per process.
IGNORED_FIELDS = {
    "optimize_cuda_cache": "CUDA cache handling is PyTorch's and Lightning's",
    "optimize_device_cache": "device cache handling is PyTorch's and Lightning's",
    "compare_steps": "push-to-hub-if-best is not implemented; save with save_pretrained",
    "push_to_hub_if_best_kwargs": "push-to-hub-if-best is not implemented; save with save_pretrained",
    "dataset_num_proc": "datasets are not preprocessed here",
}
_warned: set[str] = set()


class _InitSignature:
    """``inspect.signature`` of a class with its own ``__new__`` would show ``__new__``'s ``(*args, **kwargs)``:
    this shows the class's (or subclass's) dataclass ``__init__`` instead."""

    def __get__(self, instance: Any, owner: type) -> inspect.Signature:
        parameters = list(inspect.signature(owner.__init__).parameters.values())[1:]  # without self
        return inspect.Signature(parameters)


@dataclass
class PPOConfig:
    """TRL classic's PPO settings, TRL 0.11.4's names and defaults (``steps`` counts PPO steps here).

    Fields beyond TRL's: ``kl_penalty="k3"``, ``missing_eos_penalty`` (TRL PPOv2's: subtracted from the score of a
    response that never produced EOS), ``score_token`` (``"next"``: TRL PPOv2's placement of the score, on the token
    after the response), ``generation`` (``PPOModule``'s sampling settings), and settings that change
    how the passes run, never the algorithm (see ``lit_vhead.kernels`` and the README's "Speed and memory"):
    ``cpu_kernels`` (``"auto"``: fp32 CPU GEMMs through oneDNN where a one-time probe measures it clearly faster
    than PyTorch's at the model's shapes, see ``lit_vhead.kernels.AUTO_SPEEDUP``; ``true``/``false`` force it),
    ``compile`` (``torch.compile`` of the update's training forward) and ``optimizer_in_backward`` (each parameter
    stepped as soon as its gradient is complete, the gradient dropped: bitwise the same weights, one model-size of
    gradients less at peak; it applies where that is exact: one process, no GradScaler, ``max_grad_norm=None``,
    ``gradient_accumulation_steps=1``, a per-parameter ``torch.optim`` optimizer; elsewhere the usual step runs).
    ``undo_failed_update`` (on): a PPO step whose loss turns NaN/inf after some of its optimizer steps is undone
    (the trainable weights and the optimizer state are copied before its first optimizer step: e.g. 3x the weights
    in fp32 for a full fine-tune with Adam, little for LoRA), into an unlinked temporary file in ``undo_dir``
    (None: the system's temp directory), so the copy sits in the OS page cache, not in the process's memory; off
    skips that copy, and the error then says how many optimizer steps the model and optimizer kept.
    """

    exp_name: str = os.path.basename(sys.argv[0])[: -len(".py")]
    seed: int = 0
    log_with: str | None = None  # PPOTrainer: "wandb" | "tensorboard" | "csv"; PPOModule: the Trainer's loggers
    task_name: str | None = None
    model_name: str = "gpt2"
    query_dataset: str = "stanfordnlp/imdb"
    reward_model: str = "sentiment-analysis:lvwerra/distilbert-imdb"
    remove_unused_columns: bool = True
    tracker_kwargs: dict[str, Any] = field(default_factory=dict)
    accelerator_kwargs: dict[str, Any] = field(default_factory=dict)
    project_kwargs: dict[str, Any] = field(default_factory=dict)
    tracker_project_name: str = "trl"
    push_to_hub_if_best_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 20000
    learning_rate: float = 1.41e-5
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    kl_penalty: KLPenalty = KLPenalty.kl
    target: float = 6.0
    horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float | None = 0.2  # None: value clipping off
    vf_coef: float = 0.1
    batch_size: int = 128
    forward_batch_size: int | None = None
    mini_batch_size: int = 128
    gradient_accumulation_steps: int = 1
    world_size: int | None = None
    ppo_epochs: int = 4
    max_grad_norm: float | None = None
    optimize_cuda_cache: bool | None = None
    optimize_device_cache: bool = False
    early_stopping: bool = False
    target_kl: float = 1.0
    compare_steps: int = 1
    ratio_threshold: float = 10.0
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: float | None = None
    whiten_rewards: bool = False
    gradient_checkpointing: bool = False
    is_encoder_decoder: bool | None = None
    is_peft_model: bool | None = None
    backward_batch_size: int | None = None
    global_backward_batch_size: int | None = None
    global_batch_size: int | None = None
    dataset_num_proc: int | None = None
    missing_eos_penalty: float | None = None
    # "last": the score on the last response token (TRL classic); "next": on the token after it, whose state also
    # keeps its value and gets value loss (TRL 0.29.1's experimental PPOTrainer; the same as "last" for full-length
    # responses). See lit_vhead.ppo.functional.extend_mask.
    score_token: str = "last"
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    # "auto" | true | false. Typed str, normalised by validate(): Hydra turns ppo.cpu_kernels=true into "True", and
    # HfArgumentParser (TRL's examples/scripts/ppo.py parses PPOConfig with it) cannot parse an Any-typed field.
    cpu_kernels: str = "auto"
    compile: bool = False
    optimizer_in_backward: bool = False
    undo_failed_update: bool = True
    undo_dir: str | None = None

    __signature__ = _InitSignature()

    def __new__(cls, *args: Any, **kwargs: Any) -> PPOConfig:
        """Refuse an unknown field by name, with the closest known one (a subclass's own fields count), before the
        dataclass's ``__init__`` would say only "unexpected keyword argument"."""
        names = [f.name for f in fields(cls)]
        unknown = [name for name in kwargs if name not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(names)}."
            raise TypeError(f"{cls.__name__} got an unknown field {unknown[0]!r}{hint}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if isinstance(self.generation, dict):
            self.generation = SamplingConfig(**self.generation)
        try:
            self.kl_penalty = KLPenalty(getattr(self.kl_penalty, "value", self.kl_penalty))
        except ValueError:
            raise ValueError(
                f"kl_penalty={self.kl_penalty!r} is not one of {[k.value for k in KLPenalty]}."
            ) from None
        if self.forward_batch_size is not None:  # TRL's deprecated alias, with TRL's behaviour
            warnings.warn("forward_batch_size is deprecated: it sets mini_batch_size (as in TRL).", stacklevel=3)
            self.mini_batch_size = self.forward_batch_size
        for name, why in IGNORED_FIELDS.items():
            if getattr(self, name) != _DEFAULTS[name] and name not in _warned:
                _warned.add(name)
                warnings.warn(f"PPOConfig.{name} is accepted for TRL compatibility and ignored: {why}.", stacklevel=3)
        self.validate()

    def validate(self) -> None:
        """Raise a clear error for inconsistent settings (called on construction; call again after editing)."""
        for name in ("steps", "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name}={getattr(self, name)} must be >= 1.")
        self.backward_batch_size = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % self.backward_batch_size:
            raise ValueError(
                f"ppo.batch_size={self.batch_size} is not divisible by ppo.mini_batch_size * "
                f"ppo.gradient_accumulation_steps = {self.mini_batch_size} * {self.gradient_accumulation_steps}; "
                f"pick a batch size that is a multiple of {self.backward_batch_size}."
            )
        if self.log_with not in (None, "wandb", "tensorboard", "csv"):
            raise ValueError(f"log_with={self.log_with!r} is not one of None, 'wandb', 'tensorboard', 'csv'.")
        generation = self.generation
        if generation.max_new_tokens < 1:
            raise ValueError(f"ppo.generation.max_new_tokens={generation.max_new_tokens} must be >= 1.")
        if generation.min_new_tokens > generation.max_new_tokens:
            raise ValueError(
                f"ppo.generation.min_new_tokens={generation.min_new_tokens} exceeds max_new_tokens="
                f"{generation.max_new_tokens}."
            )
        kernels = self.cpu_kernels
        if isinstance(kernels, str):
            kernels = {"auto": "auto", "true": True, "false": False}.get(kernels.lower(), kernels)
        if kernels != "auto" and not isinstance(kernels, bool):
            raise ValueError(f"ppo.cpu_kernels={self.cpu_kernels!r} must be auto, true or false.")
        self.cpu_kernels = kernels
        if self.score_token not in SCORE_TOKENS:
            raise ValueError(f"ppo.score_token={self.score_token!r} must be one of {list(SCORE_TOKENS)}.")
        if self.use_score_norm and not self.use_score_scaling:
            raise ValueError("ppo.use_score_norm=true needs ppo.use_score_scaling=true (as in TRL).")
        if self.undo_dir is not None and not os.path.isdir(self.undo_dir):
            raise ValueError(
                f"ppo.undo_dir={self.undo_dir!r} is not a directory: give an existing directory for the undo copy's "
                "temporary file, or null for the system's temp directory."
            )
        if self.undo_failed_update:
            directory = self.undo_dir or tempfile.gettempdir()
            try:
                open_undo_file(directory).close()
            except OSError as error:
                raise ValueError(
                    f"ppo.undo_failed_update=true keeps its undo copy in a temporary file in {directory!r}, which "
                    f"cannot hold one ({error.strerror or error}): point ppo.undo_dir at a writable directory, or set "
                    "ppo.undo_failed_update=false."
                ) from error
        if self.adap_kl_ctrl and (self.target <= 0 or self.horizon <= 0):
            raise ValueError(f"adap_kl_ctrl needs target > 0 and horizon > 0, got {self.target} and {self.horizon}.")

    def set_world_size(self, world_size: int) -> None:
        """Fill the runtime fields TRL fills when the trainer starts (``world_size``, ``global_*_batch_size``)."""
        self.world_size = world_size
        self.global_backward_batch_size = self.backward_batch_size * world_size
        self.global_batch_size = self.batch_size * world_size

    @property
    def total_ppo_epochs(self) -> int:
        """TRL's ``ceil(steps / batch_size)``, kept for scripts that read it."""
        return int(math.ceil(self.steps / self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{name: value}`` (nested settings as ``generation/max_new_tokens``), as TRL logs its config."""
        flat: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, dict) and key == "generation":
                flat.update({f"{key}/{k}": v for k, v in value.items()})
            else:
                flat[key] = value.value if isinstance(value, Enum) else value
        return flat


_FIELD_NAMES = tuple(f.name for f in fields(PPOConfig))
_DEFAULTS = {
    f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    for f in fields(PPOConfig)
}


def as_ppo_config(value: Any) -> PPOConfig:
    """A ``PPOConfig`` from a ``PPOConfig``, a dict, a DictConfig or None (TRL's defaults)."""
    if isinstance(value, PPOConfig):
        value.validate()
        return value
    if value is None:
        return PPOConfig()
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, DictConfig):  # resolved in place: `${seed}` refers to the root config
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return PPOConfig(**value)
    raise TypeError(f"ppo must be a PPOConfig, a dict or None, got {type(value).__name__}.")


def as_head_config(value: Any) -> HeadConfig:
    """A ``HeadConfig`` from a ``HeadConfig``, a dict, a DictConfig or None (the defaults)."""
    if isinstance(value, HeadConfig):
        return value
    if value is None:
        return HeadConfig()
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HeadConfig), value))
    raise TypeError(f"head must be a HeadConfig, a dict or None, got {type(value).__name__}.")
