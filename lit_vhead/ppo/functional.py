"""PPO math as pure functions on tensors, matching TRL classic (0.11.4) ``PPOTrainer`` exactly.

Shapes: ``B`` batch, ``T`` response tokens, ``V`` vocabulary. ``mask`` is a float or bool ``[B, T]`` tensor with 1 on
real response tokens. Nothing here knows about models, optimisers or Lightning.

The one deliberate extension over TRL: the masked statistics (and so advantage/reward whitening) take
``distributed=True`` to cover every rank's batch instead of only the local one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from lit_vhead.sequence import last_token_index

KL_PENALTY_KINDS = ("kl", "abs", "mse", "full", "k3")


def world_size() -> int:
    """The number of processes (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def world_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over all processes."""
    if world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world_size()
    return value


def _is_distributed() -> bool:
    return world_size() > 1


def _as_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask as a float tensor in ``like``'s dtype, so bool and float masks behave the same."""
    return mask.to(like.dtype if like.is_floating_point() else torch.float32)


def _masked_moments(
    x: torch.Tensor, mask: torch.Tensor, distributed: bool, min_count: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, biased_variance, count)`` of the unmasked entries of ``x``, all 0-d.

    Locally this is TRL's two-pass computation. Across ranks it is one ``all_reduce`` of the stacked
    ``[sum, sum_of_squares, count]``, accumulated in float64 so the ``E[x²] − E[x]²`` cancellation stays harmless;
    gradients flow to this rank's ``x``. Raises ``ValueError`` with fewer than ``min_count`` unmasked entries (over
    all ranks, in the distributed case, so every rank raises together).
    """
    w = _as_weights(mask, x)
    if distributed and _is_distributed():
        xd, wd = x.double(), w.double()
        local = torch.stack([(xd * wd).sum(), (xd.square() * wd).sum(), wd.sum()])
        reduced = local.detach().clone()
        dist.all_reduce(reduced)
        total, total_sq, count = (local + (reduced - local.detach())).unbind()
        _require_count(count, min_count)
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0.0)
        return mean.to(x.dtype), var.to(x.dtype), count.to(x.dtype)
    count = w.sum()
    _require_count(count, min_count)
    mean = (x * w).sum() / count
    var = ((x - mean).square() * w).sum() / count
    return mean, var, count


def _require_count(count: torch.Tensor, min_count: int) -> None:
    """Raise ``ValueError`` unless the mask selects at least ``min_count`` elements (one host sync)."""
    n = count.item()
    if n == 0:
        raise ValueError(
            "The mask selects no element (mask.sum() == 0), so masked statistics are undefined. This happens with "
            "mini_batch_size=1 and an empty response; use larger minibatches or drop empty responses."
        )
    if n < min_count:
        raise ValueError(
            f"Whitening needs at least {min_count} unmasked elements for a Bessel-corrected variance, got {n:g}. "
            "Use larger minibatches."
        )


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, distributed: bool = False) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1.

    With ``dim=None`` the result is 0-d and an all-zero mask raises ``ValueError``; ``distributed=True`` then
    averages over every rank. With ``dim`` set it reduces that dimension locally (a row with no unmasked entry
    gives NaN, as in TRL); ``distributed`` is not supported there.
    """
    if dim is not None:
        if distributed:
            raise ValueError("masked_mean(distributed=True) only supports a full reduction (dim=None).")
        w = _as_weights(mask, x)
        return (x * w).sum(dim=dim) / w.sum(dim=dim)
    return _masked_moments(x, mask, distributed)[0]


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, distributed: bool = False) -> torch.Tensor:
    """Variance (0-d) of ``x`` over entries where ``mask`` is 1, Bessel-corrected by default as in TRL.

    An all-zero mask raises ``ValueError``. With a single unmasked entry the unbiased variance is undefined and,
    as in TRL, comes out NaN.
    """
    _, var, count = _masked_moments(x, mask, distributed)
    if unbiased:
        var = var * (count / (count - 1))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, distributed: bool = False
) -> torch.Tensor:
    """``(x − mean) · rsqrt(var + 1e-8)`` with masked, Bessel-corrected statistics; same shape as ``x``.

    ``shift_mean=False`` adds the mean back (only the scale changes), which TRL uses for reward whitening.
    Raises ``ValueError`` unless at least 2 entries are unmasked: TRL would silently return NaN there.
    """
    mean, var, count = _masked_moments(x, mask, distributed, min_count=2)
    var = var * (count / (count - 1))
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def _in_fp32(fn: Callable[..., torch.Tensor], logits: torch.Tensor, *rowwise: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to fp32/fp64 logits directly; upcast half-precision logits one batch row at a time.

    Row-wise upcasting keeps the extra fp32 memory at ``T·V`` instead of ``B·T·V``.
    """
    if logits.dtype in (torch.float32, torch.float64):
        return fn(logits, *rowwise)
    return torch.stack([fn(row.float(), *(t[i] for t in rowwise)) for i, row in enumerate(logits)])


def _label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability ``[B, T]`` of ``labels`` (``[B, T]`` int) under ``logits`` (``[B, T, V]``), in fp32 or wider.

    Computed as ``logit[label] − logsumexp(logits)``, so no ``[B, T, V]`` log-softmax is materialised.
    """
    return _in_fp32(_label_logprobs, logits, labels)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``[B, T]`` of the categorical distribution given by ``logits`` (``[B, T, V]``), in fp32 or wider."""
    return _in_fp32(_entropy, logits)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str,
    logprobs_full: torch.Tensor | None = None,
    ref_logprobs_full: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL estimate ``[B, T]`` between the policy and the reference.

    ``logprobs``/``ref_logprobs`` are the ``[B, T]`` log-probs of the sampled tokens. With ``d = logprobs −
    ref_logprobs`` the kinds are ``"kl"`` (k1: ``d``), ``"abs"`` (``|d|``), ``"mse"`` (k2: ``½d²``), ``"k3"``
    (``(eʳ − 1) − r`` with ``r = −d``; unbiased and never negative) and ``"full"``: the exact ``KL(π‖π_ref)``
    summed over the vocabulary from the ``[B, T, V]`` log-prob distributions ``logprobs_full`` and
    ``ref_logprobs_full`` (TRL's ``F.kl_div(ref, cur, log_target=True).sum(-1)``).
    """
    if kind == "kl":
        return logprobs - ref_logprobs
    if kind == "abs":
        return (logprobs - ref_logprobs).abs()
    if kind == "mse":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kind == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    if kind == "full":
        if logprobs_full is None or ref_logprobs_full is None:
            raise ValueError("kl_penalty kind 'full' needs logprobs_full and ref_logprobs_full ([B, T, V]).")
        return (logprobs_full.exp() * (logprobs_full - ref_logprobs_full)).sum(-1)
    raise ValueError(f"Unknown KL penalty kind {kind!r}; valid kinds are {', '.join(map(repr, KL_PENALTY_KINDS))}.")


def kl_rewards(
    scores: torch.Tensor, kls: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards from per-token KL estimates ``kls``: ``−kl_coef · kl`` everywhere, plus the sequence score
    on the last response token.

    ``scores`` is ``[B]``. The score lands on the last index where ``mask`` is 1 in each row, whatever the padding
    side. Returns ``(rewards, non_score_rewards, kls)``, each ``[B, T]``. A row with no response token raises
    ``ValueError`` (it has nowhere to put its score).
    """
    non_score_rewards = -kl_coef * kls
    last = last_token_index(mask, "compute_rewards: every row needs at least one response token (mask == 1).")
    last = last.unsqueeze(1)
    rewards = non_score_rewards.scatter_add(1, last, scores.to(non_score_rewards.dtype).unsqueeze(1))
    return rewards, non_score_rewards, kls


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "kl",
    logprobs_full: torch.Tensor | None = None,
    ref_logprobs_full: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`kl_rewards` of the :func:`kl_penalty` of ``kind`` (``*_full``: as there). Returns ``(rewards,
    non_score_rewards, kls)``, each ``[B, T]``."""
    return kl_rewards(scores, kl_penalty(logprobs, ref_logprobs, kind, logprobs_full, ref_logprobs_full), mask, kl_coef)


def extend_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (``[B, T]``, one run of ones per row) with each run extended by the one position after it, where
    there is one: the state after the last response token (its EOS), which TRL 0.29.1's experimental trainer scores
    and gives a value (its ``padding_mask_p1``). Same dtype as ``mask``."""
    after = torch.zeros_like(mask)
    after[:, 1:] = mask[:, :-1]
    return torch.maximum(mask, after)


def compute_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
    distributed: bool = False,
    critic_lam: float | None = None,
    advantage_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE over the response tokens, as TRL (without its whitened-padding leak).

    ``values`` and ``rewards`` (``[B, T]``) are zeroed outside ``advantage_mask`` (default ``mask``); with
    ``whiten_rewards`` the rewards are rescaled by :func:`masked_whiten` (``shift_mean=False``) over
    ``advantage_mask`` and zeroed outside it again (TRL 0.11.4 left the whitened padding non-zero, and GAE carried it
    into the real tokens before it).
    Then ``δ_t = r_t + γ·V_{t+1} − V_t`` and ``A_t = δ_t + γλ·A_{t+1}`` from the end (``V_T = A_T = 0``),
    ``returns = A + V``, and the advantages are
    whitened over ``mask`` and detached. ``distributed`` makes both whitenings use every rank's batch.
    ``critic_lam`` (None: ``lam``, TRL's math) decouples the value targets: ``returns = A(critic_lam) + V`` while the
    policy's advantages keep ``lam`` (VC-PPO/VAPO's decoupled GAE).
    ``advantage_mask=extend_mask(mask)`` is TRL 0.29.1's experimental trainer (the state after the response keeps
    its value and reward). Returns ``(masked_values, advantages, returns)``, each ``[B, T]``.
    """
    value_mask = mask if advantage_mask is None else advantage_mask
    w = _as_weights(value_mask, values)
    values = values * w
    rewards = rewards * w
    if whiten_rewards:  # masked again: TRL let whitened padding rewards leak into real tokens' GAE
        rewards = masked_whiten(rewards, value_mask, shift_mean=False, distributed=distributed) * w
    advantages = gae(values, rewards, gamma, lam)
    returns = advantages + values if critic_lam is None or critic_lam == lam else gae(values, rewards, gamma,
                                                                                       critic_lam) + values
    advantages = masked_whiten(advantages, mask, distributed=distributed).detach()
    return values, advantages, returns


def gae(values: torch.Tensor, rewards: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates ``[B, T]``: ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = δ_t + γλ·A_{t+1}`` from
    the end (``V_T = A_T = 0``)."""
    last_gae = torch.zeros_like(rewards[:, 0])
    next_values = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_advantages.append(last_gae)
        next_values = values[:, t]
    return torch.stack(reversed_advantages[::-1], dim=1)


def ppo_loss(
    old_logprobs: torch.Tensor,
    values: torch.Tensor,
    logprobs: torch.Tensor,
    vpreds: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    cliprange: float,
    cliprange_value: float | None,
    vf_coef: float,
    entropy: torch.Tensor | None = None,
    value_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss and clipped value loss on one minibatch, as TRL's ``PPOTrainer.loss``.

    Inputs are ``[B, T]``: rollout ``old_logprobs`` and ``values``, current ``logprobs`` and ``vpreds``, the
    whitened ``advantages`` and the ``returns`` from :func:`compute_advantages`; ``entropy`` is optional per-token
    entropy, only logged; ``cliprange_value=None`` turns value clipping off (the plain squared error). Returns
    ``(pg_loss, vf_coef · vf_loss, stats)``; their sum is the loss to backpropagate.

    ``stats`` holds detached 0-d tensors under TRL's names (without TRL's ``ppo/`` prefix and its histogram
    entries): ``loss/{policy,value,total}`` (``loss/value`` is unscaled), ``policy/{entropy,approxkl,policykl,
    clipfrac,advantages_mean}``, ``returns/{mean,var}``, ``val/{vpred,error,clipfrac,mean,var,var_explained}``,
    plus ``policy/ratio_mean``, the masked mean of ``π/π_old``. TRL's ``ratio_threshold`` guard is the caller's:
    when ``policy/ratio_mean > ratio_threshold``, multiply both losses (and the ``loss/*`` stats) by 0.
    ``value_mask`` (default ``mask``) selects the tokens of the value loss and the ``val/*``/``returns/*`` statistics
    (``extend_mask(mask)`` for TRL 0.29.1's experimental trainer). An all-zero ``mask`` raises ``ValueError``.
    """
    w = _as_weights(mask, vpreds)
    count = w.sum()
    _require_count(count, 1)
    wv = w if value_mask is None else _as_weights(value_mask, vpreds)
    value_count = wv.sum()

    def mean(x: torch.Tensor, weights: torch.Tensor = w, n: torch.Tensor = count) -> torch.Tensor:
        return (x * weights).sum() / n

    def vmean(x: torch.Tensor) -> torch.Tensor:
        return mean(x, wv, value_count)

    def vvar(x: torch.Tensor) -> torch.Tensor:
        return vmean((x - vmean(x)).square()) * (value_count / (value_count - 1))

    vf_losses1 = (vpreds - returns).square()
    if cliprange_value is None:  # value clipping off
        vf_losses2 = vf_losses1
    else:
        vpred_clipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
        vf_losses2 = (vpred_clipped - returns).square()
    vf_loss = 0.5 * vmean(torch.max(vf_losses1, vf_losses2))

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = mean(torch.max(pg_losses, pg_losses2))

    with torch.no_grad():
        returns_var = vvar(returns)
        val_error = vmean((vpreds - returns).square())
        stats = {
            "loss/policy": pg_loss,
            "loss/value": vf_loss,
            "loss/total": pg_loss + vf_coef * vf_loss,
            "policy/approxkl": 0.5 * mean(log_ratio.square()),
            "policy/policykl": mean(-log_ratio),
            "policy/clipfrac": mean((pg_losses2 > pg_losses).to(w.dtype)),
            "policy/advantages_mean": mean(advantages),
            "policy/ratio_mean": mean(ratio),
            "returns/mean": vmean(returns),
            "returns/var": returns_var,
            "val/vpred": vmean(vpreds),
            "val/error": val_error,
            "val/clipfrac": vmean((vf_losses2 > vf_losses1).to(w.dtype)),
            "val/mean": vmean(values),
            "val/var": vvar(values),
            "val/var_explained": 1 - val_error / returns_var,
        }
        if entropy is not None:
            stats["policy/entropy"] = mean(entropy)
        stats = {k: v.detach() for k, v in stats.items()}
    return pg_loss, vf_coef * vf_loss, stats
