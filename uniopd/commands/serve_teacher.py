"""`uniopd serve-teacher`: serve a teacher's log-probs over HTTP (FastAPI + uvicorn, extra uniopd[serve]).

Any model uniopd loads (a directory, a hub id, a .gguf file, pkg://...) is served with the
in-process teacher's fast scoring path; `teachers.<name>.backend: remote` with `api: vllm` or
`api: uniopd` scores against it. Binds 127.0.0.1 unless told otherwise, and refuses any other
address without a bearer token (`--api-key` or the UNIOPD_API_KEY variable).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("serve-teacher", help="serve a teacher's token log-probs over HTTP (vLLM-compatible subset)")
    p.add_argument("--model", required=True, help="directory, hub id, .gguf file or pkg://package/file.gguf")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (other than loopback needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="bearer token clients must send (default: $UNIOPD_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="name in /v1/models (default: --model)")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger request bodies get 413")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="padded tokens per forward; concurrent requests are batched up to it")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond this get 503")
    p.add_argument("--max-top-k", type=int, default=20, help="largest prompt_logprobs / top_k accepted")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for scoring")
    p.set_defaults(run=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from uniopd.config import ConfigError, ModelConfig

    api_key = args.api_key or os.environ.get("UNIOPD_API_KEY") or None
    if not _is_loopback(args.host) and not api_key:
        raise ConfigError(f"--host {args.host}: serving beyond this machine needs a bearer token "
                          f"(--api-key or UNIOPD_API_KEY)")
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("serve-teacher needs FastAPI and uvicorn: pip install 'uniopd[serve]'") from None
    import torch

    from uniopd.models.forward import max_positions
    from uniopd.models.loading import load_model
    from uniopd.serve.app import build_app
    from uniopd.serve.scoring import BatchScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(path=args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code),
                        "serve-teacher.model", trainable=False)
    if loaded.is_multimodal:
        raise ConfigError(f"--model {args.model}: vision-language teachers are not served yet (token-id "
                          f"requests carry no images); use backend=local for it")
    max_len = max_positions(loaded.model) or 4096
    scorer = BatchScorer(loaded, max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue,
                         threads=args.threads)
    app = build_app(scorer, model_name=args.served_model_name or args.model, api_key=api_key,
                    max_body_bytes=args.max_body_bytes, max_model_len=max_len, max_top_k=args.max_top_k)
    log.info("serving %s on http://%s:%d (max_model_len %d)", args.model, args.host, args.port, max_len)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    return 0
