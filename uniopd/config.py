"""Run configuration: one dataclass per component, composed into `RunConfig`.

YAML files give the starting point; dotted overrides (`trainer.lr=1e-6 rollout.n=8`) refine
it. Every field carries a one-line help text (`uniopd config --help-fields` prints them).
Unknown keys and wrong types fail with a `ConfigError` that names the dotted key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from uniopd.algo.losses.registry import LOSS_KINDS
from uniopd.config_base import _MAX_THREADS, ConfigError, _check_choice, _check_range, _f, _short
from uniopd.config_convert import _YAML_FAILURES, _build, _merge, apply_override
from uniopd.config_yaml import ConfigYAMLError, load_yaml
from uniopd.safe_io import FileRefused, read_regular


@dataclass
class ModelConfig:
    path: str = _f("", "student: local directory, Hugging Face id, .gguf file, or pkg://package/file.gguf")
    gguf_file: str | None = _f(None, "GGUF file name inside `path` (set automatically when path ends in .gguf)")
    revision: str | None = _f(None, "hub revision (branch, tag or commit) when `path` is a hub id")
    dtype: str = _f("float32", "parameter dtype: float32, bfloat16 or float16")
    trust_remote_code: bool = _f(False, "allow model code from the checkpoint directory")
    chat_template: bool = _f(True, "wrap prompts with the tokenizer's chat template when it has one")
    max_prompt_tokens: int = _f(1024, "prompts longer than this are handled by `data.overlong`")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    share_prompt_prefix: bool = _f(True, "run prompt tokens that rows of a micro-batch share (a common header, "
                                         "one prompt's n rollouts) once, not once per row (same results up to "
                                         "float rounding)")

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_range(f"{key}.max_prompt_tokens", self.max_prompt_tokens, 1)


@dataclass
class TeacherConfig(ModelConfig):
    domains: list[str] = _f([], "domains this teacher scores; '*' matches any domain no other teacher claims")
    view: str = _f("same", "teacher view: same | teacher_prompt | privileged | template | image_text")
    system_prompt: str | None = _f(None, "system prompt added to the teacher's view (teacher-aligned prompts)")
    privileged_template: str = _f(
        "{prompt}\n\nReference answer: {answer}\nUse it to answer.",
        "template of the 'privileged' view; fields: {prompt} {answer} {tests}")
    image_template: str = _f("[image: {text}]",
                             "image_text view: how each image is written as text; field: {text} (the record's image_text)")
    self_distill: bool = _f(False, "the teacher is the student's own frozen initial weights (path may be empty)")
    backend: str = _f("local", "teacher scorer: local (a frozen model in this process), remote (inference "
                               "servers: `urls`, `api`), cache (precomputed by `uniopd cache-teacher`: `cache`), "
                               "vllm (an in-process vLLM engine, extra uniopd[vllm]) "
                               "or a dotted path package.module:Class (a uniopd.teachers.base.TeacherScorer)")
    top_k: int | None = _f(None, "return only the teacher's top-k ids and log-probs per token, as served "
                                 "teachers do (feeds loss.kind=topk with topk_source=teacher); None: hidden states")
    max_failed_share: float = _f(0.5, "stop the run when more than this share of a step's rows got no signal from "
                                      "this teacher (a server down, timing out or answering garbage); the rows "
                                      "below it train without a teacher signal (zero advantage, out of the loss)")
    # Backend-specific keys (None = the backend's default): a backend that does not read one
    # refuses it when it is set (`TeacherScorer.options`), so no key is silently ignored.
    urls: list[str] | None = _f(None, "remote: teacher server base URLs (http://host:port), used round-robin")
    api: str | None = _f(None, "remote: the servers' API: vllm (/v1/completions with prompt_logprobs) | sglang "
                               "(/generate with input_ids) | uniopd (`uniopd serve-teacher`'s /v1/score); "
                               "default vllm")
    served_model: str | None = _f(None, "remote: the model name sent in vllm/uniopd requests (default: the first "
                                        "of the server's /v1/models)")
    api_key_env: str | None = _f(None, "remote: environment variable holding the servers' bearer token (the token "
                                       "itself never goes into a config file)")
    timeout_s: float | None = _f(None, "remote: seconds one request may take before it is retried (default 60)")
    retries: int | None = _f(None, "remote: retries of a failed request, with exponential backoff and jitter, "
                                   "each on the next URL (default 3)")
    backoff_s: float | None = _f(None, "remote: first retry delay in seconds; doubles per retry, jittered "
                                       "(default 0.5)")
    concurrency: int | None = _f(None, "remote: requests in flight at once, over all URLs (default 8)")
    request_batch: int | None = _f(None, "remote: sequences per request (default 4)")
    cache: str | None = _f(None, "cache: directory written by `uniopd cache-teacher` (a manifest plus shards)")
    shard: bool | None = _f(None, "local: shard this frozen teacher's decoder layers over the data-parallel "
                                  "processes with FSDP2 (needs trainer.strategy=data_parallel and "
                                  "share_prompt_prefix=false; default: every process holds the whole teacher)")

    def validate(self, key: str) -> None:
        if not self.self_distill:
            super().validate(key)
        if not self.backend:
            raise ConfigError(f"{key}.backend: empty; use local, remote, cache or a dotted path package.module:Class")
        if self.top_k is not None:
            _check_range(f"{key}.top_k", self.top_k, 1)
        _check_range(f"{key}.max_failed_share", self.max_failed_share, 0.0, 1.0)
        if self.urls is not None:
            if not self.urls:
                raise ConfigError(f"{key}.urls: empty; give one or more http://host:port")
            for i, url in enumerate(self.urls):
                if not url.startswith(("http://", "https://")):
                    raise ConfigError(f"{key}.urls[{i}]: {url!r} is not an http:// or https:// URL")
        if self.api is not None:
            _check_choice(f"{key}.api", self.api, ("vllm", "sglang", "uniopd"))
        for name in ("timeout_s", "backoff_s"):
            if getattr(self, name) is not None:
                _check_range(f"{key}.{name}", getattr(self, name), 0.0, lo_open=True)
        for name, lo in (("retries", 0), ("concurrency", 1), ("request_batch", 1)):
            if getattr(self, name) is not None:
                _check_range(f"{key}.{name}", getattr(self, name), lo)
        _check_choice(f"{key}.view", self.view, ("same", "teacher_prompt", "privileged", "template",
                                                           "image_text"))


@dataclass
class DataConfig:
    train: str = _f("", "prompt file: .jsonl, .json, .parquet, a datasets dir, or hf:<name>[:<split>]")
    eval: str | None = _f(None, "held-out prompt file evaluated every `trainer.eval_every` steps")
    skip_invalid: bool = _f(False, "skip and count invalid records instead of failing on the first")
    field_map: dict[str, str] = _f({}, "rename source columns to record fields, e.g. {question: prompt}")
    default_domain: str | None = _f(None, "domain for records that have none")
    generate_ids: bool = _f(False, "make ids '<file>-<row>' for sources without an id column")
    overlong: str = _f("error", "prompts over model.max_prompt_tokens: error | truncate | skip (counted)")
    shuffle: bool = _f(True, "shuffle the prompt order each epoch (seeded)")
    domain_verifiers: dict[str, str] = _f({}, "verifier per domain, overrides the built-in defaults")

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.overlong", self.overlong, ("error", "truncate", "skip"))


@dataclass
class RolloutConfig:
    backend: str = _f("hf", "rollout engine: hf (the batched KV-cache loop in uniopd/rollout/hf.py), vllm (a "
                            "colocated vLLM engine, extra uniopd[vllm]) or a dotted path package.module:Class "
                            "(a uniopd.rollout.base.RolloutEngine)")
    prompts_per_step: int = _f(8, "prompts sampled per training step")
    n: int = _f(4, "rollouts per prompt (the group)")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    max_new_tokens: int = _f(256, "maximum response length")
    min_new_tokens: int = _f(0, "EOS is blocked before this many tokens (benchmarks)")
    batch_size: int = _f(64, "sequences decoded together")
    decode: str = _f("auto", "decode steps: auto (uniopd.cpu.lean for Llama/Mistral/Qwen2/Qwen3 text "
                             "models, on CPU fp32 with a oneDNN-packed copy of the weights while decoding; "
                             "else the model's forward) | hf (always the model's forward)")
    threads: int | None = _f(None, "torch CPU threads while decoding (default: trainer.threads); small "
                                   "decode ops can run faster on fewer threads than the update's matmuls")
    old_logprobs: str = _f("trainer", "PPO old log-probs when the engine's differ from the trainer's (vllm): "
                                      "trainer (recomputed by the student before the update, ratio starts at 1) "
                                      "| engine (also weight each token by min(exp(trainer - engine), tis_cap), "
                                      "truncated importance sampling for the engine having drawn it)")
    tis_cap: float = _f(2.0, "old_logprobs=engine: cap of the truncated importance-sampling weight")
    # Engine-specific keys (vllm_*): an engine that does not read one refuses it when it is set.
    vllm_gpu_memory_utilization: float | None = _f(None, "vllm: share of GPU memory (on CPU: of RAM) the engine "
                                                         "reserves for weights and KV cache (default 0.4)")
    vllm_tensor_parallel_size: int | None = _f(None, "vllm: processes (GPUs) one engine shards the student over "
                                                     "(default 1); > 1 needs trainer.strategy=data_parallel: each "
                                                     "engine takes that many consecutive trainer processes")
    vllm_max_model_len: int | None = _f(None, "vllm: longest prompt + response the engine holds (default: the "
                                              "model's max_position_embeddings)")
    vllm_enable_sleep_mode: bool | None = _f(None, "vllm, GPU only: release the engine's KV cache and weights "
                                                   "while the trainer updates, wake it to sample")
    replay_responses: str | None = _f(None, "replay: the fixed response file (`uniopd generate` format) replayed "
                                            "as every step's rollouts (Lightning OPD, with a teachers.<name>."
                                            "backend=cache teacher)")

    def validate(self, key: str) -> None:
        if not self.backend:
            raise ConfigError(f"{key}.backend: empty; use hf, vllm or a dotted path package.module:Class")
        if (self.replay_responses is None) != (self.backend != "replay"):
            raise ConfigError(f"{key}.replay_responses is read by {key}.backend=replay only, and that backend needs "
                              f"it (got backend={self.backend!r}, replay_responses={self.replay_responses!r})")
        _check_choice(f"{key}.old_logprobs", self.old_logprobs, ("trainer", "engine"))
        _check_range(f"{key}.tis_cap", self.tis_cap, 0.0, lo_open=True)
        if self.old_logprobs == "trainer" and self.tis_cap != 2.0:
            raise ConfigError(f"{key}.tis_cap={self.tis_cap} applies to {key}.old_logprobs=engine only")
        if self.vllm_gpu_memory_utilization is not None:
            _check_range(f"{key}.vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, 0.0, 1.0,
                         lo_open=True)
        for name in ("vllm_tensor_parallel_size", "vllm_max_model_len"):
            if getattr(self, name) is not None:
                _check_range(f"{key}.{name}", getattr(self, name), 1)
        _check_choice(f"{key}.decode", self.decode, ("auto", "hf"))
        _check_range(f"{key}.temperature", self.temperature, 0.0, lo_open=True)
        _check_range(f"{key}.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        for name in ("prompts_per_step", "n", "max_new_tokens", "batch_size"):
            _check_range(f"{key}.{name}", getattr(self, name), 1)
        _check_range(f"{key}.min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
        if self.threads is not None:
            _check_range(f"{key}.threads", self.threads, 1, _MAX_THREADS)


@dataclass
class LossConfig:
    kind: str = _f("sampled", "loss kind, one of uniopd.algo.losses.registry.LOSS_KINDS: " + " | ".join(LOSS_KINDS))
    clip_low: float = _f(0.2, "PPO clip epsilon below 1 (ratio >= 1 - clip_low)")
    clip_high: float = _f(0.28, "PPO clip epsilon above 1 (ratio <= 1 + clip_high)")
    kl_coef: float = _f(1.0, "weight of the teacher reverse-KL token advantage")
    outcome_weight: float = _f(0.0, "weight of the verifier reward added to every token's advantage")
    outcome_baseline: str = _f("group", "baseline subtracted from the outcome reward: group | none")
    direction: str = _f("reverse", "full / topk KL direction: reverse KL(S||T) or forward KL(T||S)")
    topk: int = _f(16, "k of the top-k loss and of the overlap diagnostics")
    topk_source: str = _f("teacher", "top-k token set: student | teacher | union | intersection")
    topk_renormalize: bool = _f(True, "renormalise both distributions inside the top-k set")
    topk_tail: bool = _f(False, "add a tail bucket with the mass outside the top-k set")
    beta: float = _f(0.5, "generalized JSD interpolation: 0 = KL(T||S), 1 = KL(S||T)")
    forward_weight: float = _f(0.5, "mix: weight of forward KL(T||S); the rest is reverse KL")
    temperature: float = _f(1.0, "temperature of the dense losses")
    dense_weight: float = _f(1.0, "weight of the dense loss when combined with the outcome reward")
    chunk_size: int = _f(1024, "tokens per chunk when computing log-probs and dense losses")
    aggregation: str = _f("token-mean", "sampled-token loss: token-mean (over every token of the mini-batch) | "
                                        "seq-mean-token-mean (each response's mean, then the mean over "
                                        "responses: the released Uni-OPD scripts)")

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.kind", self.kind, tuple(LOSS_KINDS))
        _check_choice(f"{key}.aggregation", self.aggregation, ("token-mean", "seq-mean-token-mean"))
        if self.aggregation != "token-mean" and LOSS_KINDS[self.kind].is_dense:
            raise ConfigError(f"{key}.aggregation={self.aggregation!r} applies to the sampled-token loss only; "
                              f"{key}.kind={self.kind!r} is a dense loss (use token-mean)")
        _check_choice(f"{key}.direction", self.direction, ("reverse", "forward"))
        _check_choice(f"{key}.outcome_baseline", self.outcome_baseline, ("group", "none"))
        _check_choice(f"{key}.topk_source", self.topk_source, ("student", "teacher", "union", "intersection"))
        _check_range(f"{key}.beta", self.beta, 0.0, 1.0)
        _check_range(f"{key}.forward_weight", self.forward_weight, 0.0, 1.0)
        _check_range(f"{key}.clip_low", self.clip_low, 0.0, 1.0)
        _check_range(f"{key}.clip_high", self.clip_high, 0.0)
        _check_range(f"{key}.topk", self.topk, 1)
        _check_range(f"{key}.chunk_size", self.chunk_size, 1)
        # Negative weights would train away from the teacher / the verifier.
        for name in ("kl_coef", "outcome_weight", "dense_weight"):
            _check_range(f"{key}.{name}", getattr(self, name), 0.0)
        _check_range(f"{key}.temperature", self.temperature, 0.0, lo_open=True)


@dataclass
class CalibrationConfig:
    enabled: bool = _f(False, "outcome-guided margin calibration of the teacher signal")
    method: str = _f("shift", "shift (add the smallest lambda restoring the margin) | mask (drop violators)")
    delta: float = _f(0.4, "required margin delta between correct and incorrect returns")
    mode: str = _f("minmax", "margin: minmax (min correct - max incorrect) | mean (mean - mean)")
    direction: str = _f("correct_up", "shift: correct_up | incorrect_down | both")
    scope: str = _f("group", "margin per prompt group or over the whole batch: group | global")
    mask_strategy: str = _f("group", "mask: group (drop the whole group) | greedy (drop worst rollouts)")
    min_retain_ratio: float = _f(0.25, "greedy mask keeps at least this share of each side")
    logratio_clip: float | None = _f(None, "drop tokens with |log piS - log piT| >= this from the loss, after the "
                                           "returns are computed and calibrated (10 in the released code)")

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.method", self.method, ("shift", "mask"))
        _check_choice(f"{key}.mode", self.mode, ("minmax", "mean"))
        _check_choice(f"{key}.direction", self.direction, ("correct_up", "incorrect_down", "both"))
        _check_choice(f"{key}.scope", self.scope, ("group", "global"))
        _check_choice(f"{key}.mask_strategy", self.mask_strategy, ("group", "greedy"))
        _check_range(f"{key}.delta", self.delta, 0.0, lo_open=True)
        _check_range(f"{key}.min_retain_ratio", self.min_retain_ratio, 0.0, 1.0)
        if self.logratio_clip is not None:
            _check_range(f"{key}.logratio_clip", self.logratio_clip, 0.0, lo_open=True)


@dataclass
class BalanceConfig:
    online: bool = _f(False, "correctness-aware selection of which rollouts train")
    mode: str = _f("select", "online balancing: select (oversample, redraw uniform groups, keep n per group near "
                             "`ratio`) | release (the released code's rule: per group, randomly drop rollouts of "
                             "the larger outcome side down to the smaller side's count; dropped rollouts stay in "
                             "the batch with loss weight 0, so they still count in margins)")
    oversample: float = _f(2.0, "rollouts sampled per prompt = ceil(oversample * rollout.n)")
    ratio: float = _f(1.0, "target correct:incorrect ratio inside a kept group")
    max_resample: int = _f(0, "extra sampling rounds for groups that came out all-correct/all-incorrect")
    keep_uniform: bool = _f(True, "keep groups that stay all-correct/all-incorrect after resampling")
    offline_k: int = _f(8, "`uniopd balance`: rollouts per prompt to estimate its pass rate")
    num_bins: int = _f(10, "`uniopd balance`: pass-rate histogram bins")

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.mode", self.mode, ("select", "release"))
        _check_range(f"{key}.oversample", self.oversample, 1.0)
        _check_range(f"{key}.ratio", self.ratio, 0.0)
        _check_range(f"{key}.max_resample", self.max_resample, 0)
        _check_range(f"{key}.offline_k", self.offline_k, 1)
        _check_range(f"{key}.num_bins", self.num_bins, 1)


@dataclass
class TrainerConfig:
    steps: int = _f(100, "optimizer updates on fresh rollouts (training steps)")
    lr: float = _f(1e-6, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    warmup_steps: int = _f(0, "linear warmup steps, then constant")
    grad_clip: float = _f(1.0, "clip the global grad norm to this (0 = off)")
    micro_batch_size: int = _f(16, "sequences per forward/backward (bounds update memory)")
    mini_batches: int = _f(1, "optimizer steps per rollout batch (>1 makes PPO clipping bite)")
    seed: int = _f(0, "seed of data order, sampling and initialisation")
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice)")
    device: str = _f("auto", "auto | cpu | cuda")
    strategy: str = _f("single", "training strategy: single (one process) | data_parallel (torchrun processes, "
                                 "`uniopd train --nproc N`; uniopd/train/distributed.py)")
    student_sharding: str = _f("replicate", "data_parallel: replicate (every process holds the student) | shard "
                                            "(decoder layers sharded with FSDP2)")
    checkpoint_format: str = _f("auto", "auto (sharded when the student is sharded, else full) | full (one "
                                        "save_pretrained directory written by process 0) | sharded (data_parallel: "
                                        "each process writes its shards with torch.distributed.checkpoint)")
    reuse_cpu_memory: bool = _f(True, "on CPU (glibc), keep freed memory in the process so each step's large "
                                      "tensors skip page faults; RSS settles at or a little above its peak")
    output_dir: str = _f("runs/latest", "run directory: config, metrics, checkpoints")
    save_every: int = _f(50, "checkpoint every K steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk (oldest removed; 0 = keep all)")
    eval_every: int = _f(0, "evaluate on data.eval every K steps (0 = off)")
    eval_n: int = _f(1, "samples per eval prompt")
    eval_greedy: bool = _f(False, "evaluate with greedy decoding (one answer per prompt) instead of eval_n samples")
    max_bad_steps: int = _f(5, "stop after this many consecutive non-finite losses/gradients")

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice(f"{key}.strategy", self.strategy, ("single", "data_parallel"))
        _check_choice(f"{key}.student_sharding", self.student_sharding, ("replicate", "shard"))
        _check_choice(f"{key}.checkpoint_format", self.checkpoint_format, ("auto", "full", "sharded"))
        for name in ("steps", "micro_batch_size", "mini_batches"):
            _check_range(f"{key}.{name}", getattr(self, name), 1)
        _check_range(f"{key}.lr", self.lr, 0.0)
        if len(self.betas) != 2:
            raise ConfigError(f"{key}.betas: needs two numbers, got {_short(self.betas)}")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:  # AdamW's own check, named here instead of deep in torch
                raise ConfigError(f"{key}.betas[{i}]: {beta!r} must be >= 0 and < 1")
        for name in ("weight_decay", "grad_clip"):
            _check_range(f"{key}.{name}", getattr(self, name), 0.0)
        # 0 means off (save_every: only at the end; keep_checkpoints: keep all; eval_every: no eval).
        for name in ("warmup_steps", "save_every", "keep_checkpoints", "eval_every"):
            _check_range(f"{key}.{name}", getattr(self, name), 0)
        for name in ("eval_n", "max_bad_steps"):
            _check_range(f"{key}.{name}", getattr(self, name), 1)
        if self.eval_greedy and self.eval_n > 1:
            raise ConfigError(f"{key}.eval_greedy=true draws one answer per prompt; {key}.eval_n={self.eval_n} "
                              "would be ignored (set one of them)")
        _check_range(f"{key}.seed", self.seed, 0, 2**63 - 2)  # torch generators take seed + 1
        if self.threads is not None:
            _check_range(f"{key}.threads", self.threads, 1, _MAX_THREADS)


@dataclass
class SFTConfig:
    steps: int = _f(200, "`uniopd sft`: optimizer steps on the response file")
    batch_size: int = _f(16, "`uniopd sft`: sequences per step")
    lr: float = _f(1e-5, "`uniopd sft`: peak learning rate (cosine decay)")
    warmup_steps: int = _f(10, "`uniopd sft`: linear warmup steps")
    min_lr_ratio: float = _f(0.1, "`uniopd sft`: the cosine decay ends at lr * min_lr_ratio")
    weight_decay: float = _f(0.0, "`uniopd sft`: AdamW weight decay")
    grad_clip: float = _f(1.0, "`uniopd sft`: clip the global grad norm to this (0 = off)")

    def validate(self, key: str) -> None:
        for name in ("steps", "batch_size"):
            _check_range(f"{key}.{name}", getattr(self, name), 1)
        _check_range(f"{key}.lr", self.lr, 0.0)
        _check_range(f"{key}.warmup_steps", self.warmup_steps, 0)
        _check_range(f"{key}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range(f"{key}.weight_decay", self.weight_decay, 0.0)
        _check_range(f"{key}.grad_clip", self.grad_clip, 0.0)


@dataclass
class LoggingConfig:
    jsonl: bool = _f(True, "write metrics.jsonl in the run directory")
    tensorboard: bool = _f(True, "write TensorBoard events in <run>/tb")
    progress: bool = _f(True, "show a progress bar with ETA")
    log_samples: int = _f(2, "responses written to samples.jsonl per step")
    diagnostics: bool = _f(True, "log top-k overlap, shared mass, entropy gap, full reverse KL (diag/*)")

    def validate(self, key: str) -> None:
        _check_range(f"{key}.log_samples", self.log_samples, 0)


@dataclass
class RunConfig:
    model: ModelConfig = _f(ModelConfig(), "the student")
    teachers: dict[str, TeacherConfig] = _f({}, "teachers by name; each claims domains")
    data: DataConfig = _f(DataConfig(), "prompt data")
    rollout: RolloutConfig = _f(RolloutConfig(), "student sampling")
    loss: LossConfig = _f(LossConfig(), "distillation loss")
    calibration: CalibrationConfig = _f(CalibrationConfig(), "teacher-side margin calibration")
    balance: BalanceConfig = _f(BalanceConfig(), "student-side data balancing")
    trainer: TrainerConfig = _f(TrainerConfig(), "optimisation and checkpoints")
    sft: SFTConfig = _f(SFTConfig(), "off-policy cold start (`uniopd sft`) and the demo's model builds")
    logging: LoggingConfig = _f(LoggingConfig(), "metrics output")

    def validate(self) -> "RunConfig":
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "teachers":
                for name, teacher in value.items():
                    teacher.validate(f"teachers.{name}")
            elif hasattr(value, "validate"):
                value.validate(f.name)
        claimed: dict[str, str] = {}
        for name, teacher in self.teachers.items():
            for domain in teacher.domains:
                if domain in claimed:
                    raise ConfigError(f"teachers.{name}.domains: {domain!r} is already claimed by "
                                      f"teacher {claimed[domain]!r}")
                claimed[domain] = name
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """Build a validated RunConfig from an optional YAML file plus dotted overrides."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            # A FIFO or /dev/zero given as the config must fail at once, not hang or fill memory.
            loaded = load_yaml(read_regular(path, what="config file", kind="config").decode("utf-8"),
                               str(path)) or {}
        except (ConfigYAMLError, FileRefused) as exc:  # their messages already name the file (and line)
            raise ConfigError(str(exc)) from None
        except (*_YAML_FAILURES, OSError) as exc:
            raise ConfigError(f"{path}: cannot read the config: {type(exc).__name__}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = _merge(tree, loaded)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        cfg = _build(RunConfig, tree, "")
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None
    return cfg.validate()


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from uniopd.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_help(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for `uniopd config`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_help(tp, key + "."))
            continue
        if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            rows.extend(field_help(typing.get_args(tp)[1], key + ".<name>."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
