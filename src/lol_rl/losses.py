"""One pure function per offline objective (PAPER.md, "Objectives"); a registry by name.

Tensors a loss may take, by name (B rows, R response tokens, K ranked responses):
  logprobs, mask            (B, R) log pi_theta(y_i | x, y_<i) of the logged response, with
                            gradient, 0 at padding; mask True on response tokens
  ref_logprobs              (B, R) the same under pi_ref, cached, no gradient
  advantages, rewards       (B,)   A = R(x, y) - V_ref(x) and R(x, y)
  rejected_*                (B, R) the same three for the rejected response of a pair
  ranking_logprobs/_mask    (B, K, R) every response of a ranking, best first
  ranking_rewards           (B, K)
  mismatched_*              (B, R) the same three for a mismatched pair: row i's prompt with the
                            response of row i-1 of the train split (data.MISMATCHED)
  process_mean              a function averaging a 0-d tensor over the training processes (the
                            identity with one), for a statistic of the whole global batch
Each returns (scalar loss, metrics), metrics being detached 0-d tensors (no sync per step).
The training loop passes each function exactly the tensors its signature names.

Every offline loss is a mean over rows of per-row terms (a pair or a ranking is one row, its
responses never split): none reads a batch-level statistic (PRO's temperatures are reward
gaps within a row), so the mean of equal micro-batches' losses is the batch's loss and
gradient accumulation (offline.accumulate_gradients) weights each by 1/k. PPO's token means
are batch-level normalisers: a micro-batch passes its minibatch's token count (`tokens`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

# log-ratios are clamped before exp() so that a gap of +-50 nats cannot overflow; any clip
# range in use lies far inside e^{+-20}
MAX_LOG_RATIO = 20.0


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """lp(y) = sum_i log pi(y_i | x, y_<i): summed, not averaged (the paper's code; sum beat mean)."""
    return (logprobs * mask).sum(-1)


def importance_weight(logprobs, ref_logprobs, mask) -> torch.Tensor:
    """pi_theta(y|x) / pi_ref(y|x) from summed token log-probs, detached."""
    log_ratio = sequence_logprob(logprobs.detach() - ref_logprobs, mask)
    return log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()


def _clip_metrics(ratio: torch.Tensor, eps: float, valid: torch.Tensor | None = None) -> dict:
    clipped = ((ratio < 1.0 - eps) | (ratio > 1.0 + eps)).float()
    if valid is None:
        return {"ratio": ratio.mean(), "clip_fraction": clipped.mean()}
    n = valid.sum().clamp(min=1)
    return {"ratio": (ratio * valid).sum() / n, "clip_fraction": (clipped * valid).sum() / n}


def nll(logprobs, mask):
    """NLL of the logged responses: -lp(y), mean over the batch."""
    lp = sequence_logprob(logprobs, mask)
    return -lp.mean(), {"logprob": lp.detach().mean()}


def weighted_nll(logprobs, mask, weights):
    """-w * lp(y): the gradient of lp(y) scaled by a per-row weight (no importance ratio)."""
    lp = sequence_logprob(logprobs, mask)
    return -(weights * lp).mean(), {"logprob": lp.detach().mean(), "weight": weights.mean()}


def clipped_policy_gradient(logprobs, mask, ref_logprobs, weights, eps: float):
    """-w * clip(pi_theta/pi_ref, 1-eps, 1+eps) * lp(y), the ratio detached: its gradient is
    clip(r) * w * grad(-lp(y)). w >= 0, so a plain clamp does (no PPO min)."""
    ratio = importance_weight(logprobs, ref_logprobs, mask)
    lp = sequence_logprob(logprobs, mask)
    loss = -(weights * ratio.clamp(1.0 - eps, 1.0 + eps) * lp).mean()
    return loss, {"logprob": lp.detach().mean(), "weight": weights.mean(), **_clip_metrics(ratio, eps)}


def wbc(logprobs, mask, rewards):
    """Weighted behaviour cloning: reward-weighted NLL, -R * lp(y) (R-LOL with r = 1)."""
    return weighted_nll(logprobs, mask, rewards)


def rlol(logprobs, mask, ref_logprobs, rewards, *, eps: float):
    """R-LOL (PAPER.md eq. 4): -R * clip(pi_theta/pi_ref, 1-eps, 1+eps) * lp(y)."""
    return clipped_policy_gradient(logprobs, mask, ref_logprobs, rewards, eps)


def alol(logprobs, mask, ref_logprobs, advantages, *, eps: float):
    """A-LOL (PAPER.md eq. 5): -A * clip(pi_theta/pi_ref, 1-eps, 1+eps) * lp(y)."""
    return clipped_policy_gradient(logprobs, mask, ref_logprobs, advantages, eps)


def alol_ref_free(logprobs, mask, advantages):
    """A-LOL ref-free: the ratio set to 1, -A * lp(y)."""
    return weighted_nll(logprobs, mask, advantages)


def alol_seq(logprobs, mask, ref_logprobs, advantages, *, eps: float):
    """A-LOL seq: per-token ratios, each detached and clipped on its own,
    -A * sum_i clip(pi_theta(y_i|..)/pi_ref(y_i|..), 1-eps, 1+eps) * log pi_theta(y_i|..)."""
    ratio = (logprobs.detach() - ref_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    weighted = sequence_logprob(ratio.clamp(1.0 - eps, 1.0 + eps) * logprobs, mask)
    loss = -(advantages * weighted).mean()
    metrics = _clip_metrics(ratio, eps, valid=mask.float())
    return loss, {"logprob": sequence_logprob(logprobs.detach(), mask).mean(), "weight": advantages.mean(), **metrics}


def alol_kl(logprobs, mask, ref_logprobs, advantages, *, beta: float):
    """A-LOL KL (PAPER.md eq. 6, as the paper's code computes it):
    mean(-A * lp(y)) + beta * mean(lp(y) - lp_ref(y)), a sampled log-ratio on the data."""
    lp = sequence_logprob(logprobs, mask)
    kl = (lp - sequence_logprob(ref_logprobs, mask)).mean()
    pg = -(advantages * lp).mean()
    return pg + beta * kl, {"logprob": lp.detach().mean(), "weight": advantages.mean(), "kl": kl.detach(),
                            "pg_loss": pg.detach()}


def gold(logprobs, mask, rewards, *, u: float):
    """Reward GOLD: -R * sum_i max(pi_theta(y_i|..), u) * log pi_theta(y_i|..), the token
    weight detached and bounded below by u for stability."""
    token_weight = logprobs.detach().exp().clamp(min=u)
    weighted = sequence_logprob(token_weight * logprobs, mask)
    loss = -(rewards * weighted).mean()
    n = mask.sum().clamp(min=1)
    return loss, {"logprob": sequence_logprob(logprobs.detach(), mask).mean(), "weight": rewards.mean(),
                  "token_weight": (token_weight * mask).sum() / n}


def _preference(chosen_lp, rejected_lp, chosen_ref_lp, rejected_ref_lp, beta: float):
    """-log sigmoid(beta * ((lp_w - lp_ref_w) - (lp_l - lp_ref_l))) (Rafailov et al. 2023, eq. 7)."""
    chosen_reward = beta * (chosen_lp - chosen_ref_lp)
    rejected_reward = beta * (rejected_lp - rejected_ref_lp)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    return loss, {"margin": margin.detach().mean(), "accuracy": (margin.detach() > 0).float().mean(),
                  "chosen_reward": chosen_reward.detach().mean(), "rejected_reward": rejected_reward.detach().mean()}


def dpo(logprobs, mask, ref_logprobs, rejected_logprobs, rejected_mask, rejected_ref_logprobs, *, beta: float):
    """DPO over (response, rejected) pairs with cached reference log-probs."""
    return _preference(
        sequence_logprob(logprobs, mask), sequence_logprob(rejected_logprobs, rejected_mask),
        sequence_logprob(ref_logprobs, mask), sequence_logprob(rejected_ref_logprobs, rejected_mask), beta,
    )


def dpo_ref_free(logprobs, mask, rejected_logprobs, rejected_mask, *, beta: float):
    """DPO without the reference terms: -log sigmoid(beta * (lp_w - lp_l))."""
    zero = torch.zeros(logprobs.shape[0], device=logprobs.device)
    return _preference(sequence_logprob(logprobs, mask), sequence_logprob(rejected_logprobs, rejected_mask),
                       zero, zero, beta)


def kto(logprobs, mask, ref_logprobs, mismatched_logprobs, mismatched_mask, mismatched_ref_logprobs, rewards,
        process_mean=None, *, beta: float, desirable_weight: float, undesirable_weight: float, threshold: float):
    """KTO (Ethayarajh et al. 2024, eq. 7; the loss TRL's KTOTrainer computes) on unpaired rows, a row
    desirable when R > threshold (TRL's `label`). With the implied reward r = lp(y) - lp_ref(y) and the
    reference point z0 = max(0, mean over the batch of lp(y'|x) - lp_ref(y'|x)) on the mismatched pairs,
    detached (a KL estimate; its mean over processes under several):
      desirable:   desirable_weight   * (1 - sigmoid(beta * (r - z0)))
      undesirable: undesirable_weight * (1 - sigmoid(beta * (z0 - r)))
    averaged over the batch. Per-token tensors (B, R), rewards (B,)."""
    log_ratio = sequence_logprob(logprobs, mask) - sequence_logprob(ref_logprobs, mask)
    kl = sequence_logprob(mismatched_logprobs.detach() - mismatched_ref_logprobs, mismatched_mask).mean()
    z0 = (kl if process_mean is None else process_mean(kl)).clamp(min=0).detach()
    desirable = rewards > threshold
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio))))
    implied = beta * log_ratio.detach()
    return losses.mean(), {"logprob": sequence_logprob(logprobs.detach(), mask).mean(), "kl": z0,
                           "desirable_fraction": desirable.float().mean(),
                           "desirable_reward": masked_mean(implied, desirable),
                           "undesirable_reward": masked_mean(implied, ~desirable)}


