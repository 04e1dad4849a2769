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
import os
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from lit_vhead.experimental.ppo.data import QueryCollator, StepBatches, check_dataset
from lit_vhead.experimental.ppo.generation import batch_generation
from lit_vhead.experimental.ppo.ppo_config import PPOConfig
from lit_vhead.experimental.ppo.ppo_module import ExperimentalPPOModule
from lit_vhead.experimental.ppo.trl_loop import OnlineTrainerState, TRLLoop, absolute_steps, show_completions
from lit_vhead.ppo.functional import masked_mean, masked_var, masked_whiten
from lit_vhead.reference import ReferenceConfig

__all__ = [  # TRL's names here (its tests import the masked_* helpers and batch_generation from this module)
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


class PolicyAndValueWrapper(nn.Module):
    """TRL's ``trainer.model``: the policy (``.policy``, the user's model, PEFT-wrapped if ``peft_config``) and the
    value model (``.value_model``) side by side."""

    def __init__(self, policy: nn.Module, value_model: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.config = getattr(policy, "config", None)


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
        check_dataset(train_dataset, "train_dataset")
        if eval_dataset is not None:
            check_dataset(eval_dataset, "eval_dataset")
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
        self.state.logging_steps = absolute_steps(args.logging_steps, args.num_total_batches)
        self.state.save_steps = absolute_steps(args.save_steps, args.num_total_batches)
        if args.eval_steps is not None:
            self.state.eval_steps = absolute_steps(args.eval_steps, args.num_total_batches)
        trainer = L.Trainer(
            accelerator="cpu" if args.use_cpu or not torch.cuda.is_available() else "gpu",
            devices=1,
            precision="bf16-mixed" if args.bf16 else "16-mixed" if args.fp16 else "32-true",
            max_epochs=args.num_total_batches,
            logger=False,
            callbacks=[TRLLoop(self)],
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
            rollout = module.sample(batch, settings)
            table["query"] += tokenizer.batch_decode(
                [q[m.bool()] for q, m in zip(rollout.query_ids, rollout.query_mask)], skip_special_tokens=True)
            table["model response"] += tokenizer.batch_decode(
                [r[m.bool()] for r, m in zip(rollout.response_ids, rollout.response_mask)])
            table["score"] += module.score_rollout(rollout).cpu().tolist()
            if sampling:
                break
        module.policy.train(was_training)
        df = pd.DataFrame(table)
        show_completions(df, self.args.report_to)
        return df


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
