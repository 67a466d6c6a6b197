"""`uniopd serve-teacher`'s HTTP API (FastAPI), a subset of vLLM's OpenAI-compatible server:

GET  /health           200 once the model is loaded (no token needed)
GET  /v1/models        the served model's name
POST /tokenize         {"prompt": text, "add_special_tokens": bool} -> {"tokens", "count", "max_model_len"}
POST /v1/completions   vLLM's prompt scoring: {"prompt": ids | [ids, ...] | text, "prompt_logprobs": k}
                       -> choices[i].prompt_logprobs: null, then per position {id: {"logprob", "rank",
                       "decoded_token"}} with the actual token and the top-k. Nothing is generated:
                       `max_tokens` is accepted, `text` comes back empty. A token outside the top-k
                       gets rank k + 1 (vLLM gives its exact rank; no client here reads it).
POST /v1/score         uniopd's compact form: {"sequences": [ids, ...], "starts": [p, ...], "top_k": k}
                       -> {"logprobs": [[...]], "topk_ids": [[[...]]], "topk_logprobs": [[[...]]]} for the
                       positions from each start on (the response tokens), as plain arrays.

Every error is a JSON {"object": "error", "message", "type", "code"} with a 4xx status:
401 without the bearer token (when one is set), 413 past the body limit, 400 for malformed
JSON, wrong types, token ids outside the vocabulary or sequences past the model's length,
503 when the scoring queue is full.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request,
# imported lazily inside build_app) at definition time.
import asyncio
import hmac
import json
import time
import uuid

from uniopd.serve.scoring import BatchScorer, QueueFull

MAX_SEQUENCES = 256  # per request


class BadRequest(ValueError):
    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


def _error(message: str, code: int):
    from fastapi.responses import JSONResponse

    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLarge",
            503: "ServiceUnavailable"}.get(code, "Error")
    return JSONResponse({"object": "error", "message": message, "type": kind, "code": code}, status_code=code)


class BodyLimit:
    """ASGI middleware: refuse a body past `max_bytes` (by its Content-Length, or while it streams in)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _error(f"request body over {self.max_bytes} bytes", 413)(scope, receive, send)
        # Read the whole body here, bounded, so an oversized one is refused before any handler runs.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _error(f"request body over {self.max_bytes} bytes", 413)(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _int(value, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{key}: expected an integer in [{lo}, {hi}], got {str(value)[:50]!r}")
    return value


