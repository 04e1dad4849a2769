"""Reward sources, chosen by the ``reward`` config group: a Python function, a reward model, or a reward adapter.

Each source maps a batch of rollouts (``RewardInputs``) to one score per sample. Scores are checked: a wrong shape,
NaN or inf raises a ``RewardError`` naming the source.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lit_vhead.rollout import Rollout


class RewardError(ValueError):
    """A reward source returned something PPO cannot use."""


@dataclass
class RewardInputs:
    """One rollout batch as text and token ids. ``input_ids``/``attention_mask`` hold prompt + response."""

    prompts: list[str]
    responses: list[str]
    query_ids: list[list[int]]
    response_ids: list[list[int]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def check_scores(scores: object, batch_size: int, source: str) -> torch.Tensor:
    """Scores as a float tensor [B]; a clear error for anything else."""
    try:
        scores = torch.as_tensor(scores, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RewardError(f"Reward source {source} returned {type(scores).__name__}, not numbers: {err}") from err
    if scores.dim() == 2 and scores.shape[-1] == 1:
        scores = scores.squeeze(-1)
    if scores.shape != (batch_size,):
        raise RewardError(
            f"Reward source {source} returned shape {tuple(scores.shape)}; it must return one score per sample, "
            f"shape ({batch_size},)."
        )
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        raise RewardError(f"Reward source {source} returned NaN or inf scores at samples {bad}.")
    return scores


def check_reward_targets(node: Any, key: str = "reward") -> None:
    """Every ``_target_`` under the ``reward`` config imports, or one ``RewardError`` line naming the target, the
    import error and where the module must be (Hydra would say only "Error locating target")."""
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_")
    if isinstance(target, str):
        from hydra.utils import get_object

        try:
            get_object(target)
        except Exception as err:
            cause = err.__cause__ or err
            raise RewardError(
                f"{key}._target_={target!r} cannot be imported ({type(cause).__name__}: {cause}). Its module must be "
                "importable: a .py file in the directory you run python train.py from, or a package on PYTHONPATH."
            ) from None
    for name, child in node.items_ex(resolve=False):
        check_reward_targets(child, f"{key}.{name}")


class RewardSource:
    """Base class: ``setup`` once the policy is on its device, then call on each rollout batch."""

    name = "reward"

    def setup(self, policy: torch.nn.Module, tokenizer, device: torch.device) -> None:
        """Load what the source needs (models go to ``device``)."""

    def compute(self, inputs: RewardInputs) -> object:
        raise NotImplementedError

    def probe(self, prompts: list[str], query_ids: list[list[int]]) -> None:
        """Check the output shape on a dry run (prompts as stand-in responses) before any model is built."""

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        try:
            scores = self.compute(inputs)
        except RewardError:
            raise
        except Exception as err:
            raise RewardError(f"Reward source {self.name} raised {type(err).__name__}: {err}") from err
        return check_scores(scores, len(inputs.prompts), self.name)


class FunctionReward(RewardSource):
    """Any function ``fn(prompts, responses, **kw) -> scores`` (a list or tensor of B floats).

    The keyword arguments ``query_ids`` and ``response_ids`` (token-id lists) are passed when ``fn`` accepts them
    (by name or through ``**kwargs``).
    """

    def __init__(self, fn: Callable, scale: float = 1.0) -> None:
        if not callable(fn):
            raise TypeError(f"reward must be callable, got {type(fn).__name__}: {fn!r}.")
        self.fn, self.scale = fn, scale
        inner = getattr(fn, "func", fn)  # a functools.partial from `_partial_: true`
        self.name = f"function {getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', repr(inner))}"
        self.extra_names = _accepted_keywords(fn, ("query_ids", "response_ids"))

    def compute(self, inputs: RewardInputs) -> object:
        extra = {name: getattr(inputs, name) for name in self.extra_names}
        scores = self.fn(inputs.prompts, inputs.responses, **extra)
        return check_scores(scores, len(inputs.prompts), self.name) * self.scale

    def probe(self, prompts: list[str], query_ids: list[list[int]]) -> None:
        self(dry_run_inputs(prompts, query_ids))


def dry_run_inputs(prompts: list[str], query_ids: list[list[int]]) -> RewardInputs:
    """Stand-in rollouts for a reward probe: the prompts as responses."""
    ids = torch.zeros(len(prompts), 1, dtype=torch.long)
    return RewardInputs(prompts, list(prompts), query_ids, query_ids, ids, torch.ones_like(ids))


def _accepted_keywords(fn: Callable, names: Sequence[str]) -> tuple[str, ...]:
    """Those of ``names`` that ``fn`` accepts as keyword arguments."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing extra
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return tuple(names)
    return tuple(name for name in names if name in parameters)


