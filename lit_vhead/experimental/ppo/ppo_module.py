"""``PPOModule`` as TRL 0.29.1's experimental ``PPOTrainer`` runs PPO (the update itself is the shared core's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lit_vhead.critic import Critic
from lit_vhead.generation import sampling_kwargs
from lit_vhead.module import PPOModule
from lit_vhead.reference import Reference
from lit_vhead.rollout import Rollout
from lit_vhead.sequence import gather_last


class ExperimentalPPOModule(PPOModule):
    """``PPOModule`` as TRL 0.29.1's experimental trainer runs PPO: scores from a reward model on the token ids,
    minibatch orders from numpy's global generator (``np.random.permutation``, seeded with ``args.seed`` when
    training starts and kept in checkpoints), a reference model the user passed, TRL's optimizer and scheduler."""

    def __init__(self, *args: Any, reward_model: nn.Module, ref_model: nn.Module | None,
                 make_optimizer: Callable[[ExperimentalPPOModule], Any], **kwargs: Any) -> None:
        super().__init__(*args, reward=None, **kwargs)
        # Not submodules: never trained, never in checkpoints. The reward reads its model as the critic reads the value
        # model (backbone + one-output head at every position), at each sequence's last real token.
        self.__dict__["reward_model"] = reward_model
        self.__dict__["reward_scorer"] = Critic(reward_model)
        self.__dict__["user_ref"] = ref_model
        self.make_optimizer = make_optimizer
        self.last_rollout: Rollout | None = None

    def configure_model(self) -> None:
        if self.reference is None and self.user_ref is not None:
            from lit_vhead.builders import wrap_policy

            self.__dict__["reference"] = Reference.from_model(wrap_policy(self.user_ref))
            if self.ppo.gradient_checkpointing:
                self.policy.gradient_checkpointing_enable()
            self.policy.train()
        super().configure_model()

    def configure_optimizers(self) -> Any:
        return self.make_optimizer(self)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.reward_model.to(self.device).eval()

    def sample_order(self, step: int) -> Callable[[int], Any]:
        return np.random.permutation

    def sample(self, batch: dict[str, torch.Tensor], settings: Any) -> Rollout:
        """One response per prompt of ``batch`` (any size) with ``settings`` (a ``SamplingConfig``), through the
        module's generation backend: ``generate_completions``' samples."""
        sampling = sampling_kwargs(settings, self.tokenizer)
        return self.generation.generate(self.policy, batch["query_ids"], batch["query_mask"],
                                        sampling["eos_token_id"], **sampling)

    def score_rollout(self, rollout: Rollout) -> torch.Tensor:
        """The reward model's score of prompt + response (cut after its EOS), read at the response's last token."""
        self.last_rollout = rollout
        input_ids, attention_mask = rollout.full_sequence()
        with torch.no_grad():
            return gather_last(self.reward_scorer.values(input_ids, attention_mask), attention_mask)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["numpy_rng"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                                   "has_gauss": has_gauss, "gauss": gauss}  # tensors: loadable with weights_only

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["numpy_rng"]
        np.random.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                             state["gauss"]))
