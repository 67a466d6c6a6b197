import os
import shutil
import subprocess
import sys

import pytest

from uniopd.config import ModelConfig
from uniopd.models.loading import ModelLoadError, load_model


def test_local_directory_loads_with_pad_and_left_padding(tiny_student_dir):
    lm = load_model(ModelConfig(path=str(tiny_student_dir)))
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token_id is not None
    assert lm.model.training and lm.vocab_size == len(lm.tokenizer)
    frozen = load_model(ModelConfig(path=str(tiny_student_dir)), trainable=False)
    assert not any(p.requires_grad for p in frozen.model.parameters())


def test_missing_path_names_the_config_key(tmp_path):
    with pytest.raises(ModelLoadError, match=r"teachers.math.path='/nope/model': .*does not exist"):
        load_model(ModelConfig(path="/nope/model"), "teachers.math")
    with pytest.raises(ModelLoadError, match="model.path is empty"):
        load_model(ModelConfig(path=""))


def test_hub_id_resolves_through_the_hub_cache_offline(tiny_student_dir, tmp_path):
    """A hub id goes through huggingface_hub's real resolution; here from a populated cache, offline."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--uniopd-test--tiny-student"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_student_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    code = ("from uniopd.config import ModelConfig; from uniopd.models.loading import load_model; "
            "lm = load_model(ModelConfig(path='uniopd-test/tiny-student')); print(type(lm.model).__name__)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("LlamaForCausalLM")
    # an id that is not cached fails offline with the key and the id in the message
    code_missing = code.replace("uniopd-test/tiny-student", "uniopd-test/absent")
    out = subprocess.run([sys.executable, "-c", code_missing], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "model.path='uniopd-test/absent'" in out.stderr
