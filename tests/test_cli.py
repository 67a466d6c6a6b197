"""Smoke tests through the real CLI entry point, on tiny models."""

import json

import yaml

from helpers import write_jsonl
from uniopd.cli import main


def _recipe(tmp_path, student, teacher, data, **extra):
    cfg = {"model": {"path": str(student)}, "teachers": {"t": {"path": str(teacher)}},
           "data": {"train": str(data)},
           "rollout": {"prompts_per_step": 3, "n": 2, "max_new_tokens": 4},
           "trainer": {"steps": 2, "lr": "1e-3", "output_dir": str(tmp_path / "run"), "micro_batch_size": 4},
           "logging": {"progress": False}}
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_writes_config_metrics_tensorboard_and_checkpoint(tiny_student_dir, tiny_teacher_dir,
                                                                arithmetic_file, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file)
    assert main(["train", "-c", str(recipe), "rollout.n=3"]) == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["rollout"]["n"] == 3 and saved["trainer"]["lr"] == 1e-3
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "step_000002" / "manifest.json").exists()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 2


def test_train_bad_key_and_bad_record_exit_2_with_location(tiny_student_dir, tiny_teacher_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "a", "domain": "arithmetic", "prompt": "1+1=", "answer": "2"},
        {"id": "b", "domain": "arithmetic", "prompt": "", "answer": "2"},
    ])
    recipe = _recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, data)
    assert main(["train", "-c", str(recipe), "rollout.nn=3"]) == 2
    assert "rollout.nn: unknown key" in capsys.readouterr().err
    assert main(["train", "-c", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "prompt" in err


def test_skip_invalid_trains_on_the_valid_records(tiny_student_dir, tiny_teacher_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": "a", "domain": "arithmetic", "prompt": "1+1=", "answer": "2"},
        {"id": "b", "domain": "arithmetic", "prompt": "2+2=", "answer": ["4"]},
        {"id": "c", "domain": "arithmetic", "prompt": "3+3=", "answer": "6"},
    ])
    recipe = _recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, data)
    assert main(["train", "-c", str(recipe), "--skip-invalid", "trainer.steps=1"]) == 0
    assert "skipped 1" in caplog.text and "mixed.jsonl:2" in caplog.text


def test_eval_reports_avg_and_pass_at_k(tiny_student_dir, arithmetic_file, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_student_dir), "--data", str(arithmetic_file), "--k", "3",
                 "--out", str(out), "rollout.max_new_tokens=3"]) == 0
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert set(m) == {"avg@3", "pass@1", "pass@2", "pass@3"}  # pass@j for j = 1, 2, 4, ... and k
    assert 0.0 <= m["avg@3"] <= m["pass@3"] <= 1.0
    assert abs(m["pass@1"] - m["avg@3"]) < 1e-9  # the unbiased pass@1 is the mean accuracy
    assert result["num_prompts"] == 12 and "arithmetic" in result["per_domain"]


def test_balance_writes_balanced_jsonl_and_png_and_resumes(tiny_student_dir, tiny_teacher_dir, arithmetic_file,
                                                           tmp_path):
    recipe = _recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file,
                     balance={"offline_k": 2, "num_bins": 4})
    out = tmp_path / "balanced.jsonl"
    assert main(["balance", "-c", str(recipe), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    sources = {r["meta"]["source_id"] for r in rows}
    assert len(sources) == 12 and len(rows) >= 12  # nothing dropped
    assert len({r["id"] for r in rows}) == len(rows)  # repeats get fresh ids
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    estimates = (tmp_path / "balanced.work" / "pass_rates.jsonl").read_text().splitlines()
    assert len(estimates) == 12
    assert main(["balance", "-c", str(recipe), "--out", str(out)]) == 0  # resumes: nothing re-estimated
    assert len((tmp_path / "balanced.work" / "pass_rates.jsonl").read_text().splitlines()) == 12


def test_config_command_lists_every_key(capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert "calibration.delta" in text and "teachers.<name>.view" in text


def test_generate_then_sft_then_train_is_a_pipeline(tiny_student_dir, tiny_teacher_dir, arithmetic_file, tmp_path):
    recipe = _recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file)
    responses = tmp_path / "responses.jsonl"
    assert main(["generate", "-c", str(recipe), "--teacher", "t", "--k", "2", "--keep", "all",
                 "--out", str(responses)]) == 0
    rows = [json.loads(x) for x in responses.read_text().splitlines()]
    assert len(rows) == 24 and {"id", "prompt", "response", "correct"} <= set(rows[0])
    # A tiny random teacher is never right, so --keep correct writes nothing but reports it.
    assert main(["generate", "-c", str(recipe), "--teacher", "t", "--k", "1", "--out",
                 str(tmp_path / "none.jsonl")]) == 0
    # SFT on fixed responses makes them likely under the student.
    fixed = write_jsonl(tmp_path / "fixed.jsonl", [{"prompt": f"{i}+1=", "response": "7"} for i in range(6)])
    out = tmp_path / "sft_student"
    assert main(["sft", "-c", str(recipe), "--data", str(fixed), "--out", str(out), "sft.steps=30",
                 "sft.lr=1e-2", "sft.batch_size=6"]) == 0
    from uniopd.config import ModelConfig
    from uniopd.models.loading import load_model
    from uniopd.models.prompts import render_prompt
    import torch

    lm = load_model(ModelConfig(path=str(out)), trainable=False)
    ids = render_prompt(lm.tokenizer, "3+1=")
    with torch.no_grad():
        probs = torch.softmax(lm.model(torch.tensor([ids])).logits[0, -1], -1)
    assert probs[lm.tokenizer.convert_tokens_to_ids("7")] > 0.5
    assert main(["train", "-c", str(recipe), f"model.path={out}", "trainer.steps=1"]) == 0


def test_sft_bad_response_line_names_file_and_line(tiny_student_dir, tiny_teacher_dir, arithmetic_file, tmp_path,
                                                   capsys):
    recipe = _recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file)
    bad = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "1+1=", "response": "2"}, {"prompt": "2+2="}])
    assert main(["sft", "-c", str(recipe), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "r.jsonl:2: field 'response'" in capsys.readouterr().err