def build_app(scorer: BatchScorer, *, model_name: str, api_key: str | None = None,
              max_body_bytes: int = 16 << 20, max_model_len: int = 4096, max_top_k: int = 20):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    tokenizer = scorer.loaded.tokenizer
    vocab = scorer.vocab_size

    @asynccontextmanager
    async def lifespan(app):
        yield
        scorer.close()  # graceful shutdown: the worker finishes its batch and stops

    app = FastAPI(title="uniopd teacher server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    def token_lists(value, key: str) -> list[list[int]]:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            value = [value]
        if not isinstance(value, list) or not value:
            raise BadRequest(f"{key}: expected token ids, a list of token-id lists, or text")
        if len(value) > MAX_SEQUENCES:
            raise BadRequest(f"{key}: {len(value)} sequences, at most {MAX_SEQUENCES} per request")
        out = []
        for i, seq in enumerate(value):
            if isinstance(seq, str):
                seq = tokenizer(seq)["input_ids"]  # vLLM adds special tokens to text prompts too
            if not isinstance(seq, list) or not seq:
                raise BadRequest(f"{key}[{i}]: expected a non-empty list of token ids")
            if len(seq) > max_model_len:
                raise BadRequest(f"{key}[{i}]: {len(seq)} tokens, more than the model's {max_model_len}")
            for j, t in enumerate(seq):
                if isinstance(t, bool) or not isinstance(t, int):
                    raise BadRequest(f"{key}[{i}][{j}]: {str(t)[:50]!r} is not a token id")
                if not 0 <= t < vocab:
                    raise BadRequest(f"{key}[{i}][{j}]: token id {t} is outside the vocabulary [0, {vocab})")
            out.append(seq)
        return out

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"the body is not JSON: {str(exc)[:200]}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    async def run(sequences, starts, top_k):
        try:
            return await asyncio.wrap_future(scorer.submit(sequences, starts, top_k))
        except QueueFull as exc:
            raise BadRequest(f"busy: {exc}; retry later", 503) from None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            if api_key and request.url.path != "/health":
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    return _error("missing or wrong bearer token", 401)
            return await call_next(request)
        except BadRequest as exc:
            return _error(str(exc), exc.code)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "uniopd",
                                            "max_model_len": max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request)
        prompt = body.get("prompt")
        add_special = body.get("add_special_tokens", True)
        if not isinstance(prompt, str) or not isinstance(add_special, bool):
            raise BadRequest("tokenize: expected {'prompt': text, 'add_special_tokens': bool}")
        ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        if body.get("stream"):
            raise BadRequest("stream: this server scores prompts only; streaming is not supported")
        k = body.get("prompt_logprobs")
        k = 0 if k is None else _int(k, "prompt_logprobs", 0, max_top_k)
        _int(body.get("max_tokens", 1), "max_tokens", 0, max_model_len)
        sequences = token_lists(body.get("prompt"), "prompt")
        scored = await run(sequences, [1] * len(sequences), k) if body.get("prompt_logprobs") is not None else None
        choices = []
        for i, seq in enumerate(sequences):
            entry = None
            if scored is not None:
                entry = [None] + [_position(tokenizer, tok, s, k) for tok, s in zip(seq[1:], _rows(scored[i]))]
            choices.append({"index": i, "text": "", "logprobs": None, "finish_reason": "length",
                            "stop_reason": None, "prompt_logprobs": entry})
        tokens = sum(len(s) for s in sequences)
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                             "created": int(time.time()), "model": model_name, "choices": choices,
                             "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}})

    @app.post("/v1/score")
    async def score(request: Request):
        body = await body_of(request)
        sequences = token_lists(body.get("sequences"), "sequences")
        starts = body.get("starts")
        if not isinstance(starts, list) or len(starts) != len(sequences):
            raise BadRequest("starts: expected one start position per sequence")
        starts = [_int(p, f"starts[{i}]", 1, len(s)) for i, (p, s) in enumerate(zip(starts, sequences))]
        k = _int(body.get("top_k", 0), "top_k", 0, max_top_k)
        scored = await run(sequences, starts, k)
        out = {"model": model_name, "logprobs": [s.logp_R.tolist() for s in scored]}
        if k:
            out["topk_ids"] = [s.topk_ids_RK.tolist() for s in scored]
            out["topk_logprobs"] = [s.topk_logp_RK.tolist() for s in scored]
        return out

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return _error(str(exc), exc.code)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return _error(f"no route {request.url.path}", 404)

    return BodyLimit(app, max_body_bytes)


def _rows(scored):
    """Per position (logp, [(id, logp)] of the top-k) of one scored sequence."""
    ids = scored.topk_ids_RK.tolist() if scored.topk_ids_RK is not None else None
    vals = scored.topk_logp_RK.tolist() if scored.topk_logp_RK is not None else None
    for j, lp in enumerate(scored.logp_R.tolist()):
        yield lp, (list(zip(ids[j], vals[j])) if ids is not None else [])


def _position(tokenizer, token: int, row, k: int) -> dict:
    logp, top = row
    out = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": tokenizer.decode([t])} for r, (t, v) in enumerate(top)}
    if str(token) not in out:
        out[str(token)] = {"logprob": logp, "rank": k + 1, "decoded_token": tokenizer.decode([token])}
    else:
        out[str(token)]["logprob"] = logp  # one value per token, whichever path computed it
    return out
