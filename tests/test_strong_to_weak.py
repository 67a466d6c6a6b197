"""Strong-to-weak: a larger teacher with the same tokenizer but a head padded to another size.

Real pairs look like this: Qwen2.5-7B-Instruct (152,064 head rows) teaching Qwen2.5-1.5B-Instruct
(151,936 rows), one 151,665-token tokenizer. Here the tokenizer has 100 tokens, the student's head
112 rows and the wider, deeper teacher's 128. Padded rows are not tokens: they must never be sampled,
and rollout, update and teacher scoring must all use the distribution over the real vocabulary.
"""

import json
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_model
from uniopd.cli import main
from uniopd.config import ModelConfig, RolloutConfig
from uniopd.demo.tokenizer import char_tokenizer
from uniopd.models.forward import build_layout, output_head, response_logprobs, vocab_limit
from uniopd.models.loading import VocabularyMismatch, check_vocabularies, load_model
from uniopd.rollout.hf import generate

ROOT = Path(__file__).resolve().parent.parent
VOCAB = len(char_tokenizer())  # 100


@pytest.fixture(scope="module")
def padded_student(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("s2w_student"), hidden=32, seed=1, vocab_size=VOCAB + 12)


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("s2w_teacher"), layers=3, hidden=64, seed=2,
                           vocab_size=VOCAB + 28)


def _swapped_tokenizer():
    """The char tokenizer with the ids of 'a' and 'b' exchanged: same size, different ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(char_tokenizer().backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left")


def _extended_tokenizer():
    tok = char_tokenizer()
    tok.add_tokens(["<extra>"])
    return tok


def test_padded_heads_pass_the_vocabulary_check_and_are_cut_to_the_tokenizer(padded_student, padded_teacher):
    student = load_model(ModelConfig(path=str(padded_student)))
    teacher = load_model(ModelConfig(path=str(padded_teacher)), trainable=False)
    assert student.model.get_output_embeddings().weight.shape[0] == VOCAB + 12
    assert teacher.model.get_output_embeddings().weight.shape[0] == VOCAB + 28
    check_vocabularies(student, teacher, "big")  # the tokenizers agree: no error
    assert vocab_limit(student.model) == vocab_limit(teacher.model) == VOCAB
    assert output_head(student.model).shape[0] == output_head(teacher.model).shape[0] == VOCAB


def test_an_unpadded_head_is_left_alone(tiny_student_dir):
    loaded = load_model(ModelConfig(path=str(tiny_student_dir)))
    assert vocab_limit(loaded.model) is None
    assert output_head(loaded.model) is loaded.model.get_output_embeddings().weight


def test_rollout_never_samples_padded_ids_and_its_logprobs_match_the_update(padded_student):
    student = load_model(ModelConfig(path=str(padded_student)))
    # Unrestricted, this random model puts about a third of its samples on the 12 padded ids.
    head = student.model.get_output_embeddings().weight
    assert head[VOCAB:].abs().sum() > 0
    prompts = [[1, 40, 41, 42], [1, 50, 51]]
    groups = generate(student.model, prompts, RolloutConfig(max_new_tokens=16), n=8, eos_ids={2}, pad_id=0,
                      generator=torch.Generator().manual_seed(0))
    samples = [s for g in groups for s in g]
    assert all(t < VOCAB for s in samples for t in s.response_ids)
    assert sum(len(s.response_ids) for s in samples) > 100
    # The update's log-probs (same restricted distribution) equal the rollout's.
    layout = build_layout([s.prompt_ids for s in samples], [s.response_ids for s in samples], 0)
    with torch.no_grad():
        logp_N, hidden_NH = response_logprobs(student.model, layout, return_hidden=True)
    rollout_N = torch.tensor([lp for s in samples for lp in s.logprobs])
    assert torch.allclose(logp_N, rollout_N, atol=1e-4)
    # ... and are log-softmax over the tokenizer's 100 tokens, not the 112 rows.
    by_hand = torch.log_softmax(hidden_NH @ head[:VOCAB].T, -1).gather(-1, layout.target_ids_N[:, None])[:, 0]
    assert torch.allclose(logp_N, by_hand, atol=1e-5)


def _train(student, teacher, data, out, *extra):
    overrides = [f"model.path={student}", f"teachers.big.path={teacher}", f"data.train={data}",
                 "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=6",
                 "trainer.micro_batch_size=8", "trainer.lr=1e-3", "trainer.steps=2", f"trainer.output_dir={out}",
                 "logging.progress=false", "logging.tensorboard=false", *extra]
    return main(["train", "-c", str(ROOT / "recipes" / "strong_to_weak.yaml"), *overrides])


@pytest.mark.parametrize("kind", ["sampled", "full"])
def test_strong_to_weak_trains_with_sampled_and_dense_losses(padded_student, padded_teacher, arithmetic_file,
                                                             tmp_path, kind):
    assert _train(padded_student, padded_teacher, arithmetic_file, tmp_path / "run", f"loss.kind={kind}") == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2
    for row in rows:
        assert row["update/tokens"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
        assert "teacher_kl" in row
    if kind == "full":
        assert all(row["dense_loss"] != 0 for row in rows)
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert samples  # responses decoded from real token ids only


@pytest.mark.parametrize("tokenizer,expect", [(_swapped_tokenizer, "different ids: \\['a', 'b'\\]|different ids"),
                                              (_extended_tokenizer, "only in teacher: \\['<extra>'\\]")])
def test_a_teacher_with_another_tokenizer_fails_before_training(padded_student, arithmetic_file, tmp_path, capsys,
                                                               tokenizer, expect):
    other = make_tiny_model(tmp_path / "other", layers=3, hidden=64, seed=3, tokenizer=tokenizer(),
                            vocab_size=VOCAB + 28)
    assert _train(padded_student, other, arithmetic_file, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "teacher 'big'" in err and "different vocabularies" in err
    assert __import__("re").search(expect, err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(VocabularyMismatch):
        check_vocabularies(load_model(ModelConfig(path=str(padded_student))),
                           load_model(ModelConfig(path=str(other)), trainable=False), "big")


def test_padded_student_teacher_scores_use_the_real_vocabulary(padded_student, padded_teacher, arithmetic_file):
    """The teacher's sampled-token log-probs are normalised over the same 100 tokens as the student's."""
    from uniopd.config import TeacherConfig
    from uniopd.data import load_records
    from uniopd.teachers.local import LocalTeacher

    loaded = load_model(ModelConfig(path=str(padded_teacher)), trainable=False)
    teacher = LocalTeacher("big", TeacherConfig(path=str(padded_teacher), domains=["*"]), loaded)
    record = load_records(arithmetic_file).records[0]
    response = [40, 41, 42, 2]
    logp = teacher.score([record], [response]).logp_N
    layout = build_layout([teacher.prompt_ids(record)], [response], 0)
    from uniopd.models.forward import response_hidden

    with torch.no_grad():
        h = response_hidden(loaded.model, layout)
    full = loaded.model.get_output_embeddings().weight
    by_hand = torch.log_softmax(h @ full[:VOCAB].T, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
    assert torch.allclose(logp, by_hand, atol=1e-5)
