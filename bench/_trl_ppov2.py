"""TRL 0.29.1's experimental ``PPOTrainer`` (``trl.experimental.ppo``: a separate value model) on the workload of
``bench/ppo_step.py``, one PPO step (= one of TRL's "updates") at a time, in the step-gate protocol of
``bench/_trl_classic_ppo.py``: ``BENCH_READY``, then per step ``go`` on stdin -> ``BENCH_STEP {json}``, and a final
``BENCH_RESULT {json}`` with the peak RSS. The dev venv has trl==0.29.1, so it runs under this repository's python::

    yes go | OMP_NUM_THREADS=1 TRL_EXPERIMENTAL_SILENCE=1 python bench/_trl_ppov2.py --preset workload
    yes go | TRL_EXPERIMENTAL_SILENCE=1 python bench/_trl_ppov2.py --preset gpt2-small

The same work as the other sides, as far as TRL's API allows:

- policy: random-init GPT-2 of the preset's config; reference: TRL's own copy (``ref_model=None``); value model: a
  random-init ``GPT2ForSequenceClassification(num_labels=1)`` of the same config (TRL's critic is a second backbone);
- reward: ``EvenFractionReward``, the fraction of even response ids, as the model-shaped module TRL requires
  (``base_model_prefix`` backbone + ``score``; no parameters);
- queries: the ``make_queries`` rows of all steps as TRL's ``train_dataset`` (TRL's loader shuffles them, so a step's
  rows are other steps' rows of the same shape); exactly ``response_length`` sampled tokens (no stop token,
  ``temperature=1.0``, TRL's ``top_k=0, top_p=1``); the pad id is one past the vocabulary, so no sampled id is taken for
  padding (TRL ends a response at the first pad id it meets);
- ``per_device_train_batch_size`` = batch, ``num_mini_batches`` = batch / mini-batch, one accumulation step (TRL's
  micro-batch = its mini-batch, so the optimizer steps once per mini-batch: 16 steps per PPO step on the workload),
  AdamW (TRL's ``adamw_torch_fused``, weight decay 0) at the preset's constant learning rate, fp32 (``bf16=False``; on
  CPU TRL's default ``bf16=True`` is refused by ``TrainingArguments``), no gradient checkpointing, dropout off (TRL
  does it), ``local_rollout_forward_batch_size`` TRL's default (64: one generate and one forward per model over the
  batch).

``wall`` runs from ``go`` to TRL's ``on_step_end`` callback (data, generation, rollout forwards, GAE, the PPO epochs,
TRL's metrics; TRL's ``gc.collect()`` after a step lands in the next one). ``generation`` is the time inside the
policy's ``generate``; ``scoring`` from its end to the first gradient-enabled policy forward (log-probs from the
generation scores, the reference, value and reward forwards, rewards, GAE); ``optimisation`` from there to the step's
end.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_step import StepGate, emit, gpt2_config_kwargs, make_queries, parse_args, peak_memory  # noqa: E402


def build_tokenizer(vocab_size: int):
    """Token ``<i>`` is id i for 0..V; pad = V (an id the policy cannot sample), eos = 1 (only counted by TRL)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size + 1)}, unk_token="<2>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"<{vocab_size}>", eos_token="<1>",
                                   unk_token="<2>", padding_side="left")


def main() -> None:
    args = parse_args()
    import torch
    import transformers
    from datasets import Dataset
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.batch_size % args.mini_batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of --mini-batch-size "
                         f"{args.mini_batch_size}: choose a mini-batch size that divides the batch")
    q_len, r_len, total = args.query_len, args.response_len, args.warmup + args.steps
    marks: dict[str, float] = {}

    class TimedGPT2(GPT2LMHeadModel):
        """GPT-2 whose ``generate`` notes when it starts and ends (TRL calls it once per step)."""

        def generate(self, *a, **kw):
            marks["gen_start"] = time.perf_counter()
            try:
                return super().generate(*a, **kw)
            finally:
                marks["gen_end"] = time.perf_counter()

    class EvenBackbone(torch.nn.Module):
        """Per position: the even response ids so far over the response length (TRL reads the last response
        position)."""

        def forward(self, input_ids, attention_mask, **kwargs):
            even = ((input_ids % 2 == 0) & attention_mask.bool()).float()
            even[:, :q_len] = 0
            return SimpleNamespace(hidden_states=((even.cumsum(1) / r_len).unsqueeze(-1),))

    class EvenFractionReward(torch.nn.Module):
        """TRL's reward-model interface (``getattr(m, m.base_model_prefix)`` -> hidden states, ``m.score``)."""

        base_model_prefix = "backbone"

        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.score = EvenBackbone(), torch.nn.Identity()

    gate = StepGate()

    class StepTimer(TrainerCallback):
        def _start(self) -> None:
            gate.wait()
            marks.clear()
            marks["start"] = time.perf_counter()

        def on_train_begin(self, args_, state, control, **kwargs) -> None:
            self._start()

        def on_step_end(self, args_, state, control, **kwargs) -> None:
            end = time.perf_counter()
            opt_start = marks.get("opt_start", end)
            gate.done({
                "wall": end - marks["start"],
                "total": end - marks["start"],
                "generation": marks["gen_end"] - marks["gen_start"],
                "scoring": opt_start - marks["gen_end"],
                "optimisation": end - opt_start,
                "step_other": marks["gen_start"] - marks["start"],
                "reward": float(state.log_history[-1]["objective/scores"]),
            })
            if state.global_step < total:
                self._start()

    torch.manual_seed(args.seed)
    config = dict(gpt2_config_kwargs(args), pad_token_id=args.vocab_size)
    policy = TimedGPT2(GPT2Config(**config))
    value_model = GPT2ForSequenceClassification(GPT2Config(**config, num_labels=1))

    def first_training_forward(module, inputs) -> None:
        if torch.is_grad_enabled() and "opt_start" not in marks:
            marks["opt_start"] = time.perf_counter()

    policy.register_forward_pre_hook(first_training_forward)
    rows = [q.tolist() for step in range(total)
            for q in make_queries(args.seed, step, args.batch_size, q_len, args.vocab_size)]
    with tempfile.TemporaryDirectory() as out:
        ppo_config = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            num_mini_batches=args.batch_size // args.mini_batch_size,
            num_ppo_epochs=args.ppo_epochs,
            total_episodes=args.batch_size * total,
            response_length=r_len,
            temperature=1.0,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            seed=args.seed,
            bf16=False,
            use_cpu=args.accelerator == "cpu",
            gradient_checkpointing=False,
            num_sample_generations=0,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = PPOTrainer(
            args=ppo_config,
            processing_class=build_tokenizer(args.vocab_size),
            model=policy,
            ref_model=None,
            reward_model=EvenFractionReward(),
            train_dataset=Dataset.from_dict({"input_ids": rows}),
            value_model=value_model,
            callbacks=[StepTimer()],
        )
        trainer.remove_callback(PrinterCallback)  # TRL's per-step metric dicts on stdout
        trainer.train()
    emit({"side": "trl-ppov2", **peak_memory()})


if __name__ == "__main__":
    main()
