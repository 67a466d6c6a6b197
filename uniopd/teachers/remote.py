"""Teachers behind inference servers (`teachers.<name>.backend: remote`).

The teacher's view is rendered here, on the client, with the teacher's own tokenizer and chat
template (`uniopd.teachers.views.TeacherPrompts`, the renderer the in-process teacher uses),
so a server scores exactly prompt ids + response ids and never re-tokenises text. Only the
tokenizer is loaded in the trainer's process; the weights live on the servers.

APIs (`teachers.<name>.api`):

vllm    POST /v1/completions {"prompt": [token ids], "max_tokens": 1, "prompt_logprobs": k}:
        per prompt position a dict {token id: {"logprob", "rank"}} with the actual token and
        the top-k (k = 0: the actual token only). `vllm serve` and `uniopd serve-teacher`.
sglang  POST /generate {"input_ids", "sampling_params": {"max_new_tokens": 0},
        "return_logprob": true, "logprob_start_len", "top_logprobs_num"}: meta_info's
        input_token_logprobs / input_top_logprobs ([logprob, token id, text] triples). Written
        from SGLang's documented API; no SGLang server could run where this was built.
uniopd  POST /v1/score {"sequences", "starts", "top_k"}: `uniopd serve-teacher`'s compact form
        (plain arrays of the response positions only).

Requests carry `request_batch` sequences each, `concurrency` run at once on a pooled HTTP
client, round-robin over `urls`; a request that fails (connection refused, timeout, HTTP
408/429/5xx) is retried on the next URL after an exponentially growing, jittered delay.

Failure policy: an answer is checked before it is used (one log-prob per response token,
all finite and <= 0, the right token ids, top-k ids inside the vocabulary, top-k sorted and
finite). A request that still fails after its retries, or whose answer fails a check, marks
its sequences not ok (`TeacherScores.ok_S`): the trainer gives them no teacher signal and
stops past `max_failed_share`. At start-up every reachable server's tokenisation of a probe
string must equal the client's, or the run is refused.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import torch

from uniopd.config import ConfigError, TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.loading import check_vocabularies, load_tokenizer
from uniopd.teachers.base import LOGP, TOPK, ScorerContext, TeacherScorer, TeacherScores, TeacherServiceError
from uniopd.teachers.views import TeacherPrompts

log = logging.getLogger(__name__)

DEFAULTS = {"api": "vllm", "timeout_s": 60.0, "retries": 3, "backoff_s": 0.5, "concurrency": 8, "request_batch": 4}
MAX_BACKOFF_S = 30.0
# Digits, spacing, punctuation, accents and CJK: where tokenizers of one family still differ.
PROBE_TEXT = "Probe: 12+34=46; x_1 -> y [ok]!\n\tCafé déjà vu, naïve 你好世界 ÆØÅ ∑∫ 🙂"


class InvalidAnswer(ValueError):
    """A server answered, but not with usable log-probs for the sequence asked about."""


class RequestFailed(RuntimeError):
    """A request failed after its retries."""


def _finite_logprob(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidAnswer(f"{where}: log-prob {value!r} is not a number")
    value = float(value)
    if not math.isfinite(value) or value > 1e-4:
        raise InvalidAnswer(f"{where}: log-prob {value!r} is not a finite number <= 0")
    return min(value, 0.0)


class RemoteTeacher(TeacherScorer):
    options = frozenset({"urls", "api", "served_model", "api_key_env", "timeout_s", "retries", "backoff_s",
                         "concurrency", "request_batch"})

    def __init__(self, name: str, cfg: TeacherConfig, tokenizer, *, connect: bool = True):
        super().__init__(name, cfg)
        if not cfg.urls:
            raise ConfigError(f"teachers.{name}.urls: a remote teacher needs one or more server URLs")
        opt = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v for k, v in DEFAULTS.items()}
        self.api, self.timeout_s, self.retries = opt["api"], float(opt["timeout_s"]), int(opt["retries"])
        self.backoff_s, self.request_batch = float(opt["backoff_s"]), int(opt["request_batch"])
        self.urls = [u.rstrip("/") for u in cfg.urls]
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.prompts = TeacherPrompts(cfg, tokenizer)
        self.model_name = cfg.served_model
        headers = {}
        if cfg.api_key_env:
            token = os.environ.get(cfg.api_key_env)
            if not token:
                raise ConfigError(f"teachers.{name}.api_key_env={cfg.api_key_env!r}: the variable is not set")
            headers["Authorization"] = f"Bearer {token}"
        import httpx

        self._httpx = httpx
        concurrency = int(opt["concurrency"])
        self._client = httpx.Client(headers=headers, limits=httpx.Limits(max_connections=concurrency,
                                                        max_keepalive_connections=concurrency))
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"teacher-{name}")
        self._next = itertools.count()
        self._lock = threading.Lock()
        # Jitter from its own stream: the run's seeded random state must not depend on server timing.
        self._jitter = random.Random()
        self._stats = {"retries": 0, "failed_requests": 0}
        if connect:
            self.connect()

    @classmethod
    def outputs(cls, cfg: TeacherConfig) -> frozenset[str]:
        return frozenset({LOGP, TOPK}) if cfg.top_k else frozenset({LOGP})

    @classmethod
    def from_config(cls, name: str, cfg: TeacherConfig, ctx: ScorerContext) -> "RemoteTeacher":
        if ctx.suppress_ids:
            raise ConfigError(f"teachers.{name}.backend=remote: a served teacher cannot restrict its distribution "
                              f"to a vision-language student's non-image tokens yet; use backend=local")
        tokenizer = load_tokenizer(cfg, f"teachers.{name}")
        # The vocabulary check needs only the tokenizers; the weights stay on the servers.
        check_vocabularies(ctx.student, types.SimpleNamespace(tokenizer=tokenizer, source=cfg.path), name)
        return cls(name, cfg, tokenizer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # ------------------------------------------------------------------ transport
    def _url(self) -> str:
        with self._lock:
            return self.urls[next(self._next) % len(self.urls)]

    def _request(self, method: str, path: str, body: dict | None = None, *, url: str | None = None,
                 retries: int | None = None):
        """JSON of a 200 answer; retried with backoff + jitter on the next URL; RequestFailed after."""
        retries = self.retries if retries is None else retries
        last = ""
        for attempt in range(retries + 1):
            base = url or self._url()
            try:
                reply = self._client.request(method, base + path, json=body, timeout=self.timeout_s)
            except self._httpx.HTTPError as exc:  # refused, reset, timed out
                last = f"{base}{path}: {type(exc).__name__}: {exc}"
            else:
                if reply.status_code == 200:
                    try:
                        return reply.json()
                    except ValueError as exc:
                        raise InvalidAnswer(f"{base}{path}: the answer is not JSON ({exc})") from None
                last = f"{base}{path}: HTTP {reply.status_code}: {reply.text[:300]}"
                if reply.status_code not in (408, 429) and reply.status_code < 500:
                    break  # the request itself is wrong; another try would get the same answer
            if attempt < retries:
                with self._lock:
                    self._stats["retries"] += 1
                delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** attempt)
                time.sleep(delay * self._jitter.uniform(0.5, 1.0))
        raise RequestFailed(last)

    # ------------------------------------------------------------------ start-up checks
    def connect(self) -> None:
        """Find the served model and compare each reachable server's tokenisation of a probe."""
        expected = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        reachable, problems = [], []
        for url in self.urls:
            try:
                if self.api != "sglang" and self.model_name is None:
                    models = self._request("GET", "/v1/models", url=url)
                    self.model_name = models["data"][0]["id"]
                got = self._probe(url)
            except (RequestFailed, InvalidAnswer, KeyError, IndexError, TypeError) as exc:
                problems.append(f"{url}: {exc}")
                continue
            if got != expected:
                first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                raise TeacherServiceError(
                    f"teachers.{self.name}: the server at {url} tokenises differently from the client's tokenizer "
                    f"(teachers.{self.name}.path={self.cfg.path!r}): probe {PROBE_TEXT!r} -> {len(got)} ids, "
                    f"client {len(expected)} ids, first difference at position {first} "
                    f"(server {got[first:first + 4]}, client {expected[first:first + 4]}); serve the same tokenizer")
            reachable.append(url)
        if not reachable:
            raise TeacherServiceError(f"teachers.{self.name}: no server answered at start-up: " + "; ".join(problems))
        for problem in problems:
            log.warning("teachers.%s: %s (kept in the rotation; its rows are retried elsewhere)", self.name, problem)

    def _probe(self, url: str) -> list[int]:
        if self.api == "sglang":
            reply = self._request("POST", "/generate", {
                "text": PROBE_TEXT, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                "logprob_start_len": 0}, url=url)
            ids = [int(entry[1]) for entry in reply["meta_info"]["input_token_logprobs"]]
            bos = self.tokenizer.bos_token_id
            return ids[1:] if ids and bos is not None and ids[0] == bos else ids  # SGLang adds BOS to text
        reply = self._request("POST", "/tokenize", {"model": self.model_name, "prompt": PROBE_TEXT,
                                                    "add_special_tokens": False}, url=url)
        return [int(t) for t in reply["tokens"]]

    # ------------------------------------------------------------------ scoring
    def score(self, records: list[PromptRecord], responses: list[list[int]], *,
              want: frozenset[str] = frozenset({LOGP})) -> TeacherScores:
        self.check_want(want)
        k = self.cfg.top_k if TOPK in want else 0
        prompts = [self.prompts.ids(r) for r in records]
        todo = [i for i, resp in enumerate(responses) if resp]  # an empty response has nothing to score
        groups = [todo[i: i + self.request_batch] for i in range(0, len(todo), self.request_batch)]
        before = dict(self._stats)
        t = time.perf_counter()
        futures = [self._pool.submit(self._score_group, [prompts[i] for i in g], [responses[i] for i in g], k)
                   for g in groups]
        replies: dict[int, tuple] = {}
        errors: list[str] = []
        latencies = []
        for group, future in zip(groups, futures):
            answers, seconds, error = future.result()
            latencies.append(seconds)
            if error:
                errors.append(error)
            for i, answer in zip(group, answers):
                if answer is not None:
                    replies[i] = answer
        ok_S = torch.tensor([not responses[i] or i in replies for i in range(len(responses))], dtype=torch.bool)
        logps, ids, tops = [], [], []
        for i, resp in enumerate(responses):
            logp_T, ids_TK, logp_TK = replies.get(i) or (torch.zeros(len(resp)), torch.zeros(len(resp), k, dtype=torch.long),
                                                         torch.zeros(len(resp), k))
            logps.append(logp_T)
            ids.append(ids_TK)
            tops.append(logp_TK)
        if errors:
            log.warning("teacher %r: %d of %d sequences got no usable answer: %s", self.name, int((~ok_S).sum()),
                        len(responses), errors[0])
        metrics = {"retries": float(self._stats["retries"] - before["retries"]),
                   "failed_requests": float(self._stats["failed_requests"] - before["failed_requests"]),
                   "request_latency_s": sum(latencies) / max(len(latencies), 1),
                   "wall_s": time.perf_counter() - t}
        cat = lambda xs, empty: torch.cat(xs) if xs else empty  # noqa: E731
        return TeacherScores(cat(logps, torch.zeros(0)),
                             topk_ids_NK=cat(ids, torch.zeros(0, k, dtype=torch.long)) if k else None,
                             topk_logp_NK=cat(tops, torch.zeros(0, k)) if k else None,
                             ok_S=None if bool(ok_S.all()) else ok_S, error=errors[0] if errors else None,
                             metrics=metrics)

    def _score_group(self, prompts: list[list[int]], responses: list[list[int]], k: int):
        """(one answer or None per sequence, seconds, first error or None). Never raises."""
        t = time.perf_counter()
        try:
            reply = self._request("POST", *self._body(prompts, responses, k))
            answers, error = self._parse(reply, prompts, responses, k)
        except (RequestFailed, InvalidAnswer) as exc:
            answers, error = [None] * len(prompts), str(exc)
        if error:
            with self._lock:
                self._stats["failed_requests"] += 1
        return answers, time.perf_counter() - t, error

    def _body(self, prompts: list[list[int]], responses: list[list[int]], k: int) -> tuple[str, dict]:
        seqs = [p + r for p, r in zip(prompts, responses)]
        if self.api == "vllm":
            return "/v1/completions", {"model": self.model_name, "prompt": seqs, "max_tokens": 1,
                                       "temperature": 0.0, "prompt_logprobs": k}
        if self.api == "uniopd":
            return "/v1/score", {"model": self.model_name, "sequences": seqs, "starts": [len(p) for p in prompts],
                                 "top_k": k}
        # SGLang scores each input from logprob_start_len on; one batch shares it, so start at
        # the shortest prompt's last position and keep each sequence's last len(response) entries.
        start = max(min(len(p) for p in prompts) - 1, 0)
        return "/generate", {"input_ids": seqs, "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                             "return_logprob": True, "logprob_start_len": start, "top_logprobs_num": k}

    def _parse(self, reply, prompts, responses, k: int) -> tuple[list, str | None]:
        """Checked answers, one per sequence (None where its part of the reply is unusable)."""
        parsers = {"vllm": self._parse_vllm, "uniopd": self._parse_uniopd, "sglang": self._parse_sglang}
        try:
            parts = parsers[self.api](reply, len(prompts))
        except (InvalidAnswer, KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            return [None] * len(prompts), f"unusable answer from the server: {type(exc).__name__}: {exc}"
        answers, error = [], None
        for s, (part, prompt, response) in enumerate(zip(parts, prompts, responses)):
            try:
                answers.append(self._check(part, prompt, response, k, f"sequence {s}"))
            except (InvalidAnswer, KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                answers.append(None)
                error = error or f"unusable answer from the server: {exc}"
        return answers, error

    def _parse_vllm(self, reply, n: int) -> list:
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        if len(choices) != n:
            raise InvalidAnswer(f"{len(choices)} choices for {n} prompts")
        return [("vllm", c["prompt_logprobs"]) for c in choices]

    def _parse_uniopd(self, reply, n: int) -> list:
        if len(reply["logprobs"]) != n:
            raise InvalidAnswer(f"{len(reply['logprobs'])} sequences answered for {n} asked")
        tops = reply.get("topk_ids") or [None] * n
        top_logps = reply.get("topk_logprobs") or [None] * n
        return [("uniopd", (a, b, c)) for a, b, c in zip(reply["logprobs"], tops, top_logps)]

    def _parse_sglang(self, reply, n: int) -> list:
        items = reply if isinstance(reply, list) else [reply]
        if len(items) != n:
            raise InvalidAnswer(f"{len(items)} answers for {n} inputs")
        return [("sglang", (it["meta_info"]["input_token_logprobs"], it["meta_info"].get("input_top_logprobs")))
                for it in items]

    def _check(self, part, prompt: list[int], response: list[int], k: int, where: str):
        """(logp [R], top-k ids [R, K], top-k logp [R, K]) of the response tokens, or InvalidAnswer."""
        kind, data = part
        R, P = len(response), len(prompt)
        logp, top_ids, top_logp = [], [], []
        if kind == "vllm":
            if not isinstance(data, list) or len(data) != P + R:
                raise InvalidAnswer(f"{where}: {len(data) if isinstance(data, list) else data!r} prompt positions, "
                                    f"expected {P + R}")
            for j, (tok, entry) in enumerate(zip(response, data[P:])):
                if not isinstance(entry, dict) or str(tok) not in entry:
                    raise InvalidAnswer(f"{where}: position {P + j} lacks the log-prob of token {tok}")
                logp.append(_finite_logprob(entry[str(tok)]["logprob"], f"{where}[{j}]"))
                if k:
                    ranked = sorted(((_finite_logprob(v["logprob"], f"{where}[{j}]"), int(t)) for t, v in entry.items()),
                                    key=lambda x: -x[0])[:k]
                    top_logp.append([v for v, _ in ranked])
                    top_ids.append([t for _, t in ranked])
        elif kind == "uniopd":
            values, ids, values_k = data
            if not isinstance(values, list) or len(values) != R:
                raise InvalidAnswer(f"{where}: {len(values) if isinstance(values, list) else values!r} log-probs "
                                    f"for {R} response tokens")
            logp = [_finite_logprob(v, f"{where}[{j}]") for j, v in enumerate(values)]
            if k:
                if not isinstance(ids, list) or not isinstance(values_k, list) or len(ids) != R or len(values_k) != R:
                    raise InvalidAnswer(f"{where}: top-k for {R} response tokens missing or of another length")
                top_ids = [[int(t) for t in row[:k]] for row in ids]
                top_logp = [[_finite_logprob(v, f"{where}[{j}]") for v in row[:k]] for j, row in enumerate(values_k)]
        else:
            tokens, tops = data
            if not isinstance(tokens, list) or len(tokens) < R:
                raise InvalidAnswer(f"{where}: {len(tokens) if isinstance(tokens, list) else tokens!r} input "
                                    f"log-probs for {R} response tokens")
            tail = tokens[len(tokens) - R:]
            if [int(e[1]) for e in tail] != list(response):
                raise InvalidAnswer(f"{where}: the scored token ids are not the response's")
            logp = [_finite_logprob(e[0], f"{where}[{j}]") for j, e in enumerate(tail)]
            if k:
                rows = tops[len(tops) - R:] if isinstance(tops, list) and len(tops) >= R else None
                if rows is None:
                    raise InvalidAnswer(f"{where}: top-k log-probs missing")
                top_ids = [[int(e[1]) for e in row[:k]] for row in rows]
                top_logp = [[_finite_logprob(e[0], f"{where}[{j}]") for e in row[:k]] for j, row in enumerate(rows)]
        if k:
            if any(len(row) != k for row in top_ids) or any(len(row) != k for row in top_logp):
                raise InvalidAnswer(f"{where}: fewer than top_k={k} entries at some position")
            if any(not 0 <= t < self.vocab_size for row in top_ids for t in row):
                raise InvalidAnswer(f"{where}: a top-k token id outside the vocabulary (size {self.vocab_size})")
            if any(row[i] < row[i + 1] for row in top_logp for i in range(k - 1)):
                raise InvalidAnswer(f"{where}: top-k log-probs are not sorted")
        return (torch.tensor(logp, dtype=torch.float32),
                torch.tensor(top_ids, dtype=torch.long).reshape(R, k),
                torch.tensor(top_logp, dtype=torch.float32).reshape(R, k))
