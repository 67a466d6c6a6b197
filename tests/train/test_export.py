"""`uniopd export`: a full or a sharded (2-process DCP) checkpoint becomes a plain
save_pretrained directory that transformers and `uniopd eval` load, with the trained logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dp_runs import dp_args, train
from helpers import write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from uniopd.cli import main
from uniopd.train.checkpoint import checkpoint_format, find_resumable
from uniopd.train.sharded_checkpoint import load_sharded


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_student_dir, tiny_teacher_dir):
    """The same 2 steps in one process (full checkpoint) and in 2 sharded processes (DCP)."""
    root = tmp_path_factory.mktemp("export")
    args = dp_args(root, tiny_student_dir, tiny_teacher_dir) + ["trainer.steps=2"]
    train(args, root / "full")
    train(args + ["trainer.student_sharding=shard"], root / "sharded", nproc=2)
    assert checkpoint_format(find_resumable(root / "sharded")) == "sharded"
    return root


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids_BT = torch.arange(3, 20).view(1, -1)
    with torch.no_grad():
        return model(input_ids=ids_BT).logits


def test_a_sharded_checkpoint_exports_to_a_model_with_the_trained_logits(runs, tiny_student_dir, capsys):
    out = runs / "exported_sharded"
    assert main(["export", str(runs / "sharded"), str(out)]) == 0  # a run directory: its newest checkpoint
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "sharded"
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not {"trainer_state.pt", "manifest.json", "dcp"} & {p.name for p in out.iterdir()}
    exported = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    # The trained model: the checkpoint loaded into a live student, as --resume does.
    trained = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    load_sharded(find_resumable(runs / "sharded"), trained, no_dist=True)
    assert torch.equal(_logits(exported), _logits(trained))
    # And the same training in one process, within the tolerance of the data-parallel tests.
    one = AutoModelForCausalLM.from_pretrained(find_resumable(runs / "full"))
    assert float((_logits(exported) - _logits(one)).abs().max()) < 1e-4


def test_a_full_checkpoint_exports_its_model_files(runs):
    ckpt = find_resumable(runs / "full")
    out = runs / "exported_full"
    assert main(["export", str(ckpt), str(out)]) == 0
    assert not {"trainer_state.pt", "manifest.json"} & {p.name for p in out.iterdir()}
    weights, source = load_file(str(out / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert weights.keys() == source.keys() and all(torch.equal(weights[k], source[k]) for k in weights)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(
        AutoModelForCausalLM.from_pretrained(ckpt)))


def test_uniopd_eval_loads_an_exported_model(runs, tmp_path, capsys):
    out = runs / "exported_for_eval"
    assert main(["export", str(runs / "sharded"), str(out)]) == 0
    data = write_jsonl(tmp_path / "eval.jsonl", [{"id": "q", "domain": "arithmetic", "prompt": "1+2=", "answer": "3",
                                                  "verifier": "exact"}])
    assert main(["eval", "--model", str(out), "--data", str(data),
                 "--out", str(tmp_path / "eval.json"), "rollout.max_new_tokens=4"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["model"] == str(out)
    # The checkpoint itself is not a model directory: the error says how to make one.
    assert main(["eval", "--model", str(find_resumable(runs / "sharded")), "--data", str(data)]) == 2
    assert "a sharded training checkpoint" in capsys.readouterr().err


def test_export_refuses_what_it_cannot_do_and_leaves_nothing_half_written(runs, tmp_path, monkeypatch, capsys):
    from uniopd.train import export

    taken = tmp_path / "taken"
    taken.mkdir()
    assert main(["export", str(runs / "sharded"), str(taken)]) == 2
    assert f"{taken} exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "m")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    ckpt = tmp_path / "step_000002"
    shutil.copytree(find_resumable(runs / "sharded"), ckpt)
    next((ckpt / "dcp").glob("*.distcp")).write_bytes(b"torn")
    assert main(["export", str(ckpt), str(tmp_path / "m")]) == 2
    assert "does not match its recorded SHA-256" in capsys.readouterr().err

    def fails(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "load_full_model_state", fails)
    assert main(["export", str(runs / "sharded"), str(tmp_path / "m")]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".m", "m"))]
