"""Fixed responses as rollouts (`rollout.backend: replay`, `rollout.replay_responses: FILE`).

Lightning OPD trains on responses sampled once (the SFT rollouts, `uniopd generate`'s
format: `id`, `domain`, `prompt`, `response` text) with teacher log-probs computed once over
them (`uniopd cache-teacher`, `teachers.<name>.backend: cache`): no sampling and no teacher
forward in the loop. This engine returns, for each prompt of a step, the first n responses
the file holds for it, tokenised with the student's tokenizer (`response_ids`: the cache
uses the same function, so both sides see the same token ids), and their log-probs under
the current student (one no-grad forward, at `rollout.temperature`): the PPO "old"
log-probs and the student side of the advantage, as a sampling engine would return them.

The responses are not drawn from the current student, so this is off-policy training on a
fixed set; see the README for when that matches on-policy distillation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from uniopd.batch import Sample
from uniopd.config import ConfigError, RolloutConfig
from uniopd.models.forward import build_layout, response_logprobs
from uniopd.models.loading import LoadedModel
from uniopd.models.prompts import render_prompt
from uniopd.rollout.base import EngineSupport, RolloutEngine

log = logging.getLogger(__name__)


def read_responses(path: str | Path, key: str = "rollout.replay_responses") -> list[dict]:
    """Rows of a response file, each checked for the fields replay and the cache need."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key}={str(path)!r}: no such file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(f), (str, list)) for f in ("prompt",)) \
                or not isinstance(row.get("id"), str) or not isinstance(row.get("response"), str):
            raise ConfigError(f"{path}:{n}: a response row needs 'id' (text), 'prompt' and 'response' (text)")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{key}={str(path)!r}: no responses in the file")
    return rows


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def response_ids(tokenizer, row: dict) -> list[int]:
    """The token ids of a response row: its text tokenised, then EOS unless it was cut
    (`"finished": false`); `uniopd generate` writes the text without the EOS it stopped at."""
    ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if row.get("finished", True) else [])


class ReplayEngine(RolloutEngine):
    support = EngineSupport(images=False, weight_sync="shared", trainer_logprobs=True)

    def __init__(self, cfg: RolloutConfig, student: LoadedModel, *, suppress_ids: list[int] | None = None):
        super().__init__(cfg, student, suppress_ids=suppress_ids)
        if not cfg.replay_responses:
            raise ConfigError("rollout.backend=replay needs rollout.replay_responses (a response file)")
        tok = student.tokenizer
        self.by_prompt: dict[tuple[int, ...], list[tuple[list[int], bool]]] = {}
        for row in read_responses(cfg.replay_responses):
            entry = (response_ids(tok, row), row.get("finished", True))
            # The trainer renders prompts with or without the chat template (`model.chat_template`);
            # both renderings point at the row, so either matches.
            keys = {tuple(render_prompt(tok, row["prompt"], chat_template=flag)) for flag in (True, False)}
            for k in keys:
                self.by_prompt.setdefault(k, []).append(entry)

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], n: int, *, multimodal: list | None = None, greedy: bool = False,
               generator: torch.Generator | None = None) -> list[list[Sample]]:
        if greedy:
            raise ConfigError("rollout.backend=replay returns fixed responses; evaluate with rollout.backend=hf")
        chosen = []
        for prompt in prompts:
            rows = self.by_prompt.get(tuple(prompt))
            if rows is None:
                text = self.student.tokenizer.decode(prompt)[-80:]
                raise ConfigError(f"rollout.replay_responses={self.cfg.replay_responses!r} has no response for the "
                                  f"prompt ending {text!r}; replay the file the prompt set was generated with")
            if len(rows) < n:
                raise ConfigError(f"rollout.replay_responses has {len(rows)} responses for a prompt but "
                                  f"rollout.n={n}; lower rollout.n or generate more (uniopd generate --k)")
            chosen.append(rows[:n])
        flat = [(p, ids, fin) for p, rows in zip(prompts, chosen) for ids, fin in rows]
        logps = self._logprobs([p for p, _, _ in flat], [ids for _, ids, _ in flat])
        samples = [Sample(list(p), list(ids), lp, fin) for (p, ids, fin), lp in zip(flat, logps)]
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """log π_student(y_t | x, y<t) at the rollout temperature, in batches of rollout.batch_size."""
        model = self.student.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out: list[list[float]] = []
        try:
            for start in range(0, len(prompts), self.cfg.batch_size):
                ps, rs = prompts[start: start + self.cfg.batch_size], responses[start: start + self.cfg.batch_size]
                layout = build_layout(ps, rs, self.student.tokenizer.pad_token_id, device)
                logp_N, _ = response_logprobs(model, layout, temperature=self.cfg.temperature)
                out.extend(x.tolist() for x in logp_N.float().cpu().split([len(r) for r in rs]))
        finally:
            model.train(was_training)
        return out
