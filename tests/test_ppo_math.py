"""loop.training.ppo_math against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from loop.training.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    apply_eos_penalty,
    entropy_from_logits,
    gae,
    kl_controller,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)

NAN = float("nan")


def t(x, **kw) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, **kw)


def close(actual, expected, atol=1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64).detach()
    actual = torch.as_tensor(actual, dtype=torch.float64).detach()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------- masked statistics

X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
MASK = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # real entries: 1, 2, 4


def test_masked_mean_hand_values():
    close(masked_mean(t(X), t(MASK)), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(t(X), t(MASK), dim=1), [1.5, 4.0])  # (1 + 2) / 2, 4 / 1
    close(masked_mean(t(X), t(MASK), dim=0), [2.5, 2.0, 0.0])  # (1 + 4) / 2, 2 / 1, empty column -> 0


def test_masked_mean_ignores_padding_even_nan():
    padded = [[1.0, 2.0, 1000.0], [4.0, NAN, float("inf")]]
    close(masked_mean(t(padded), t(MASK)), 7 / 3)
    close(masked_mean(t(padded), t(MASK).bool(), dim=1), [1.5, 4.0])


def test_masked_var_hand_values():
    # entries 1, 2, 4; mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    close(masked_var(t(X), t(MASK), unbiased=False), 42 / 9 / 3)  # 14/9
    close(masked_var(t(X), t(MASK)), 42 / 9 / 2)  # 7/3
    # one entry: Bessel's correction undefined, the biased value 0 comes back (no division by zero)
    close(masked_var(t([[5.0, 9.0]]), t([[1.0, 0.0]])), 0.0)


def test_masked_whiten_hand_values_and_padding_zero():
    w = masked_whiten(t(X), t(MASK))
    std = math.sqrt(7 / 3 + 1e-8)  # unbiased variance 7/3 (see above)
    close(w, [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]])
    # changing padded values changes nothing
    padded = [[1.0, 2.0, -50.0], [4.0, NAN, 1e9]]
    close(masked_whiten(t(padded), t(MASK)), w)


def test_masked_whiten_mean_zero_var_one():
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64) * 3 + 5
    mask = torch.ones(4, 7)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), 0.0)
    close(masked_var(w, mask), 1.0)
    assert (w[mask == 0] == 0).all()
    # shift_mean=False keeps the original mean, same spread
    w2 = masked_whiten(x, mask, shift_mean=False)
    close(masked_mean(w2, mask), masked_mean(x, mask))
    close(masked_var(w2, mask), 1.0)
    assert (w2[mask == 0] == 0).all()


# ---------------------------------------------------------------- rewards


def test_last_token_index():
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 1, 0, 0]


def test_per_token_rewards_score_on_last_real_token():
    logprobs = t([[-1.0, -2.0, -3.0], [-0.5, -1.0, -9.0], [-2.0, -7.0, -7.0]])
    ref = t([[-1.5, -1.0, -3.0], [-1.0, -1.0, 0.0], [-1.0, NAN, 3.0]])
    mask = t([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    scores = t([2.0, -1.0, 0.5])
    rewards, kl = per_token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # kl = logp - ref on real tokens: row0 -1+1.5=0.5, -2+1=-1, 0; row1 0.5, 0, [pad]; row2 -1, [pad], [pad]
    close(kl, [[0.5, -1.0, 0.0], [0.5, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    # rewards = -0.1 * kl, plus the score at the last real token (index 2, 1, 0)
    close(
        rewards,
        [
            [-0.05, 0.1, 0.0 + 2.0],
            [-0.05, 0.0 - 1.0, 0.0],
            [0.1 + 0.5, 0.0, 0.0],
        ],
    )


# ---------------------------------------------------------------- GAE


def test_gae_hand_example_two_lengths():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    rewards = t([[0.0, 0.0, 1.0], [0.2, -1.0, 99.0]])
    values = t([[0.5, 0.6, 0.7], [0.4, 0.3, 55.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0:
    #   t=2: delta = 1 + 0.9*0 - 0.7 = 0.3;             A2 = 0.3
    #   t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03;          A1 = 0.03 + 0.45*0.3 = 0.165
    #   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04;          A0 = 0.04 + 0.45*0.165 = 0.11425
    # row 1 (ends at t=1; the padded V=55 and r=99 must not count):
    #   t=1: delta = -1 + 0.9*0 - 0.3 = -1.3;           A1 = -1.3
    #   t=0: delta = 0.2 + 0.9*0.3 - 0.4 = 0.07;        A0 = 0.07 + 0.45*(-1.3) = -0.515
    close(adv, [[0.11425, 0.165, 0.3], [-0.515, -1.3, 0.0]])
    # returns = A + V
    close(ret, [[0.61425, 0.765, 1.0], [-0.115, -1.0, 0.0]])


def test_gae_short_row_same_as_alone():
    rewards = t([[0.2, -1.0, 99.0]])
    values = t([[0.4, 0.3, 55.0]])
    adv_padded, ret_padded = gae(rewards, values, t([[1, 1, 0]]), 0.9, 0.5)
    adv_alone, ret_alone = gae(rewards[:, :2], values[:, :2], t([[1, 1]]), 0.9, 0.5)
    close(adv_padded[:, :2], adv_alone)
    close(ret_padded[:, :2], ret_alone)


def test_gae_monte_carlo_with_gamma_lam_one():
    rewards = t([[0.1, -0.2, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    values = t([[0.3, 0.5, 0.2, 8.0], [1.0, 8.0, 8.0, 8.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: future reward sums 0.1-0.2+1 = 0.9, -0.2+1 = 0.8, 1.0; minus V 0.3, 0.5, 0.2
    # row 1: one token, 0.5 - 1.0
    close(adv, [[0.6, 0.3, 0.8, 0.0], [-0.5, 0.0, 0.0, 0.0]])
    close(ret, [[0.9, 0.8, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])


# ---------------------------------------------------------------- policy loss


def test_policy_loss_ratio_one():
    lp = t([[-1.0, -2.0, -0.5], [-0.3, -4.0, -4.0]])
    adv = t([[1.0, -2.0, 3.0], [0.5, 7.0, NAN]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    loss, stats = policy_loss(lp, lp.clone(), adv, mask, clip_range=0.2)
    close(loss, -0.625)  # -(1 - 2 + 3 + 0.5) / 4
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio"], 1.0)


def test_policy_loss_positive_advantage_clipped():
    old = t([[-1.0, -2.0, -3.0]])
    # ratios: 1.5 (above 1 + 0.2), 1.1 (inside), and a padded token with ratio e^5
    lp = (old + t([[math.log(1.5), math.log(1.1), 5.0]])).requires_grad_()
    adv = t([[2.0, 1.0, 100.0]])
    mask = t([[1, 1, 0]])
    loss, stats = policy_loss(lp, old, adv, mask, clip_range=0.2)
    # token 0: -A*ratio = -3.0, -A*clip = -2*1.2 = -2.4 -> max -2.4 (clipped term taken)
    # token 1: -A*ratio = -1.1, -A*clip = -1.1            -> -1.1 (not clipped)
    close(loss, -1.75)  # (-2.4 - 1.1) / 2
    close(stats["clipfrac"], 0.5)
    close(stats["ratio"], 1.3)  # (1.5 + 1.1) / 2
    # 0.5 * (ln 1.5^2 + ln 1.1^2) / 2 = 0.25 * (0.405465^2 + 0.0953102^2) = 0.25 * 0.173486
    close(stats["approx_kl"], 0.0433715, atol=1e-6)
    loss.backward()
    # d/dlp: token 0 clipped -> 0; token 1: -A*ratio/2 = -1.1/2; padding -> 0
    close(lp.grad, [[0.0, -0.55, 0.0]])


def test_policy_loss_negative_advantage():
    old = t([[-1.0, -1.0]])
    lp = (old + t([[math.log(0.5), math.log(1.5)]])).requires_grad_()
    adv = t([[-1.0, -1.0]])
    loss, stats = policy_loss(lp, old, adv, t([[1, 1]]), clip_range=0.2)
    # token 0: ratio 0.5: -A*ratio = 0.5, -A*clip = 0.8 -> 0.8 (clipped: the ratio may not fall further)
    # token 1: ratio 1.5: -A*ratio = 1.5, -A*clip = 1.2 -> 1.5 (pessimistic: unclipped)
    close(loss, 1.15)  # (0.8 + 1.5) / 2
    close(stats["clipfrac"], 0.5)
    loss.backward()
    # token 0: 0; token 1: -A*ratio/2 = 1.5/2
    close(lp.grad, [[0.0, 0.75]])


# ---------------------------------------------------------------- value loss


def test_value_loss_clipping_hand_example():
    values = t([[1.0, 0.5, 3.0, 42.0]], requires_grad=True)
    old = t([[0.5, 0.4, 1.0, 0.0]])
    returns = t([[2.0, 0.0, 2.0, NAN]])
    mask = t([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: V-old = 0.5 -> 0.2, Vc = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    # token 1: V-old = 0.1 inside, Vc = 0.5; both (0.5-0)^2 = 0.25           -> 0.25
    # token 2: V-old = 2 -> 0.2, Vc = 1.2; (3-2)^2 = 1, (1.2-2)^2 = 0.64     -> 1.0 (unclipped)
    close(loss, 0.49)  # 0.5 * (1.69 + 0.25 + 1.0) / 3 = 0.5 * 0.98
    close(stats["vf_clipfrac"], 1 / 3)
    loss.backward()
    # d/dV of 0.5 * (.)/3: token 0 clipped -> 0; token 1: 2*(0.5-0)/6 = 1/6; token 2: 2*(3-2)/6 = 1/3
    close(values.grad, [[0.0, 1 / 6, 1 / 3, 0.0]])


def test_value_loss_no_clipping_is_half_mse():
    values = t([[1.0, 2.0]])
    loss, stats = value_loss(values, values.clone(), t([[0.0, 4.0]]), t([[1, 1]]), clip_range_value=0.2)
    close(loss, 1.25)  # 0.5 * (1 + 4) / 2
    close(stats["vf_clipfrac"], 0.0)


# ---------------------------------------------------------------- logits


def test_entropy_uniform_and_two_outcomes():
    close(entropy_from_logits(torch.zeros(2, 3, 4, dtype=torch.float64)), [[math.log(4)] * 3] * 2)
    # logits [0, ln 3] -> p = [0.25, 0.75]; H = 0.25*ln 4 + 0.75*ln(4/3) = 0.346574 + 0.215762
    logits = t([[[0.0, math.log(3.0)]]])
    close(entropy_from_logits(logits), [[0.562335]], atol=1e-6)
    # shifting all logits by a constant changes nothing
    close(entropy_from_logits(logits + 100.0), [[0.562335]], atol=1e-6)


def test_logprobs_from_logits_hand_values():
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # p = [0.25, 0.75]
    labels = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.25)]])
    # uniform over 4: ln(1/4)
    close(logprobs_from_logits(torch.zeros(1, 1, 4), torch.tensor([[2]])), [[-1.386294]], atol=1e-6)


# ---------------------------------------------------------------- EOS penalty


def test_apply_eos_penalty():
    scores = t([1.5, -0.3, 2.0])
    out = apply_eos_penalty(scores, torch.tensor([True, False, True]), penalty=-1.0)
    close(out, [1.5, -1.0, 2.0])
    close(apply_eos_penalty(scores, t([0, 0, 1]), penalty=-5.0), [-5.0, -5.0, 2.0])


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_hand_values():
    c = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    c.update(current_kl=6.6, n_steps=512)
    # error = 6.6/6 - 1 = 0.1; factor = 1 + 0.1*512/10000 = 1.00512
    assert c.value == pytest.approx(0.1 * 1.00512)

    c = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    c.update(current_kl=60.0, n_steps=512)
    # error = 9 -> clipped to 0.2; factor = 1 + 0.2*512/10000 = 1.01024
    assert c.value == pytest.approx(0.1 * 1.01024)

    c = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    c.update(current_kl=0.0, n_steps=512)
    # error = -1 -> clipped to -0.2; factor = 0.98976
    assert c.value == pytest.approx(0.1 * 0.98976)

    c = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    c.update(current_kl=6.0, n_steps=512)  # on target: unchanged
    assert c.value == pytest.approx(0.1)


def test_fixed_kl_controller_never_changes():
    c = FixedKLController(value=0.05)
    for kl in (0.0, 3.0, 1e6):
        c.update(current_kl=kl, n_steps=512)
    assert c.value == 0.05


def test_kl_controller_picks():
    adaptive = kl_controller(0.1, target=6.0, horizon=10000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 10000)
    fixed = kl_controller(0.2, target=0.0, horizon=10000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.2
    with pytest.raises(ValueError):
        AdaptiveKLController(value=0.1, target=6.0, horizon=0)