def even_token_fraction(
    prompts: Sequence[str], responses: Sequence[str], query_ids: Sequence, response_ids: Sequence[Sequence[int]]
) -> list[float]:
    """Fraction of even token ids in each response: a task a tiny random model learns within minutes."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in response_ids]


def character_fraction(
    prompts: Sequence[str],
    responses: Sequence[str],
    query_ids: Sequence,
    response_ids: Sequence,
    characters: str = "aeiou ",
) -> list[float]:
    """Fraction of response characters in ``characters`` (bind it with ``_partial_``)."""
    return [sum(c in characters for c in text) / max(len(text), 1) for text in responses]


class RewardModel(RewardSource):
    """A sequence-classification model scoring prompt + response text: a checkpoint (a local dir or the HF cache,
    ``name_or_path``) or a model object (``model``) with its ``tokenizer``.

    ``label_index`` picks the logit used as the score (e.g. the POSITIVE class of a sentiment classifier).
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        label_index: int = 0,
        batch_size: int = 16,
        max_length: int = 512,
        tokenizer: Any = None,
        model: Any = None,
    ) -> None:
        from lit_vhead.builders import check_model_source

        if (name_or_path is None) == (model is None):
            raise ValueError("RewardModel needs exactly one of name_or_path (a checkpoint) and model (an object).")
        if model is not None:
            from transformers import PreTrainedModel, PreTrainedTokenizerBase

            if not isinstance(model, PreTrainedModel):
                raise TypeError(f"reward model must be a transformers model, got {type(model).__name__}.")
            if not isinstance(tokenizer, PreTrainedTokenizerBase):
                raise TypeError(
                    f"a reward model object needs its tokenizer object: reward=(model, tokenizer); got "
                    f"{type(tokenizer).__name__}."
                )
            self.name = f"reward model {type(model).__name__}"
        else:
            check_model_source({"name_or_path": name_or_path}, key="reward.name_or_path")
            self.name = f"reward model {name_or_path!r}"
        self.name_or_path, self.label_index, self.batch_size, self.max_length = (
            name_or_path, label_index, batch_size, max_length,
        )
        self.model, self.tokenizer = model, tokenizer

    def setup(self, policy: torch.nn.Module, tokenizer, device: torch.device) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self.model is None:
            self.model = AutoModelForSequenceClassification.from_pretrained(self.name_or_path)
        if self.tokenizer is None or isinstance(self.tokenizer, str):
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer or self.name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # GPT-2-style classifiers cannot score a padded batch without it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval().requires_grad_(False)
        num_labels = self.model.config.num_labels
        if not 0 <= self.label_index < num_labels:
            raise ValueError(
                f"reward.label_index={self.label_index} is out of range for {self.name}, which has "
                f"{num_labels} labels ({self.model.config.id2label})."
            )
        self.model.to(device)

    def probe(self, prompts: list[str], query_ids: list[list[int]]) -> None:
        """A model object is at hand: a dry run (where it is) catches a wrong model or label before any rollout."""
        if self.model is not None:
            self.setup(None, None, self.model.device)
            self(dry_run_inputs(prompts, query_ids))

    @torch.no_grad()
    def compute(self, inputs: RewardInputs) -> torch.Tensor:
        """Scores of prompt + response texts, right-padded whatever the tokenizer's ``padding_side``: each text then
        keeps the positions it has alone, so a sample scores the same alone or in any batch (also for causal reward
        models with absolute positions, e.g. GPT-2, whose tokenizers are often set to pad on the left)."""
        texts = [p + r for p, r in zip(inputs.prompts, inputs.responses)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                padding_side="right",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.model.device)
            scores.append(self.model(**enc).logits[:, self.label_index].float().cpu())
        return torch.cat(scores)


