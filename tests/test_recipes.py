"""Every shipped recipe parses and validates; the Uni-OPD recipe carries the released settings."""

from pathlib import Path

import pytest

from uniopd.config import load_config

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_is_valid(recipe):
    cfg = load_config(recipe)
    assert cfg.model.path and cfg.teachers
    assert Path(cfg.data.train).exists() or cfg.data.train.startswith("hf:")


def test_plain_and_uniopd_recipes_differ_only_by_the_recipe_switches():
    root = RECIPES[0].parent
    opd, uni = load_config(root / "opd.yaml"), load_config(root / "uniopd.yaml")
    assert not opd.calibration.enabled and not opd.balance.online
    assert uni.calibration.enabled and uni.balance.online
    assert (uni.calibration.delta, uni.calibration.scope, uni.rollout.n) == (0.4, "group", 16)


def test_the_uniopd_recipe_has_every_setting_of_the_released_launch_scripts():
    uni = load_config(RECIPES[0].parent / "uniopd.yaml")
    c, t, loss = uni.calibration, uni.trainer, uni.loss
    assert (c.method, c.scope, c.mode, c.direction, c.delta, c.logratio_clip) == ("shift", "group", "mean", "both",
                                                                                 0.4, 10.0)
    assert (uni.rollout.n, uni.rollout.prompts_per_step, uni.rollout.temperature) == (16, 64, 1.0)
    assert (t.lr, t.warmup_steps, t.betas, t.weight_decay) == (1e-6, 5, [0.9, 0.98], 0.1)
    assert (loss.kind, loss.clip_low, loss.clip_high, loss.aggregation) == ("sampled", 0.2, 0.28,
                                                                            "seq-mean-token-mean")
    assert (uni.balance.online, uni.balance.mode) == (True, "release")
