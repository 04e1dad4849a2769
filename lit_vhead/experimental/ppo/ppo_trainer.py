"""``PPOTrainer`` of TRL 0.29.1's ``trl.experimental.ppo``, on Lightning and lit_vhead's PPO core.

Same constructor, ``train()``, ``save_model``, ``generate_completions``, ``state.log_history`` (TRL's metric names) and
``model.policy``/``model.value_model`` as TRL's. Underneath, a :class:`~lit_vhead.module.PPOModule` with a separate
critic (:class:`lit_vhead.critic.Critic` of the ``value_model``) runs under a ``lightning.Trainer``: rollouts, the
update of :mod:`lit_vhead.ppo` (``score_token="next"``: TRL 0.29.1's placement of the score, after the response), and
checkpoints. Given the same weights and rollout, one update equals TRL's to float rounding
(``tests/test_trl_ppov2_exact.py``). TRL 0.29.1's bugs that are not copied are listed in the README.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import TrainerState

from lit_vhead.critic import Critic
from lit_vhead.data import step_seed
from lit_vhead.experimental.ppo.ppo_config import PPOConfig
from lit_vhead.module import PPOModule
from lit_vhead.ppo.functional import masked_mean, masked_var, masked_whiten
from lit_vhead.reference import Reference, ReferenceConfig
from lit_vhead.rollout import Rollout, generate
from lit_vhead.sequence import gather_last, pad_sequences

__all__ = [
    "OnlineTrainerState",
    "PPOConfig",
    "PPOTrainer",
    "PolicyAndValueWrapper",
    "batch_generation",
    "masked_mean",
    "masked_var",
    "masked_whiten",
]

CHECKPOINT_FILE = "ppo.ckpt"  # the Lightning checkpoint inside each output_dir/checkpoint-<step>/


@dataclass
class OnlineTrainerState(TrainerState):
    """``transformers.TrainerState`` with TRL's ``episode`` counter (prompts trained on so far)."""

    episode: int = 0