class RewardAdapter(RewardSource):
    """A reward LoRA on the policy's own base model (TRL's ``reward_adapter`` + ``compute_reward_score``).

    The policy is built with this adapter loaded (``adapter_path``), so no second model is held in memory. Scores are
    read at each sample's last real token, with ``position_ids`` counted from the attention mask: a sample scores the
    same alone, right-padded or left-padded in any PPO batch, as the adapter scored in training.
    """

    def __init__(self, adapter_path: str, label_index: int = 0) -> None:
        if not os.path.exists(os.path.join(adapter_path, "adapter_config.json")):
            raise FileNotFoundError(
                f"reward.adapter_path={adapter_path!r} has no adapter_config.json; point it at a saved "
                "sequence-classification LoRA adapter."
            )
        self.adapter_path, self.label_index = adapter_path, label_index
        self.name = f"reward adapter {adapter_path!r}"
        self.policy = None

    def setup(self, policy: torch.nn.Module, tokenizer, device: torch.device) -> None:
        if not getattr(policy, "supports_rm_adapter", False):
            raise ValueError("reward=adapter needs the policy built with the reward adapter (peft must be enabled).")
        self.policy = policy

    def compute(self, inputs: RewardInputs) -> torch.Tensor:
        from lit_vhead.sequence import gather_last, position_ids_from_mask

        mask = inputs.attention_mask
        extra = {}
        if not self.policy.config.is_encoder_decoder:
            extra["position_ids"] = position_ids_from_mask(mask)
        scores = self.policy.compute_reward_score(inputs.input_ids, mask, **extra)
        return gather_last(scores[..., self.label_index], mask).float().cpu()


def as_reward_source(reward: Any) -> RewardSource:
    """A ``RewardSource`` from what a user passes: a source, a function, or a (classifier, tokenizer) pair."""
    if isinstance(reward, RewardSource):
        return reward
    if isinstance(reward, (tuple, list)) and len(reward) == 2:
        return RewardModel(model=reward[0], tokenizer=reward[1])
    from transformers import PreTrainedModel

    if isinstance(reward, PreTrainedModel):
        raise TypeError(
            f"reward is a {type(reward).__name__} without its tokenizer: pass reward=(model, tokenizer), or "
            "RewardModel(model=model, tokenizer=tokenizer)."
        )
    if callable(reward):
        return FunctionReward(reward)
    raise TypeError(
        "reward must be a function fn(prompts, responses, **kw) -> one float per sample, a (sequence-"
        f"classification model, tokenizer) pair, or a lit_vhead.rewards.RewardSource; got {type(reward).__name__}."
    )


def reward_inputs(rollout: Rollout, tokenizer: Any) -> RewardInputs:
    """The rollout as text and token ids, as reward sources take it."""
    query_ids = [q[m.bool()].tolist() for q, m in zip(rollout.query_ids, rollout.query_mask)]
    response_ids = [r[m.bool()].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask)]
    input_ids, attention_mask = rollout.full_sequence()
    return RewardInputs(
        prompts=tokenizer.batch_decode(query_ids, skip_special_tokens=True),
        responses=tokenizer.batch_decode(response_ids, skip_special_tokens=True),
        query_ids=query_ids,
        response_ids=response_ids,
        input_ids=input_ids,
        attention_mask=attention_mask,
    )