def pro(ranking_logprobs, ranking_mask, ranking_rewards, *, sft_weight: float):
    """PRO (Song et al. 2024) as the paper's code runs it: length-normalised scores s_k; for
    each rank k a softmax of the candidates k..K-1 with reward-difference temperatures,
    -log [exp(s_k t_k) / (exp(s_k t_k) + sum_{j>k} exp(s_j (r_k - r_j)))], t_k = max_j (r_k - r_j);
    plus sft_weight * (K-1)^2 * NLL of the best response (index 0)."""
    summed = sequence_logprob(ranking_logprobs, ranking_mask)  # (B, K)
    scores = summed / ranking_mask.sum(-1).clamp(min=1)
    n_ranked = scores.shape[1]
    ranking_loss = scores.new_zeros(())
    for k in range(n_ranked - 1):
        temperatures = ranking_rewards[:, k : k + 1] - ranking_rewards[:, k + 1 :]  # (B, K-k-1)
        top = temperatures.max(dim=1).values
        logits = torch.cat([(scores[:, k] * top)[:, None], scores[:, k + 1 :] * temperatures], dim=1)
        ranking_loss = ranking_loss + (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    sft_loss = -summed[:, 0].mean()
    loss = ranking_loss + sft_weight * (n_ranked - 1) ** 2 * sft_loss
    return loss, {"ranking_loss": ranking_loss.detach(), "sft_loss": sft_loss.detach(),
                  "best_first": (scores.detach().argmax(dim=1) == 0).float().mean()}


LOSSES = {
    "nll": nll,
    "wbc": wbc,
    "gold": gold,
    "rlol": rlol,
    "alol": alol,
    "alol_ref_free": alol_ref_free,
    "alol_seq": alol_seq,
    "alol_kl": alol_kl,
    "dpo": dpo,
    "dpo_ref_free": dpo_ref_free,
    "pro": pro,
    "kto": kto,
}

# Upper bounds of the clip ranges an algorithm's params may set (the lower bound, 0, excluded): `eps`
# clips the importance weight to [1-eps, 1+eps] (A-LOL's 0.9 keeps it in [0.1, 1.9]), PPO's `clip`
# the policy ratio likewise, `value_clip` the change of a value; 0 or less clamps to a point or to nothing.
CLIP_MAX = {"eps": 1.0, "clip": 1.0, "value_clip": math.inf}
# class weights (KTO's): 0 would silently drop a class of rows, a negative one reverse its loss
POSITIVE = ("desirable_weight", "undesirable_weight")


def check_params(loss: str | None, params: Mapping) -> None:
    """ValueError naming the first bad `params` key: an offline `loss` takes exactly its function's
    keyword parameters (None: the online PPO loop, which reads its own); clip ranges within CLIP_MAX."""
    if loss is not None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {sorted(LOSSES)}")
        takes = [p.name for p in inspect.signature(LOSSES[loss]).parameters.values() if p.kind is p.KEYWORD_ONLY]
        unknown, missing = sorted(set(params) - set(takes)), [name for name in takes if name not in params]
        if unknown or missing:
            problem = f"unknown params {unknown}" if unknown else f"missing params {missing}"
            raise ValueError(f"{problem}; loss {loss} takes {takes}")
    for name, high in CLIP_MAX.items():
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
            why = "not a number"
        elif value is None or 0 < value <= high:
            continue
        elif value > high:
            why = f"the lower clip 1 - {name} would be negative"
        else:
            why = "a clip range of 0 or less clamps every ratio to a point or to nothing"
        bound = "> 0" if math.isinf(high) else f"in (0, {high:g}]"
        raise ValueError(f"params.{name} must be {bound}, got {value!r} ({why})")
    for name in POSITIVE:
        value = params.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"params.{name} must be a number > 0, got {value!r}")