class PolicyAndValueWrapper(nn.Module):
    """TRL's ``trainer.model``: the policy (``.policy``, the user's model, PEFT-wrapped if ``peft_config``) and the
    value model (``.value_model``) side by side."""

    def __init__(self, policy: nn.Module, value_model: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.config = getattr(policy, "config", None)


@torch.no_grad()
def batch_generation(model: nn.Module, queries: torch.Tensor, local_rollout_forward_batch_size: int,
                     pad_token_id: int, generation_config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's helper: sample for left-padded ``queries`` in chunks; returns ``(query_responses, logits)`` with the
    responses right-padded with ``pad_token_id`` to one width, and the (processed) scores of each generated position
    ``[B, T, V]`` (zeros where a chunk stopped earlier)."""
    context = queries.shape[1]
    sequences, scores = [], []
    for begin in range(0, queries.shape[0], local_rollout_forward_batch_size):
        query = queries[begin : begin + local_rollout_forward_batch_size]
        mask = query != pad_token_id
        out = model.generate(input_ids=query.masked_fill(~mask, 0), attention_mask=mask,
                             generation_config=generation_config, return_dict_in_generate=True, output_scores=True)
        sequences.append(out.sequences[:, context:])
        scores.append(torch.stack(out.scores, 1))
    width = max(s.shape[1] for s in sequences)
    responses = torch.cat([nn.functional.pad(s, (0, width - s.shape[1]), value=pad_token_id) for s in sequences])
    logits = torch.cat([nn.functional.pad(s, (0, 0, 0, width - s.shape[1])) for s in scores])
    return torch.cat([queries, responses], 1), logits


class StepBatches(Sampler[list[int]]):
    """The prompt indices of each PPO step: passes over the data set in a shuffled order (TRL's ``shuffle=True,
    drop_last=True`` loader, repeated), each pass's order drawn from ``(seed, pass, rank)``, so step ``s`` always gets
    the same prompts (an exact resume needs no loader state). Lightning calls ``set_epoch(step)`` before each step."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int, rank: int = 0) -> None:
        if num_prompts < batch_size:
            raise ValueError(
                f"train_dataset has {num_prompts} prompts, fewer than one rollout batch (local_batch_size = "
                f"per_device_train_batch_size * gradient_accumulation_steps = {batch_size}); lower the batch size."
            )
        self.num_prompts, self.batch_size, self.seed, self.rank = num_prompts, batch_size, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, step: int) -> list[int]:
        """The prompts of PPO step ``step``."""
        per_pass = self.num_prompts // self.batch_size
        passes, within = divmod(step, per_pass)
        generator = torch.Generator().manual_seed(step_seed(self.seed, passes, self.rank))
        order = torch.randperm(self.num_prompts, generator=generator)
        return order[within * self.batch_size : (within + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        yield self.indices(self.epoch)

    def __len__(self) -> int:
        return 1


class QueryCollator:
    """The user's collator (TRL's default: ``DataCollatorWithPadding``), its ``input_ids`` re-padded on the left into
    the ``query_ids``/``query_mask`` the PPO module takes (padding found by ``attention_mask``, else by the pad id)."""

    def __init__(self, collator: Callable, pad_token_id: int) -> None:
        self.collator, self.pad_token_id = collator, pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        missing = [i for i, row in enumerate(rows) if "input_ids" not in row]
        if missing:
            raise ValueError(
                f"train/eval dataset rows need an 'input_ids' column (tokenised prompts), as TRL's PPOTrainer; row "
                f"{missing[0]} has {sorted(rows[missing[0]])}."
            )
        batch = self.collator([{"input_ids": row["input_ids"]} for row in rows])
        ids = torch.as_tensor(batch["input_ids"])
        mask = torch.as_tensor(batch["attention_mask"]) if "attention_mask" in batch else ids != self.pad_token_id
        queries = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        if any(not q for q in queries):
            raise ValueError("A prompt in the data set is empty (no input_ids): every prompt needs a token.")
        ids, mask = pad_sequences(queries, self.pad_token_id, "left")
        return {"query_ids": ids, "query_mask": mask}


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


# TRL 0.29.1's logged metric <- the PPO core's statistic (means over the step's micro-batches, over the trained tokens)
TRL_METRICS = {
    "objective/kl": "objective/kl",
    "objective/entropy": "objective/entropy",
    "objective/scores": "ppo/mean_scores",
    "policy/approxkl_avg": "ppo/policy/approxkl",
    "policy/clipfrac_avg": "ppo/policy/clipfrac",
    "loss/policy_avg": "ppo/loss/policy",
    "loss/value_avg": "ppo/loss/value",
    "val/clipfrac_avg": "ppo/val/clipfrac",
    "policy/entropy_avg": "ppo/policy/entropy",
    "val/ratio": "ppo/policy/ratio_mean",
    "lr": "ppo/learning_rate",
}


def trl_metrics(stats: dict[str, Any], kl_coef: float) -> dict[str, float]:
    """TRL 0.29.1's metrics of one PPO step from the core's statistics (``objective/non_score_reward`` is
    ``-kl_coef * objective/kl`` summed per response, as TRL's)."""
    out = {name: float(stats[key]) for name, key in TRL_METRICS.items() if key in stats}
    out["objective/non_score_reward"] = -kl_coef * out["objective/kl"]
    out["objective/rlhf_reward"] = out["objective/non_score_reward"] + out["objective/scores"]
    return out


class PPOTrainer:
    """TRL 0.29.1's ``trl.experimental.ppo.PPOTrainer``, same signature, trained by lit_vhead on Lightning.

    ``model`` is the policy (a transformers causal LM, or a PEFT model), ``value_model`` the critic (a transformers
    backbone with a one-label ``score`` head, e.g. ``AutoModelForSequenceClassification(num_labels=1)``),
    ``reward_model`` a sequence classifier read at each response's last token; ``ref_model`` None makes a frozen copy
    of the policy (with ``peft_config``: the policy with its adapters disabled). ``train_dataset`` rows hold tokenised
    prompts (``input_ids``); ``data_collator`` defaults to ``DataCollatorWithPadding``. ``optimizers`` defaults to
    ``TrainingArguments``' optimizer (AdamW) over the policy and the value model and its scheduler over
    ``num_total_batches`` PPO steps; ``callbacks`` are ``transformers.TrainerCallback``s, called as TRL calls them.
    """

    def __init__(
        self,
        args: PPOConfig,
        processing_class: Any,
        model: nn.Module,
        ref_model: nn.Module | None,
        reward_model: nn.Module,
        train_dataset: Any,
        value_model: nn.Module,
        data_collator: Callable | None = None,
        eval_dataset: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        callbacks: list | None = None,
        peft_config: Any = None,
    ) -> None:
        from transformers import DataCollatorWithPadding
        from transformers.integrations import get_reporting_integration_callbacks
        from transformers.trainer import DEFAULT_CALLBACKS, DEFAULT_PROGRESS_CALLBACK
        from transformers.trainer_callback import CallbackHandler, PrinterCallback, TrainerControl

        from lit_vhead.builders import check_tokenizer

        if ref_model is model:
            raise ValueError(
                "`model` and `ref_model` cannot be the same object. If you want `ref_model` to be the same as `model`, "
                "you must make a copy of it, or `None` if you use peft."
            )
        if not isinstance(args, PPOConfig):
            raise TypeError(
                f"args must be lit_vhead.experimental.ppo.PPOConfig, got {type(args).__module__}."
                f"{type(args).__name__}; import PPOConfig from lit_vhead.experimental.ppo too."
            )
        check_tokenizer(processing_class)
        for name, scorer in (("reward_model", reward_model), ("value_model", value_model)):
            if not isinstance(scorer, nn.Module):
                raise TypeError(
                    f"{name} must be a transformers model with a one-output head, e.g. AutoModelForSequence"
                    f"Classification.from_pretrained(path, num_labels=1); got {type(scorer).__name__}."
                )
        _check_dataset(train_dataset, "train_dataset")
        if eval_dataset is not None:
            _check_dataset(eval_dataset, "eval_dataset")
        if peft_config is not None:
            from peft import PeftModel

            if isinstance(model, PeftModel):
                raise ValueError(
                    "You passed a `PeftModel` instance together with a `peft_config` to the trainer. Please first "
                    "merge and unload the existing adapter, save the resulting base model, and then pass that base "
                    "model along with the new `peft_config` to the trainer."
                )
        self.args = args
        self.processing_class = processing_class
        self.policy_model = model
        self.reward_model = reward_model
        self.value_model = value_model
        self.train_dataset = train_dataset
        self.train_dataset_len = len(train_dataset)
        self.eval_dataset = eval_dataset
        self.optimizer, self.lr_scheduler = optimizers
        args.derive(world_size=1, dataset_len=self.train_dataset_len)
        ppo = args.to_ppo(processing_class.eos_token_id)
        if args.num_sample_generations > 0:
            self.sample_generations_freq = max(1, args.num_total_batches // args.num_sample_generations)

        ref = None
        if ref_model is None and (peft_config is not None or _is_peft(model)):
            ref = ReferenceConfig(mode="peft", adapter_name=args.ref_adapter_name)
        self.module = ExperimentalPPOModule(
            model, processing_class, ppo=ppo, peft=peft_config, ref=ref, sample_table_every=0,
            critic=value_model, reward_model=reward_model, ref_model=ref_model,
            make_optimizer=self._make_optimizer,
        )
        self.model = PolicyAndValueWrapper(self.module.policy.pretrained_model, self.module.critic.model)
        self.is_peft_model = _is_peft(self.model.policy)
        self.ref_model = ref_model

        collator = QueryCollator(data_collator or DataCollatorWithPadding(processing_class),
                                 processing_class.pad_token_id)
        self.data_collator = collator
        self.dataloader = DataLoader(
            train_dataset, batch_sampler=StepBatches(self.train_dataset_len, args.local_batch_size, args.seed),
            collate_fn=collator,
        )
        self.eval_dataloader = None if eval_dataset is None else DataLoader(
            eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collator, drop_last=True
        )

        reporting = get_reporting_integration_callbacks(args.report_to)
        self.callback_handler = CallbackHandler(
            DEFAULT_CALLBACKS + reporting + list(callbacks or []), self.model, processing_class, self.optimizer,
            self.lr_scheduler,
        )
        self.callback_handler.add_callback(PrinterCallback if args.disable_tqdm else DEFAULT_PROGRESS_CALLBACK)
        self.control = TrainerControl()
        self.state = OnlineTrainerState(is_local_process_zero=True, is_world_process_zero=True)
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)

    # ------------------------------------------------------------------ TRL's Trainer surface
    def add_callback(self, callback: Any) -> None:
        self.callback_handler.add_callback(callback)

    def remove_callback(self, callback: Any) -> None:
        self.callback_handler.remove_callback(callback)

    def get_train_dataloader(self) -> DataLoader:
        return self.dataloader

    def get_eval_dataloader(self) -> DataLoader | None:
        return self.eval_dataloader

    def is_world_process_zero(self) -> bool:
        return True

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "PPOTrainer.push_to_hub is not implemented by lit_vhead: save_model(dir), then upload the dir with "
            "huggingface_hub's upload_folder."
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record ``logs`` in ``state.log_history`` and hand them to the callbacks (TRL's ``Trainer.log``)."""
        if self.state.epoch is not None:
            logs = {**logs, "epoch": self.state.epoch}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    # ------------------------------------------------------------------ training
    def _make_optimizer(self, module: ExperimentalPPOModule) -> Any:
        """The user's ``optimizers``, else TRL's: ``TrainingArguments``' optimizer over the trainable weights of the
        policy and the value model (no weight decay on biases and norms) and its scheduler over the PPO steps."""
        from transformers import Trainer, get_scheduler

        if self.optimizer is None:
            named = [(n, p) for n, p in module.policy.pretrained_model.named_parameters() if p.requires_grad]
            named += [(n, p) for n, p in module.critic.named_parameters() if p.requires_grad]
            no_decay = {id(p) for n, p in named if n.endswith("bias") or "norm" in n.lower() or "ln_" in n}
            groups = [
                {"params": [p for _, p in named if id(p) not in no_decay], "weight_decay": self.args.weight_decay},
                {"params": [p for _, p in named if id(p) in no_decay], "weight_decay": 0.0},
            ]
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
            if self.args.max_grad_norm and (self.args.bf16 or self.args.fp16):
                kwargs.pop("fused", None)  # Lightning clips under mixed precision only with a non-fused optimizer
            self.optimizer = cls([g for g in groups if g["params"]], **kwargs)
        if self.lr_scheduler is None:
            steps = self.args.num_total_batches
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type, self.optimizer, num_warmup_steps=self.args.get_warmup_steps(steps),
                num_training_steps=steps, scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or {},
            )
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler
        return {"optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler}

    def train(self, resume_from_checkpoint: str | bool | None = None) -> None:
        """Train for ``args.num_total_batches`` PPO steps; ``resume_from_checkpoint`` (True: the latest
        ``output_dir/checkpoint-*``; or a checkpoint dir) continues a run exactly where that checkpoint stopped:
        weights of the policy and the value model, optimizer, scheduler, KL and score state, random generators."""
        from lit_vhead.checkpoint_io import AtomicCheckpointIO

        args = self.args
        ckpt_path = self._checkpoint_to_resume(resume_from_checkpoint)
        self.state.max_steps = args.num_total_batches
        self.state.num_train_epochs = args.total_episodes / self.train_dataset_len
        self.state.logging_steps = _absolute(args.logging_steps, args.num_total_batches)
        self.state.save_steps = _absolute(args.save_steps, args.num_total_batches)
        if args.eval_steps is not None:
            self.state.eval_steps = _absolute(args.eval_steps, args.num_total_batches)
        trainer = L.Trainer(
            accelerator="cpu" if args.use_cpu or not torch.cuda.is_available() else "gpu",
            devices=1,
            precision="bf16-mixed" if args.bf16 else "16-mixed" if args.fp16 else "32-true",
            max_epochs=args.num_total_batches,
            logger=False,
            callbacks=[_TRLLoop(self)],
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            default_root_dir=args.output_dir,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            plugins=[AtomicCheckpointIO()],
        )
        self.lightning_trainer = trainer
        np.random.seed(args.seed)  # minibatch orders (TRL draws them from numpy's unseeded global generator)
        trainer.fit(self.module, train_dataloaders=self.dataloader, ckpt_path=ckpt_path)

    def _checkpoint_to_resume(self, resume: str | bool | None) -> str | None:
        """The Lightning checkpoint file to resume from (state restored from its ``trainer_state.json``), or None."""
        from transformers.trainer_utils import get_last_checkpoint

        if resume is None or resume is False:
            return None
        if resume is True:
            found = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if found is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but output_dir {self.args.output_dir!r} holds no checkpoint-<step> "
                    "dir; pass a checkpoint dir, or train from scratch (resume_from_checkpoint=None)."
                )
            resume = found
        path = os.fspath(resume)
        ckpt = os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path
        state = os.path.join(os.path.dirname(ckpt), "trainer_state.json")
        if not (os.path.isfile(ckpt) and os.path.isfile(state)):
            raise ValueError(
                f"resume_from_checkpoint={resume!r} is not a checkpoint of this trainer: it needs {CHECKPOINT_FILE} "
                "and trainer_state.json (written in output_dir/checkpoint-<step>/ every save_steps PPO steps)."
            )
        saved = OnlineTrainerState.load_from_json(state)
        self.state.log_history, self.state.episode, self.state.global_step = (
            saved.log_history, saved.episode, saved.global_step)
        return ckpt

    def _save_checkpoint(self) -> str:
        """``output_dir/checkpoint-<step>/``: the Lightning checkpoint (written atomically), ``trainer_state.json``."""
        from lit_vhead.atomic import atomic_file

        path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        os.makedirs(path, exist_ok=True)
        self.lightning_trainer.save_checkpoint(os.path.join(path, CHECKPOINT_FILE))
        with atomic_file(os.path.join(path, "trainer_state.json")) as f:
            f.write(self.state_json().encode())
        self._rotate_checkpoints()
        return path

    def _rotate_checkpoints(self) -> None:
        """Keep the newest ``save_total_limit`` checkpoint dirs (all when it is None), as transformers' Trainer."""
        import shutil

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        limit = self.args.save_total_limit
        if not limit or limit < 1:
            return
        prefix = f"{PREFIX_CHECKPOINT_DIR}-"
        steps = sorted(int(name[len(prefix):]) for name in os.listdir(self.args.output_dir)
                       if name.startswith(prefix) and name[len(prefix):].isdigit())
        for step in steps[:-limit]:
            shutil.rmtree(os.path.join(self.args.output_dir, f"{prefix}{step}"), ignore_errors=True)

    def state_json(self) -> str:
        return json.dumps({k: v for k, v in vars(self.state).items() if k != "stateful_callbacks"}, indent=2,
                          sort_keys=True) + "\n"

    # ------------------------------------------------------------------ saving and samples
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the policy (``save_pretrained``: the plain transformers model, or its adapters) and the tokenizer in
        ``output_dir`` (default ``args.output_dir``), and the value model in ``output_dir/critic``: each written
        atomically, each reloadable with ``from_pretrained``."""
        from lit_vhead.atomic import atomic_directory

        output_dir = output_dir or self.args.output_dir
        with atomic_directory(output_dir) as tmp:
            self.model.policy.save_pretrained(tmp)
            self.processing_class.save_pretrained(tmp)
            with open(os.path.join(tmp, "training_args.json"), "w") as f:
                f.write(self.args.to_json_string())
        self.module.critic.save_pretrained(os.path.join(output_dir, "critic"))

    @torch.no_grad()
    def generate_completions(self, sampling: bool = False) -> Any:
        """Greedy-like completions (temperature 0.01) of the eval set with their scores, as TRL's: printed as a table
        (with ``rich``), logged to wandb when it reports there; ``sampling=True`` takes the first batch only. Returns
        the table (a pandas ``DataFrame``), or None without an eval set."""
        import pandas as pd

        if self.eval_dataloader is None:
            return None
        module, tokenizer = self.module, self.processing_class
        settings = type(module.ppo.generation)(
            max_new_tokens=self.args.response_length, do_sample=True, temperature=0.01 + 1e-7, top_k=0, top_p=1.0,
            stop_at_eos=module.ppo.generation.stop_at_eos,
        )
        device = next(module.policy.parameters()).device
        module.reward_model.to(device)
        was_training = module.policy.training
        module.policy.eval()
        table: dict[str, list] = {"query": [], "model response": [], "score": []}
        for batch in self.eval_dataloader:
            batch = {k: v.to(device) for k, v in batch.items()}
            rollout = generate(module.policy, batch, settings, tokenizer)
            table["query"] += tokenizer.batch_decode(
                [q[m.bool()] for q, m in zip(rollout.query_ids, rollout.query_mask)], skip_special_tokens=True)
            table["model response"] += tokenizer.batch_decode(
                [r[m.bool()] for r, m in zip(rollout.response_ids, rollout.response_mask)])
            table["score"] += module.score_rollout(rollout).cpu().tolist()
            if sampling:
                break
        module.policy.train(was_training)
        df = pd.DataFrame(table)
        _show(df, self.args.report_to)
        return df


class _TRLLoop(L.Callback):
    """TRL's per-update bookkeeping around each PPO step: ``state`` (episodes, steps), TRL's metrics in
    ``log_history`` and the callbacks, checkpoints when the callbacks ask (``save_strategy``/``save_steps``), sample
    completions every ``num_total_batches // num_sample_generations`` steps."""

    def __init__(self, owner: PPOTrainer) -> None:
        self.owner = owner

    def on_train_start(self, trainer: L.Trainer, pl_module: ExperimentalPPOModule) -> None:
        o = self.owner
        self.start = time.time()
        o.control = o.callback_handler.on_train_begin(o.args, o.state, o.control)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ExperimentalPPOModule) -> None:
        o, args = self.owner, self.owner.args
        o.state.episode += args.batch_size
        o.state.global_step += 1
        o.state.epoch = o.state.episode / o.train_dataset_len
        stats = {k: v.item() if torch.is_tensor(v) else v for k, v in trainer.callback_metrics.items()}
        metrics = {"eps": int(o.state.episode / max(time.time() - self.start, 1e-9))}
        metrics.update(trl_metrics(stats, args.kl_coef))
        rollout = pl_module.last_rollout
        eos = o.processing_class.eos_token_id
        metrics["val/num_eos_tokens"] = int(((rollout.response_ids == eos) & rollout.response_mask.bool()).sum())
        metrics["episode"] = o.state.episode
        o.log(metrics)
        o.control = o.callback_handler.on_step_end(args, o.state, o.control)
        if o.control.should_save:
            o._save_checkpoint()
            o.control = o.callback_handler.on_save(args, o.state, o.control)
        if o.control.should_training_stop:
            trainer.should_stop = True
        update = o.state.global_step
        if args.num_sample_generations > 0 and (update - 1) % o.sample_generations_freq == 0:
            o.generate_completions(sampling=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: ExperimentalPPOModule) -> None:
        o = self.owner
        o.control = o.callback_handler.on_train_end(o.args, o.state, o.control)
        if o.control.should_save:
            o._save_checkpoint()
            o.control = o.callback_handler.on_save(o.args, o.state, o.control)


def _absolute(value: float | None, total: int) -> int | None:
    """``logging_steps``/``save_steps``: a float below 1 is a fraction of the run, as in TRL."""
    if value is None:
        return None
    return math.ceil(total * value) if value < 1 else int(value)


def _show(df: Any, report_to: Sequence[str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        table = Table(show_lines=True)
        for column in df.columns:
            table.add_column(column)
        for _, row in df.iloc[:5].iterrows():
            table.add_row(*row.astype(str).tolist())
        Console().print(table)
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.log({"completions": wandb.Table(dataframe=df)})


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _check_dataset(dataset: Any, name: str) -> None:
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
        raise ValueError(f"{name} must be a non-empty data set of tokenised prompts (rows with 'input_ids').")
    row = dataset[0]
    if not isinstance(row, dict) or "input_ids" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(
            f"{name} rows need an 'input_ids' column (tokenised prompts, as TRL's PPOTrainer); the first row has "
            f"{keys}. Tokenise it first, e.g. dataset.map(lambda x: tokenizer(x['prompt']), remove_columns=...)."
        )
