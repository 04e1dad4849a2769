"""TRL's ``trl.experimental`` APIs on lit_vhead: ``lit_vhead.experimental.ppo`` is TRL 0.27-0.29's experimental
``PPOConfig``/``PPOTrainer`` (a separate value model), trained by lit_vhead's PPO core on Lightning."""
