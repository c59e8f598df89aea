"""A loop's budget in epochs: the paper's small tasks train for epochs (pi_ref 6, each method
3), and the authors' A-LOL runs scale their steps by the kept fraction. `epochs` over the rows a
loop really trains on gives both."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError


def resolve_epochs(opt_cfg: DictConfig, rows: int) -> DictConfig:
    """`opt_cfg` with `steps = ceil(epochs x rows / batch_size)` when `epochs` is set, and then
    `val_interval = steps per epoch // validations_per_epoch` when that is set too; unchanged
    (the same object) otherwise."""
    epochs, per_epoch_validations = opt_cfg.get("epochs"), opt_cfg.get("validations_per_epoch")
    if epochs is None:
        if per_epoch_validations is not None:
            raise ValueError("validations_per_epoch needs epochs (a step budget has no epochs to divide)")
        return opt_cfg
    if epochs <= 0 or rows <= 0:
        raise ValueError(f"epochs must be > 0 over at least one row, got epochs={epochs} over {rows} rows")
    steps_per_epoch = rows / opt_cfg.batch_size
    resolved = OmegaConf.merge(opt_cfg, {"steps": max(1, math.ceil(epochs * steps_per_epoch))})
    if per_epoch_validations is not None:
        if per_epoch_validations <= 0:
            raise ValueError(f"validations_per_epoch must be > 0, got {per_epoch_validations}")
        resolved.val_interval = max(1, math.floor(steps_per_epoch / per_epoch_validations))
    return resolved


def resolve_budget(cfg: DictConfig, section: str, rows: int) -> DictConfig:
    """`cfg` with `<section>.steps` (and `val_interval`) from `<section>.epochs` over `rows`;
    `cfg` itself when the section counts steps."""
    try:
        resolved = resolve_epochs(cfg[section], rows)
    except ValueError as err:
        raise ConfigError(f"{section}: {err}") from None
    if resolved is cfg[section]:
        return cfg
    cfg = cfg.copy()
    cfg[section] = resolved
    return cfg
