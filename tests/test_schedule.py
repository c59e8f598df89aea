"""Budgets in epochs: steps over the rows a loop trains on, validations per epoch."""

import pytest
from omegaconf import OmegaConf

from lol_rl.schedule import resolve_epochs


def opt(**values):
    return OmegaConf.create({"steps": 300, "epochs": None, "batch_size": 16, "val_interval": 50,
                             "validations_per_epoch": None, **values})


def test_without_epochs_the_steps_stand():
    cfg = opt()
    assert resolve_epochs(cfg, 1000) is cfg


def test_epochs_over_the_rows_used_give_steps_and_validation_interval():
    # 3 epochs of 1000 rows at 16: 187.5 steps -> 188; twice per epoch: every 31 steps
    cfg = resolve_epochs(opt(epochs=3, validations_per_epoch=2), 1000)
    assert (cfg.steps, cfg.val_interval) == (188, 31)
    kept = resolve_epochs(opt(epochs=3), 670)  # A-LOL on the kept 67%: the budget scales with it
    assert (kept.steps, kept.val_interval) == (126, 50)


@pytest.mark.parametrize("values,rows,message", [
    ({"validations_per_epoch": 2}, 100, "validations_per_epoch needs epochs"),
    ({"epochs": 0}, 100, "epochs must be > 0"),
    ({"epochs": 1}, 0, "over at least one row"),
    ({"epochs": 1, "validations_per_epoch": 0}, 100, "validations_per_epoch must be > 0"),
])
def test_bad_epoch_settings_are_refused(values, rows, message):
    with pytest.raises(ValueError, match=message):
        resolve_epochs(opt(**values), rows)
