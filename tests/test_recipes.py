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
