"""Lightning OPD: teacher log-probs cached once over a fixed response file give the same training as
scoring them live on the same replayed responses; a cache of other settings is refused."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_run_config

from uniopd.cli import main
from uniopd.commands.generate import generate_responses
from uniopd.config import ConfigError, ModelConfig
from uniopd.train.trainer import Trainer


@pytest.fixture
def responses(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file):
    cfg = tiny_run_config(tiny_student_dir, tiny_teacher_dir, arithmetic_file, tmp_path / "gen",
                          **{"rollout.max_new_tokens": 6})
    out = tmp_path / "responses.jsonl"
    generate_responses(cfg, ModelConfig(path=str(tiny_teacher_dir)), str(arithmetic_file), out, k=2, keep="all",
                       progress=False)
    return out


def _overrides(responses, **extra):
    return {"rollout.backend": "replay", "rollout.replay_responses": str(responses), "logging.diagnostics": "false",
            "trainer.steps": 3, **extra}


def _losses(run_dir, key="loss") -> list[float]:
    return [json.loads(line)[key] for line in open(run_dir / "metrics.jsonl")]


def _cache(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, responses, out, *extra):
    base = [f"model.path={tiny_student_dir}", f"teachers.t.path={tiny_teacher_dir}", f"data.train={arithmetic_file}"]
    return main(["cache-teacher", "--teacher", "t", "--responses", str(responses), "--out", str(out),
                 "--shard-size", "5", *extra, *base])


@pytest.mark.parametrize("kind", ["sampled", "topk"])
def test_cached_teacher_gives_the_live_losses_on_the_same_responses(tmp_path, tiny_student_dir, tiny_teacher_dir,
                                                                   arithmetic_file, responses, kind):
    extra = {"loss.kind": kind, "teachers.t.top_k": 4, "loss.topk": 4} if kind == "topk" else {}
    live = tiny_run_config(tiny_student_dir, tiny_teacher_dir, arithmetic_file, tmp_path / "live",
                           **_overrides(responses, **extra))
    Trainer(live).train()
    cache = tmp_path / "cache"
    assert _cache(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, responses, cache,
                  *(["--top-k", "4"] if kind == "topk" else [])) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 5  # 24 responses, 5 per shard
    cached = tiny_run_config(tiny_student_dir, tiny_teacher_dir, arithmetic_file, tmp_path / "cached",
                             **_overrides(responses, **extra, **{"teachers.t.backend": "cache",
                                                                 "teachers.t.cache": str(cache)}))
    trainer = Trainer(cached)
    assert type(trainer.teachers["t"]).__name__ == "CachedTeacher"
    trainer.train()
    key = "dense_loss" if kind == "topk" else "loss"
    a, b = _losses(tmp_path / "live", key), _losses(tmp_path / "cached", key)
    assert len(a) == 3 and a == pytest.approx(b, abs=1e-5, rel=0)


def test_a_cache_of_other_settings_is_refused_and_an_interrupted_one_resumes(
        tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, responses):
    cache = tmp_path / "cache"
    assert _cache(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, responses, cache) == 0
    manifest = json.loads((cache / "manifest.json").read_text())

    def build(**extra):
        cfg = tiny_run_config(tiny_student_dir, tiny_teacher_dir, arithmetic_file, tmp_path / "run",
                              **_overrides(responses, **{"teachers.t.backend": "cache", "teachers.t.cache": str(cache),
                                                         **extra}))
        return Trainer(cfg)

    with pytest.raises(ConfigError, match="teachers.t.view='privileged', but the cache was computed with view='same'"):
        build(**{"teachers.t.view": "privileged"})
    with pytest.raises(ConfigError, match="teachers.t.top_k=4, but the cache holds top-0 only"):
        build(**{"teachers.t.top_k": 4})
    with pytest.raises(ConfigError, match="but the cache was computed with teacher"):
        build(**{"teachers.t.path": str(tiny_student_dir)})
    with pytest.raises(ConfigError, match="rollout.replay_responses is read by rollout.backend=replay only"):
        build(**{"rollout.backend": "hf"})
    # Interrupted after two shards: the next run keeps them and writes the rest.
    (cache / manifest["shards"][-1]["file"]).unlink()
    (cache / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:2],
                                                     "complete": False}))
    with pytest.raises(ConfigError, match="the cache is incomplete"):
        build()
    assert _cache(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, responses, cache) == 0
    resumed = json.loads((cache / "manifest.json").read_text())
    assert resumed["complete"] and resumed["shards"] == manifest["shards"]
    build()  # accepted again
    # Another response file into the same directory is refused.
    other = tmp_path / "other.jsonl"
    other.write_text(responses.read_text().splitlines(True)[0])
    assert _cache(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, other, cache) == 2
