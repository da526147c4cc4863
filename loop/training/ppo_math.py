"""The math of PPO for RLHF: small pure functions on torch tensors (no models, no I/O).

Follows the published implementation details of Ziegler et al. 2019, "Fine-Tuning Language Models
from Human Preferences" (openai/lm-human-preferences), as catalogued by Huang et al., "The N
Implementation Details of RLHF with PPO" (ICLR blog track 2024):

- reward only at the last token plus a per-token KL penalty: r_t = -beta * (log pi - log pi_ref),
  and the reward model's score is added at the last real token of the response;
- EOS penalty: a response that never emits EOS (truncated) gets a fixed low score instead;
- generalised advantage estimation (GAE) over the response tokens, V = 0 after the episode ends;
- whitened advantages (`masked_whiten`), and optionally whitened rewards;
- clipped surrogate policy loss, and value clipping with the pessimistic max of both squared errors;
- the adaptive KL controller from Ziegler et al. 2019, eq. 2 (or a fixed KL coefficient).

Shapes: batch B, response length T, vocabulary V. `mask` (B, T) is 1 for real response tokens (up
to and including EOS) and 0 for the padding after them. Padded positions never influence a result,
even when they hold NaN or inf: they are selected away with `torch.where`, not multiplied by 0.
Compute rollout quantities (rewards, advantages, returns) under `torch.no_grad()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

WHITEN_EPS = 1e-8


def _m(mask: Tensor) -> Tensor:
    """The mask as a bool tensor."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * m) / sum(m), over everything or along `dim`; 0 where the mask is empty."""
    m = _m(mask)
    total = torch.where(m, x, torch.zeros_like(x))
    count = m.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp_min(1.0)
    return total.sum(dim) / count.sum(dim).clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """mean_m((x - mean_m(x))^2) over all masked entries, times n / (n - 1) if unbiased (n > 1)."""
    m = _m(mask)
    centered = x - masked_mean(x, m)
    var = masked_mean(centered * centered, m)
    if unbiased:
        n = m.sum().to(x.dtype)
        # Bessel's correction is undefined for n <= 1; the biased value (0 for one entry) is returned then.
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean_m) / sqrt(var_m + 1e-8) (plus mean_m again if not shift_mean); 0 on padding."""
    m = _m(mask)
    mean, var = masked_mean(x, m), masked_var(x, m)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of the last real token of each row (0 for an empty row)."""
    m = _m(mask)
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    return torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=-1).clamp_min(0)


def per_token_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """kl = (log pi - log pi_ref) * m (k1); r = -kl_coef * kl, plus scores[b] at row b's last real token."""
    m = _m(mask)
    diff = logprobs - ref_logprobs
    kl = torch.where(m, diff, torch.zeros_like(diff))
    rewards = -kl_coef * kl
    last = torch.nn.functional.one_hot(last_token_index(m), num_classes=m.shape[-1]).bool() & m
    rewards = rewards + torch.where(last, scores.to(rewards.dtype).unsqueeze(-1), torch.zeros_like(rewards))
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """delta_t = r_t + gamma*V_{t+1} - V_t; A_t = delta_t + gamma*lam*A_{t+1}; V = A = 0 after the last token."""
    m = _m(mask)
    zeros = torch.zeros_like(values)
    r = torch.where(m, rewards.to(values.dtype), zeros)
    v = torch.where(m, values, zeros)
    steps = m.to(values.dtype)
    T = values.shape[-1]
    advantages = torch.zeros_like(v)
    next_value = v.new_zeros(v.shape[:-1])
    next_adv = v.new_zeros(v.shape[:-1])
    for t in reversed(range(T)):
        # `alive` is 1 while the next token still belongs to the episode: past the end V and A are 0.
        alive = steps[..., t + 1] if t + 1 < T else v.new_zeros(v.shape[:-1])
        delta = r[..., t] + gamma * alive * next_value - v[..., t]
        next_adv = delta + gamma * lam * alive * next_adv
        next_value = v[..., t]
        advantages[..., t] = next_adv
    advantages = torch.where(m, advantages, zeros)
    returns = torch.where(m, advantages + v, zeros)
    return advantages, returns


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """mean_m(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))), ratio = exp(logp - old_logp)."""
    m = _m(mask)
    diff = logprobs - old_logprobs
    log_ratio = torch.where(m, diff, torch.zeros_like(diff))
    adv = torch.where(m, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), m),
            "ratio": masked_mean(ratio, m),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 * mean_m(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))."""
    m = _m(mask)
    zeros = torch.zeros_like(values)
    v = torch.where(m, values, zeros)
    old = torch.where(m, old_values, zeros)
    ret = torch.where(m, returns, zeros)
    v_clipped = old + torch.clamp(v - old, -clip_range_value, clip_range_value)
    err_unclipped = (v - ret).square()
    err_clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), m)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err_unclipped).to(v.dtype), m)}
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(B, T, V) -> (B, T): H = logsumexp(l) - sum(softmax(l) * l)."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, T, V), (B, T) -> (B, T): log_softmax(l)[label]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def apply_eos_penalty(scores: Tensor, has_eos: Tensor, penalty: float) -> Tensor:
    """score if the response has an EOS, else the fixed `penalty` score."""
    return torch.where(_m(has_eos), scores, torch.full_like(scores, penalty))


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2: steer the KL coefficient so that KL(pi || pi_ref) tracks `target`."""

    value: float
    target: float
    horizon: float

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {self.target}, {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        """e = clip(kl / target - 1, -0.2, 0.2); value *= 1 + e * n_steps / horizon."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def kl_controller(kl_coef: float, target: float, horizon: float) -> FixedKLController | AdaptiveKLController:
    """Adaptive when target > 0, else fixed at kl_coef."""
    if target > 0:
        return AdaptiveKLController(value=kl_coef, target=target, horizon=horizon)
    return FixedKLController(value=kl_coef)