# Online PPO (ppo.py): token-level pieces, all (B, T) over response tokens, mask True on them.
# Names follow cleanrl's ppo.py; references are Schulman et al. 2017 (PPO) and 2016 (GAE).

def masked_mean(values: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the masked entries; with `tokens`, their sum over that count instead: a
    micro-batch's share of the token mean of the minibatch holding `tokens` response tokens
    (the token mean is a batch-level normaliser, so PPO's gradient accumulation passes it)."""
    return (values * mask).sum() / (mask.sum().clamp(min=1) if tokens is None else tokens)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(v - mean) / std over the masked entries (std alone when `shift_mean` is False); 0 at padding."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    centred = values - mean if shift_mean else values
    return (centred * torch.rsqrt(var + 1e-8)).masked_fill(~mask, 0.0)


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t)), plus the sequence score (B,) at
    the last response token: the reward model sees the whole response once."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = mask.sum(-1).clamp(min=1) - 1
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimates and returns (both (B, T)). Responses are right-padded,
    so the token after the last one is terminal: its value counts as 0.
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns = A + V."""
    mask = mask.to(values.dtype)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)
    continues = torch.cat([mask[:, 1:], mask.new_zeros(mask.shape[0], 1)], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * lam * continues[:, t] * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip: float, tokens=None):
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-clip, 1+clip)),
    r = pi_theta(y_t) / pi_old(y_t); the loss and metrics are `masked_mean`s (`tokens`: of a
    minibatch of which this is a micro-batch)."""
    log_ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip))
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean(((ratio - 1).abs() > clip).float(), mask, tokens),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask, tokens),  # k3 estimator of KL(old || new)
            "ratio": masked_mean(ratio, mask, tokens),
        }
    return masked_mean(pg_loss, mask, tokens), metrics


def ppo_value_loss(values, old_values, returns, mask, *, clip: float, tokens=None):
    """Clipped value loss: 0.5 * mean of max((V - G)^2, (V_old + clip(V - V_old, +-clip) - G)^2)
    (`tokens` as in ppo_policy_loss)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    clip_fraction = masked_mean(((values - old_values).abs() > clip).float(), mask, tokens).detach()
    return 0.5 * masked_mean(losses, mask, tokens), {"value_clip_fraction": clip_fraction}


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Ziegler et al. 2019's controller (TRL's AdaptiveKLController): move the coefficient
    towards the value that keeps the measured KL at `target`, by at most 20% per horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
