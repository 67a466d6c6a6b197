"""Build the demo's data and models, offline.

Data: two-digit addition (and subtraction) from `reasoning-gym` ("Calculate 61 + 20." → "81").
Teacher: a 3-layer, 128-wide Llama trained by supervised fine-tuning to high accuracy.
Student: a 2-layer, 128-wide Llama given a short SFT warm-up, so it knows the answer format
but is often wrong. Both are ordinary `LlamaForCausalLM` + `PreTrainedTokenizerFast`
directories written by `save_pretrained`, loaded back through `uniopd.models.loading`
exactly like a real checkpoint. Built models are cached by a hash of their recipe.

A build stops on validation accuracy, not on a step count: SFT from scratch is chaotic
(a change in the floating-point order of the backward pass moved a 270-step student from
22 % to 11 % held-out accuracy), and how much OPD can lift a student depends on where it
starts. Evaluating every `eval_every` steps on validation prompts (disjoint from the
held-out set) and stopping at `target_acc` lands each build at the same strength. The
validation prompts all occur among the SFT prompts too (SFT draws 20,000 from a few
thousand two-digit problems), so validation accuracy reads above held-out accuracy.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from uniopd.config import SFTConfig
from uniopd.data.records import PromptRecord
from uniopd.models.loading import LoadedModel
from uniopd.models.prompts import render_prompt
from uniopd.runtime import seed_everything
from uniopd.train.sft import sft_train


def default_cache_dir() -> Path:
    base = os.environ.get("UNIOPD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "uniopd")
    return Path(base).expanduser()


DIGITS = 2
EVAL_SEED = 424_242


OPERATORS = {"addition": "+", "subtraction": "-"}  # demo task (= record domain) -> operator


def arithmetic_records(n: int, *, seed: int, digits: int = DIGITS, prefix: str = "add", task: str = "addition",
                       exclude: set[str] | frozenset[str] = frozenset()) -> list[PromptRecord]:
    """n two-term problems ("Calculate 61 + 20." -> "81") from reasoning-gym's basic_arithmetic.

    The generator draws each term from 0..10**digits, so terms of different lengths
    ("Calculate 7 + 58.") are mixed in; we keep only problems whose terms all have exactly
    `digits` digits, and for subtraction only those with a non-negative result (prompt and
    answer untouched, as reasoning-gym wrote them). Fixed-width operands put every digit at
    a fixed offset, which a tiny char-level model learns several times faster. Prompts in
    `exclude` (the held-out set) are skipped. The record's domain is the task name.
    """
    import reasoning_gym as rg

    if task not in OPERATORS:
        raise ValueError(f"unknown demo task {task!r} (choose from {sorted(OPERATORS)})")
    op = OPERATORS[task]
    lo, hi = 10 ** (digits - 1), 10 ** digits
    ds = rg.create_dataset("basic_arithmetic", min_terms=2, max_terms=2, min_digits=digits, max_digits=digits,
                           operators=(op,), allow_parentheses=False, allow_negation=False, size=8 * n + 100,
                           seed=seed)
    out: list[PromptRecord] = []
    for i in range(len(ds)):
        item = ds[i]
        terms = [int(t) for t in item["metadata"]["expression"].split(op)]
        if not all(lo <= t < hi for t in terms) or int(item["answer"]) < 0 or item["question"] in exclude:
            continue
        out.append(PromptRecord(id=f"{prefix}-{seed}-{i}", domain=task, prompt=item["question"],
                                answer=str(item["answer"]), verifier="exact"))
        if len(out) == n:
            return out
    raise RuntimeError(f"reasoning-gym gave only {len(out)} of {n} {digits}-digit {task} problems (seed {seed})")


def heldout_records(n: int = 300, task: str = "addition") -> list[PromptRecord]:
    """The fixed held-out set of a task; never used for SFT or OPD."""
    return arithmetic_records(n, seed=EVAL_SEED, prefix=f"heldout-{task}", task=task)


def mixed_records(n: int, *, seed: int, tasks: tuple[str, ...], prefix: str) -> list[PromptRecord]:
    """n records split evenly over tasks, interleaved, none of them held out."""
    per_task = [arithmetic_records(-(-n // len(tasks)), seed=seed, prefix=f"{prefix}-{task}", task=task,
                                   exclude={r.prompt for r in heldout_records(task=task)}) for task in tasks]
    return [recs[i] for i in range(len(per_task[0])) for recs in per_task][:n]


@dataclass
class TinyModelSpec:
    layers: int
    hidden: int
    heads: int
    sft_steps: int
    sft_examples: int
    lr: float
    batch_size: int = 128
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr (1.0: constant after warm-up)
    seed: int = 0
    tasks: tuple[str, ...] = ("addition",)  # SFT data, split evenly
    target_acc: float | None = None  # stop SFT once greedy validation accuracy reaches this
    eval_every: int = 10
    # Share of the SFT problems with a carry whose answer drops the carry (`noisy_labels`).
    label_noise: float = 0.0
    # target_acc must hold on every task, not only on the mix: a mixed student can reach 20 %
    # overall while one task still sits on the plateau that OPD cannot lift it from.
    each_task: bool = False

    def key(self, kind: str) -> str:
        recipe = asdict(self)
        for name, default in (("label_noise", 0.0), ("each_task", False)):
            if recipe[name] == default:
                del recipe[name]  # builds from before the field keep their cache key
        blob = json.dumps({"kind": kind, "v": 4, "digits": DIGITS, "eval_seed": EVAL_SEED, **recipe}, sort_keys=True)
        return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# lr 1e-3: at 3e-3 the same models sat on a ~10 % plateau for a few hundred to over 800
# steps depending on the seed; at 1e-3 they left it between steps 175 and 350 on every seed
# we tried (3 student seeds, 2 teacher seeds).
TEACHER = TinyModelSpec(layers=3, hidden=128, heads=4, sft_steps=900, sft_examples=20_000, lr=1e-3,
                        target_acc=0.98)
STUDENT = TinyModelSpec(layers=2, hidden=128, heads=4, sft_steps=600, sft_examples=20_000, lr=1e-3,
                        min_lr_ratio=1.0, target_acc=0.2)


def tiny_llama(tokenizer, spec: TinyModelSpec) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.heads, max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def validation_records(tasks: tuple[str, ...], n: int = 200) -> list[PromptRecord]:
    """Prompts a build checks its accuracy on: not held out, not from the OPD training seeds."""
    return mixed_records(n, seed=20_000, tasks=tasks, prefix="val")


def greedy_accuracy(loaded: LoadedModel, records: list[PromptRecord]) -> dict[str, float]:
    """Greedy accuracy on records, per domain and "all" (the demo's answers are at most 6 tokens)."""
    from uniopd.config import load_config
    from uniopd.evaluate import evaluate_model

    cfg = load_config(None, ["rollout.max_new_tokens=6", "rollout.batch_size=512", "model.chat_template=false"])
    # generate() puts the model in eval mode and hands it back in the mode it found it.
    res = evaluate_model(loaded, records, cfg.rollout, cfg.model, cfg.data, greedy=True, progress=False)
    return {"all": res["metrics"]["avg@1"], **{d: m["avg@1"] for d, m in res["per_domain"].items()}}


def dropped_carry(record: PromptRecord) -> str | None:
    """The answer with the carry (addition) or borrow (subtraction) of the ones digit
    forgotten, e.g. 57 + 25 -> 72 and 52 - 17 -> 45; None when the problem has none."""
    match = re.search(r"(\d+) ([+-]) (\d+)", record.prompt)
    if match is None:
        return None
    a, op, b = int(match[1]), match[2], int(match[3])
    if op == "+" and a % 10 + b % 10 >= 10:
        return str(a + b - 10)
    if op == "-" and a % 10 < b % 10:
        return str(a - b + 10)
    return None


def noisy_labels(records: list[PromptRecord], rate: float, *, seed: int) -> list[PromptRecord]:
    """records where a `rate` share of the problems with a carry get the carry dropped.

    A systematic slip, not random noise: a teacher trained on it is torn between the right
    answer and one particular wrong one on every carry problem, so its token scores can rank
    a student's slip as high as the right answer."""
    if not rate:
        return records
    rng = random.Random(seed)
    out = []
    for r in records:
        wrong = dropped_carry(r)
        if wrong is not None and rng.random() < rate:
            r = PromptRecord(**{**r.__dict__, "answer": wrong})
        out.append(r)
    return out


def validation_score(accuracy: dict[str, float], spec: TinyModelSpec) -> float:
    """What a build compares with target_acc: overall accuracy, or the weakest task's."""
    if spec.each_task:
        return min(accuracy.get(t, 0.0) for t in spec.tasks)
    return accuracy.get("all", 0.0)


def sft_pairs(records: list[PromptRecord], tokenizer) -> list[tuple[list[int], list[int]]]:
    return [(render_prompt(tokenizer, r.prompt), tokenizer(r.answer, add_special_tokens=False)["input_ids"]
             + [tokenizer.eos_token_id]) for r in records]


def is_built(kind: str, spec: TinyModelSpec, cache_dir: Path) -> bool:
    """Whether `build_model` would take this model from the cache."""
    path = cache_dir / spec.key(kind)
    return (path / "config.json").exists() and (path / "built.ok").exists()


def build_model(kind: str, spec: TinyModelSpec, cache_dir: Path, *, progress: bool = True,
                log=print) -> tuple[Path, bool]:
    """Directory of the built model; (path, True) when it came from the cache."""
    from uniopd.demo.tokenizer import char_tokenizer

    path = cache_dir / spec.key(kind)
    if is_built(kind, spec, cache_dir):
        return path, True
    log(f"building the {kind} ({spec.layers} layers, width {spec.hidden}, {spec.sft_steps} SFT steps on "
        f"{' + '.join(spec.tasks)})...")
    seed_everything(spec.seed)
    tokenizer = char_tokenizer()
    model = tiny_llama(tokenizer, spec)
    # A seed far from the OPD/eval seeds; held-out prompts are excluded as well.
    records = mixed_records(spec.sft_examples, seed=10_000 + spec.seed, tasks=tuple(spec.tasks), prefix=f"sft-{kind}")
    pairs = sft_pairs(noisy_labels(records, spec.label_noise, seed=spec.seed), tokenizer)
    loaded = LoadedModel(model, tokenizer, kind)
    val = validation_records(tuple(spec.tasks)) if spec.target_acc is not None else []
    reached: dict[str, float] = {}

    def reached_target(step: int) -> bool:
        if spec.target_acc is None or step % spec.eval_every:
            return False
        reached.update(greedy_accuracy(loaded, val), step=step)
        return validation_score(reached, spec) >= spec.target_acc

    losses = sft_train(loaded, pairs, SFTConfig(steps=spec.sft_steps, batch_size=spec.batch_size, lr=spec.lr,
                                                warmup_steps=50, min_lr_ratio=spec.min_lr_ratio),
                       seed=spec.seed, progress=progress, should_stop=reached_target)
    if spec.target_acc is not None:
        how = "reached" if validation_score(reached, spec) >= spec.target_acc else "did not reach"
        per_task = ", ".join(f"{t} {reached.get(t, 0.0):.1%}" for t in spec.tasks) if len(spec.tasks) > 1 else ""
        log(f"{kind}: {how} validation accuracy {spec.target_acc:.0%}{' on every task' if spec.each_task else ''} "
            f"after {len(losses)} SFT steps ({reached.get('all', 0.0):.1%}{'; ' + per_task if per_task else ''})")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "built.ok").write_text(json.dumps({"sft_steps": len(losses), "final_loss": losses[-1],
                                              "validation": reached}) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path, False


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
