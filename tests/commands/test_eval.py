"""`uniopd eval --benchmark`: offline benchmarks, given responses, JSON and Markdown tables."""

from __future__ import annotations

import json

import pytest
from helpers import write_jsonl

from uniopd.cli import main
from uniopd.data.benchmarks import BENCHMARKS, benchmark_records


def _eval(tmp_path, *args) -> dict:
    out = tmp_path / "result.json"
    assert main(["eval", *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _humaneval_responses(tmp_path, limit, wrong: bool):
    rows = []
    for rec in benchmark_records("humaneval", limit):
        body = "    return None\n" if wrong else rec.meta["canonical_solution"]
        rows.append({"id": rec.id, "response": body})
    return write_jsonl(tmp_path / ("wrong.jsonl" if wrong else "canonical.jsonl"), rows)


@pytest.mark.parametrize("limit", [pytest.param(None, marks=pytest.mark.slow), 12])
def test_humaneval_canonical_solutions_pass_and_known_wrong_ones_fail(tmp_path, limit):
    extra = ["--limit", str(limit)] if limit else []
    good = _eval(tmp_path, "--benchmark", "humaneval", "--responses",
                 str(_humaneval_responses(tmp_path, limit, wrong=False)), *extra)
    bad = _eval(tmp_path, "--benchmark", "humaneval", "--responses",
                str(_humaneval_responses(tmp_path, limit, wrong=True)), *extra)
    assert good["benchmarks"]["humaneval"]["num_prompts"] == (limit or 164)
    assert good["benchmarks"]["humaneval"]["metrics"]["avg@1"] == 1.0
    assert bad["benchmarks"]["humaneval"]["metrics"]["avg@1"] == 0.0


def test_pass_at_k_and_the_markdown_tables_from_given_responses(tmp_path):
    records = benchmark_records("rg-arithmetic", 4)
    # Record 0: both right; 1: one of two; 2 and 3: none -> avg@2 = (1 + .5) / 4, pass@2 = 2 / 4,
    # pass@1 (unbiased, n = 2) = (1 + .5) / 4.
    right = {0: 2, 1: 1, 2: 0, 3: 0}
    rows = [{"id": r.id, "response": f"Answer: {r.answer}" if j < right[i] else "Answer: 123456789"}
            for i, r in enumerate(records) for j in range(2)]
    responses = write_jsonl(tmp_path / "given.jsonl", rows)
    result = _eval(tmp_path, "--benchmark", "rg-arithmetic", "--limit", "4", "--responses", str(responses))
    metrics = result["benchmarks"]["rg-arithmetic"]["metrics"]
    assert metrics == pytest.approx({"avg@2": 0.375, "pass@1": 0.375, "pass@2": 0.5})
    table = (tmp_path / "result.md").read_text()
    assert "| rg-arithmetic | 37.5 % | 37.5 % | 50.0 % |" in table
    assert "| rg-arithmetic / rg-arithmetic | 37.5 % | 37.5 % | 50.0 % |" in table


def test_every_benchmark_builds_valid_deterministic_records():
    for name in BENCHMARKS:
        a, b = benchmark_records(name, 3), benchmark_records(name, 3)
        assert len(a) == 3 and [r.id for r in a] == [r.id for r in b] and [r.prompt for r in a] == [r.prompt for r in b]


def test_a_model_is_sampled_on_a_benchmark_and_bad_names_are_refused(tmp_path, tiny_student_dir, capsys):
    result = _eval(tmp_path, "--benchmark", "rg-arithmetic", "--limit", "3", "--model", str(tiny_student_dir),
                   "--k", "2", "rollout.max_new_tokens=4", "model.chat_template=false")
    assert result["benchmarks"]["rg-arithmetic"]["num_prompts"] == 3
    assert set(result["benchmarks"]["rg-arithmetic"]["metrics"]) == {"avg@2", "pass@1", "pass@2"}
    assert main(["eval", "--benchmark", "nope", "--responses", "x.jsonl"]) == 2
    assert "--benchmark 'nope': not one of humaneval" in capsys.readouterr().err
