"""The teacher server's scoring core: token-id sequences in, log-probs out, micro-batched.

Requests are queued; one worker thread takes as many queued jobs as fit `max_batch_tokens`
(padded rows x longest sequence) and scores them in one forward with the in-process
teacher's fast path (`uniopd.models.forward.response_logprobs`, on oneDNN-packed weights on
CPU, prompt prefixes shared), so concurrent clients share forwards. The queue is bounded:
past `max_queue` jobs a request is refused (the HTTP layer answers 503) rather than piling up.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from uniopd.algo.losses.chunked import chunked_topk_logprobs
from uniopd.cpu.packed import can_pack, packed_linears
from uniopd.models.forward import build_layout, output_head, response_logprobs
from uniopd.models.loading import LoadedModel

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More jobs are waiting than the server accepts."""


@dataclass
class Scored:
    """One sequence's scores from position `start` on: logp [R] and, with top_k, ids / logp [R, K]."""

    logp_R: torch.Tensor
    topk_ids_RK: torch.Tensor | None
    topk_logp_RK: torch.Tensor | None


@dataclass
class _Job:
    sequences: list[list[int]]
    starts: list[int]
    top_k: int
    future: Future

    @property
    def tokens(self) -> int:
        return len(self.sequences) * max(len(s) for s in self.sequences)


class BatchScorer:
    def __init__(self, loaded: LoadedModel, *, max_batch_tokens: int = 16384, max_queue: int = 256,
                 chunk_size: int = 1024, share_prefix: bool = True, threads: int | None = None):
        self.loaded, self.model = loaded, loaded.model
        self.vocab_size = loaded.vocab_size
        self.max_batch_tokens, self.chunk_size, self.share_prefix = max_batch_tokens, chunk_size, share_prefix
        self.threads = threads
        self.packed = can_pack(output_head(self.model))
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._run, name="uniopd-scorer", daemon=True)
        self._worker.start()

    def submit(self, sequences: list[list[int]], starts: list[int], top_k: int = 0) -> Future:
        """Future of a list of `Scored`, one per sequence (sequences already validated)."""
        job = _Job(sequences, starts, top_k, Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return job.future

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        pending: _Job | None = None
        stopping = False
        while not stopping:
            job = pending or self._queue.get()
            pending = None
            if job is None:
                return
            jobs, tokens = [job], job.tokens
            while True:  # take what fits with the first job into one forward
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                if tokens + nxt.tokens > self.max_batch_tokens:
                    pending = nxt
                    break
                jobs.append(nxt)
                tokens += nxt.tokens
            try:
                results = self._score([s for j in jobs for s in j.sequences], [p for j in jobs for p in j.starts],
                                      max(j.top_k for j in jobs))
            except Exception as exc:  # a bad batch must not kill the worker; every waiter hears why
                log.exception("scoring failed")
                for j in jobs:
                    j.future.set_exception(exc)
                continue
            offset = 0
            for j in jobs:
                part = results[offset: offset + len(j.sequences)]
                offset += len(j.sequences)
                if j.top_k:
                    part = [Scored(r.logp_R, r.topk_ids_RK[:, : j.top_k], r.topk_logp_RK[:, : j.top_k]) for r in part]
                else:
                    part = [Scored(r.logp_R, None, None) for r in part]
                j.future.set_result(part)

    @torch.inference_mode()
    def _score(self, sequences: list[list[int]], starts: list[int], top_k: int) -> list[Scored]:
        device = next(self.model.parameters()).device
        prompts = [s[:p] for s, p in zip(sequences, starts)]
        responses = [s[p:] for s, p in zip(sequences, starts)]
        layout = build_layout(prompts, responses, self.loaded.tokenizer.pad_token_id, device,
                              share_prefix=self.share_prefix)
        with packed_linears(self.model) if self.packed else contextlib.nullcontext():
            logp_N, hidden_NH = response_logprobs(self.model, layout, chunk_size=self.chunk_size,
                                                  return_hidden=bool(top_k))
            ids_NK = logp_NK = None
            if top_k:
                ids_NK, logp_NK = chunked_topk_logprobs(hidden_NH, output_head(self.model), top_k,
                                                        chunk_size=self.chunk_size)
        lengths = [len(r) for r in responses]
        logps = logp_N.float().cpu().split(lengths)
        if not top_k:
            return [Scored(lp, None, None) for lp in logps]
        return [Scored(lp, i, v) for lp, i, v in zip(logps, ids_NK.cpu().split(lengths),
                                                      logp_NK.float().cpu().split(lengths))]
