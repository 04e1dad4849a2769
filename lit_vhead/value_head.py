"""The value head: TRL's ``ValueHead`` (dropout + ``Linear(hidden, 1)``) and helpers to read values safely."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

# The head's defaults (TRL's), the one source for the model classes, HeadConfig and configs/head.
INIT_STRATEGIES = (None, "normal")
DEFAULT_DROPOUT = 0.1  # when neither summary_dropout_prob nor config.summary_dropout_prob is given
DEFAULT_INITIALIZER_RANGE = 0.2  # std of the "normal" init


def hidden_size_of(config: PretrainedConfig) -> int:
    """Width of the hidden state the head reads, in TRL v1.6's priority order.

    OPT projects its last hidden state down to ``word_embed_proj_dim``; multimodal configs keep the size in
    ``text_config``; ``EncoderDecoderConfig`` keeps it in ``decoder``.
    """
    for candidate in (
        getattr(config, "word_embed_proj_dim", None),
        getattr(config, "hidden_size", None),
        getattr(getattr(config, "text_config", None), "hidden_size", None),
        getattr(getattr(config, "decoder", None), "hidden_size", None),
    ):
        if isinstance(candidate, int) and candidate > 0:
            return candidate
    raise ValueError(
        f"Cannot find the hidden size of {type(config).__name__}: none of word_embed_proj_dim, hidden_size, "
        "text_config.hidden_size or decoder.hidden_size is set. Set `config.hidden_size` to the width of the "
        "model's last hidden state."
    )


class ValueHead(nn.Module):
    """Maps each hidden state to a scalar value: ``summary(dropout(h))``.

    The state-dict keys (``summary.weight`` [1, H], ``summary.bias`` [1]) are TRL's, so checkpoints cross over.
    An explicit ``summary_dropout_prob`` wins over ``config.summary_dropout_prob`` (TRL let the config win).
    """

    def __init__(self, config: PretrainedConfig, summary_dropout_prob: float | None = None, **_: object) -> None:
        super().__init__()
        if summary_dropout_prob is None:
            summary_dropout_prob = getattr(config, "summary_dropout_prob", DEFAULT_DROPOUT)
        if summary_dropout_prob is not None and not 0.0 <= float(summary_dropout_prob) < 1.0:
            raise ValueError(f"summary_dropout_prob={summary_dropout_prob!r} must be in [0, 1).")
        self.dropout = nn.Dropout(summary_dropout_prob) if summary_dropout_prob else nn.Identity()
        self.summary = nn.Linear(hidden_size_of(config), 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[..., H] -> [..., 1]`` in the head's dtype (fp32 unless the user casts the head), even under autocast."""
        hidden_states = self.dropout(hidden_states)
        if hidden_states.dtype != self.summary.weight.dtype:
            hidden_states = hidden_states.to(self.summary.weight.dtype)
        with torch.autocast(hidden_states.device.type, enabled=False):
            return self.summary(hidden_states)

    def reset_parameters(
        self, init_strategy: str | None = None, initializer_range: float = DEFAULT_INITIALIZER_RANGE
    ) -> None:
        """``None`` keeps ``nn.Linear``'s default; ``"normal"`` draws N(0, range) weights and zeroes the bias."""
        check_init_strategy(init_strategy)
        if init_strategy == "normal":
            self.summary.weight.data.normal_(mean=0.0, std=initializer_range)
            self.summary.bias.data.zero_()


def check_init_strategy(init_strategy: str | None) -> None:
    if init_strategy not in INIT_STRATEGIES:
        raise ValueError(
            f"Unknown v_head_init_strategy={init_strategy!r}; use one of {list(INIT_STRATEGIES)} "
            "(None keeps nn.Linear's default init, 'normal' draws N(0, v_head_initializer_range))."
        )
