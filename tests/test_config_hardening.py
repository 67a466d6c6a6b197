"""Hostile and nonsensical configs: every one fails fast with a ConfigError naming the key or the file.

Non-finite numbers, out-of-range values, YAML alias bombs, duplicate keys, and special or huge files
given as the config.
"""

from __future__ import annotations

import dataclasses
import os
import time
import typing
from pathlib import Path

import pytest
from helpers import deadline

from uniopd.config import ConfigError, RunConfig, field_help, load_config

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


def _leaf_type(dotted: str) -> typing.Any:
    tp: typing.Any = RunConfig
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp)[part] if dataclasses.is_dataclass(tp) else typing.get_args(tp)[1]
    return tp


def _numeric_keys() -> list[str]:
    keys = []
    for key, _, _ in field_help():
        key = key.replace("<name>", "t")
        tp = _leaf_type(key)
        args = typing.get_args(tp) or (tp,)
        if any(a in (int, float) or typing.get_args(a) in ((int,), (float,)) for a in args):
            keys.append(key)
    return keys


NUMERIC_KEYS = _numeric_keys()


def test_the_walk_finds_the_numeric_keys():
    assert {"trainer.lr", "trainer.betas", "loss.kl_coef", "teachers.t.top_k", "rollout.n"} <= set(NUMERIC_KEYS)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999", "nan"])
@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_every_numeric_key_rejects_nan_and_infinity_naming_the_key(key, value):
    raw = f"[{value}, 0.9]" if typing.get_origin(_leaf_type(key)) is list else value
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={raw}"])
    assert key in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("trainer.lr=-1e-6", "trainer.lr: -1e-06 must be >= 0"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay"),
    ("trainer.grad_clip=-1", "trainer.grad_clip"),
    ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints: -1 must be >= 0"),
    ("trainer.save_every=-3", "trainer.save_every: -3 must be >= 0"),
    ("trainer.eval_every=-1", "trainer.eval_every"),
    ("trainer.warmup_steps=-1", "trainer.warmup_steps"),
    ("trainer.eval_n=0", "trainer.eval_n"),
    ("trainer.max_bad_steps=0", "trainer.max_bad_steps"),
    ("trainer.seed=-1", "trainer.seed"),
    ("trainer.seed=99999999999999999999999", "trainer.seed"),
    ("trainer.threads=0", "trainer.threads"),
    ("trainer.threads=1000000", "trainer.threads"),
    ("trainer.betas=[1.0, 0.9]", r"trainer.betas\[0\]: 1.0 must be >= 0 and < 1"),
    ("trainer.betas=[0.9, -0.1]", r"trainer.betas\[1\]"),
    ("loss.kl_coef=-1", "loss.kl_coef"),
    ("loss.outcome_weight=-1", "loss.outcome_weight"),
    ("loss.dense_weight=-1", "loss.dense_weight"),
    ("loss.temperature=0", "loss.temperature"),
    ("calibration.logratio_clip=0", "calibration.logratio_clip"),
    ("rollout.min_new_tokens=-1", "rollout.min_new_tokens"),
    ("rollout.min_new_tokens=300", "rollout.min_new_tokens: 300 must be <= 256"),
    ("rollout.threads=100000", "rollout.threads"),
    ("logging.log_samples=-1", "logging.log_samples"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_greedy_eval_refuses_a_sample_count_it_would_ignore():
    with pytest.raises(ConfigError, match="trainer.eval_greedy=true .* trainer.eval_n=4"):
        load_config(None, ["trainer.eval_greedy=true", "trainer.eval_n=4"])
    assert load_config(None, ["trainer.eval_greedy=true"]).trainer.eval_greedy


def test_zero_still_means_off_where_the_help_says_so():
    cfg = load_config(None, ["trainer.save_every=0", "trainer.keep_checkpoints=0", "trainer.grad_clip=0",
                             "trainer.eval_every=0", "logging.log_samples=0", "trainer.seed=0"])
    assert cfg.trainer.save_every == cfg.trainer.keep_checkpoints == 0


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipes_stay_valid(recipe):
    load_config(recipe)


# ----------------------------------------------------------------------------- YAML


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
model:
  path: *i
"""


def test_a_billion_laughs_fails_fast_naming_the_file(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BILLION_LAUGHS)
    start = time.monotonic()
    with deadline(30), pytest.raises(ConfigError, match=r"bomb.yaml:\d+: aliases expand"):
        load_config(recipe)
    assert time.monotonic() - start < 5


def test_a_recursive_alias_is_refused(tmp_path):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("model: &m {path: x, revision: *m}\n")
    with pytest.raises(ConfigError, match="loop.yaml:1: a recursive alias"):
        load_config(recipe)


def test_error_messages_show_a_bounded_value(tmp_path):
    # Under the expansion limit, but a full repr would be tens of kilobytes.
    recipe = tmp_path / "big.yaml"
    recipe.write_text("model:\n  path: [" + ", ".join(["'" + "x" * 100 + "'"] * 500) + "]\n")
    with pytest.raises(ConfigError, match="model.path: expected a string") as info:
        load_config(recipe)
    assert len(str(info.value)) < len(str(recipe)) + 600  # not the 50 KB of the value


def test_plain_aliases_and_merge_keys_still_work(tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("teachers:\n  a: &t {path: x, domains: [math], view: privileged}\n"
                      "  b:\n    <<: *t\n    domains: [code]\n")
    cfg = load_config(recipe)
    assert cfg.teachers["b"].view == "privileged" and cfg.teachers["b"].domains == ["code"]


@pytest.mark.parametrize("text, line, first", [
    ("trainer:\n  lr: 1e-6\nrollout:\n  n: 2\ntrainer:\n  steps: 3\n", 5, 1),
    ("trainer:\n  lr: 1e-6\n  steps: 2\n  lr: 1e-3\n", 4, 2),
    ("teachers:\n  a: {path: x, path: y}\n", 2, 2),
])
def test_duplicate_keys_name_the_file_and_both_lines(tmp_path, text, line, first):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup.yaml:{line}: duplicate key .*\(first at line {first}\)"):
        load_config(recipe)


# ----------------------------------------------------------------------------- special and huge files


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    os.mkfifo(path)
    return path


def _dev_zero(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.symlink_to("/dev/zero")
    return path


def _sparse(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    with open(path, "wb") as fh:
        fh.truncate(10 << 30)  # 10 GB of holes: no disk used
    return path


@pytest.mark.parametrize("make, message", [(_fifo, "is a FIFO"), (_dev_zero, "is a character device"),
                                           (_sparse, "10.0 GB, over the 4.0 MB limit")],
                         ids=["fifo", "dev_zero", "sparse_10GB"])
def test_special_and_huge_config_files_fail_fast_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with deadline(30), pytest.raises(ConfigError, match=f"config file {path}: {message}"):
        load_config(path)
