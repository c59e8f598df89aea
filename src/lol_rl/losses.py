"""One pure function per offline objective (PAPER.md, "Objectives"); a registry by name.

Every loss takes response-aligned tensors, all (B, R) or (B,):
  logprobs      log pi_theta(y_i | x, y_<i), with gradient, 0 at padding
  mask          True on response tokens
  ref_logprobs  log pi_ref(y_i | x, y_<i), cached, no gradient
  advantages    A = R(x, y) - V_ref(x)
  rewards       R(x, y)
and returns (scalar loss, metrics), metrics being detached 0-d tensors (no sync per step).
The training loop passes each function the tensors its signature names.
"""

from __future__ import annotations

import torch


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """lp(y) = sum_i log pi(y_i | x, y_<i): summed, not averaged (the paper's code; sum beat mean)."""
    return (logprobs * mask).sum(-1)


def clipped_ratio(logprobs, ref_logprobs, mask, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The detached sequence importance weight pi_theta(y|x)/pi_ref(y|x), clamped to
    [1-eps, 1+eps], and the unclipped one. A >= 0, so a plain clamp does (no PPO min)."""
    log_ratio = sequence_logprob(logprobs.detach() - ref_logprobs, mask)
    # clamp the log-ratio first so that a gap of +-50 nats cannot overflow exp()
    ratio = log_ratio.clamp(-20.0, 20.0).exp()
    return ratio.clamp(1.0 - eps, 1.0 + eps), ratio


def nll(logprobs: torch.Tensor, mask: torch.Tensor):
    """NLL of the logged responses: -lp(y), mean over the batch."""
    lp = sequence_logprob(logprobs, mask)
    return -lp.mean(), {"logprob": lp.detach().mean()}


def alol(logprobs, mask, ref_logprobs, advantages, *, eps: float):
    """A-LOL (PAPER.md eq. 5): -A * clip(pi_theta/pi_ref, 1-eps, 1+eps) * lp(y).

    The weight is detached, so the gradient is clip(r) * A * grad(-lp(y)).
    """
    weight, ratio = clipped_ratio(logprobs, ref_logprobs, mask, eps)
    lp = sequence_logprob(logprobs, mask)
    loss = -(advantages * weight * lp).mean()
    clipped = (ratio < 1.0 - eps) | (ratio > 1.0 + eps)
    return loss, {
        "logprob": lp.detach().mean(),
        "ratio": ratio.mean(),
        "clip_fraction": clipped.float().mean(),
        "advantage": advantages.mean(),
    }


LOSSES = {"nll": nll, "alol": alol}
