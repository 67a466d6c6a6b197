"""OPD step throughput: uniopd's Trainer against TRL's GKDTrainer, same models, same work.

    python benchmarks/step_throughput.py                 # defaults: CPU, 2 threads, 8 prompts x 64 tokens
    python benchmarks/step_throughput.py --skip-trl --profile

Both frameworks distil the same random student (~30M parameters) from the same random
teacher (~50M) that share SmolLM2's 49,152-token tokenizer, on the same prompts, with
8 prompts per step, one rollout per prompt, exactly --new-tokens generated tokens per
response (EOS is blocked until then: uniopd `rollout.min_new_tokens`, TRL
`generation_config.min_new_tokens`), float32, the same torch thread count.

* uniopd: `uniopd.train.trainer.Trainer`, `loss.kind=sampled`, calibration and balancing off,
  `logging.diagnostics=false`; one `Trainer.step()` per step (its metrics go to
  `<workdir>/uniopd/metrics.jsonl` as in `Trainer.train`).
* TRL: `trl.experimental.gkd.GKDTrainer` with lmbda=1 (always on-policy), beta=1 (reverse
  KL over the full vocabulary), temperature=1, no gradient checkpointing, bf16 off.

Each framework runs in its own worker subprocess (so the RSS high-water marks are separate)
and the parent alternates them step by step (u, t, t, u, u, t, ...), so machine noise hits
both alike; medians are over the steps after --warmup.

Per step it reports seconds, generated tokens/s, the phases (uniopd: time/rollout,
time/teacher, time/update, time/verify from its metrics; TRL: the generate call, the teacher
forward, and the rest = student forward/backward/optimizer), and for every phase an
estimate of achieved FLOP/s (2·params·tokens forward, 6·params·tokens forward+backward, plus
causal attention) against the fp32 matmul peak measured here with large torch.matmul calls.

The LAST line of output is one JSON object (also written to --out when given).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__:  # imported as benchmarks.step_throughput
    from ._bench_models import (CACHE, build_models, decode_flops, forward_flops, llama_dims,
                                measure_matmul_peak, write_prompts)
else:  # run as a script (also how the worker processes start)
    from _bench_models import (CACHE, build_models, decode_flops, forward_flops, llama_dims,
                               measure_matmul_peak, write_prompts)


# ============================================================================ helpers

def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def minor_faults() -> int:
    """Minor page faults of this process so far: each is a 4 KB page zeroed on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "WANDB_DISABLED": "true",
                "PYTHONUNBUFFERED": "1"})
    return env


def med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ============================================================================ workers
# Protocol: the worker prints one JSON line when ready, then answers each "step" line from
# stdin with one JSON line; "quit" ends it. Everything else the libraries print goes to stderr.

class Channel:
    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # library prints -> stderr
        sys.stdout = sys.stderr

    def send(self, obj: dict) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    @staticmethod
    def recv() -> str:
        line = sys.stdin.readline()
        return line.strip() or "quit"


def worker_uniopd(args) -> None:
    ch = Channel()
    import torch

    torch.set_num_threads(args.threads)
    from uniopd.config import load_config
    from uniopd.train.logger import MetricsLogger
    from uniopd.train.trainer import Trainer

    run_dir = Path(args.workdir) / "uniopd"
    overrides = [
        f"model.path={args.student}", f"teachers.teacher.path={args.teacher}", "teachers.teacher.domains=['*']",
        f"data.train={args.prompt_file}", f"rollout.prompts_per_step={args.prompts}", "rollout.n=1",
        f"rollout.max_new_tokens={args.new_tokens}", f"rollout.min_new_tokens={args.new_tokens}",
        f"rollout.batch_size={max(64, args.prompts)}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        f"loss.kind={args.uniopd_loss}", "loss.direction=reverse", "calibration.enabled=false", "balance.online=false",
        f"trainer.micro_batch_size={args.prompts}", "trainer.mini_batches=1", f"trainer.lr={args.lr}",
        f"trainer.threads={args.threads}", "trainer.device=cpu", f"trainer.output_dir={run_dir}",
        "trainer.save_every=0", f"trainer.steps={args.warmup + args.steps}", "model.dtype=float32",
        "teachers.teacher.dtype=float32", "logging.diagnostics=false", "logging.progress=false",
        "logging.tensorboard=false", f"trainer.reuse_cpu_memory={args.uniopd_reuse_cpu_memory == 'on'}",
        f"model.share_prompt_prefix={args.uniopd_share_prefix == 'on'}",
        f"teachers.teacher.share_prompt_prefix={args.uniopd_share_prefix == 'on'}",
    ]
    if args.uniopd_rollout_threads:
        overrides.append(f"rollout.threads={args.uniopd_rollout_threads}")
    if args.rollout_backend == "vllm":  # rollout.threads is the hf loop's; vLLM binds its own
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        overrides = [o for o in overrides if not o.startswith("rollout.threads=")] + ["rollout.backend=vllm"]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    logger = MetricsLogger(run_dir, cfg.logging, cfg.trainer.steps)
    prompt_lens = sorted({len(p) for p in trainer.prompt_ids})
    # What every micro-batch shares at least (the prompts' common header), for the FLOP model.
    from uniopd.models.prefix import shared_prefix_len
    shared = shared_prefix_len(trainer.prompt_ids) if cfg.model.share_prompt_prefix else 0
    ch.send({"ready": True, "threads": torch.get_num_threads(), "prompt_lens": prompt_lens, "shared_prefix": shared,
             "rss_mb": rss_now_mb(), "metrics": str(logger.metrics_path)})
    while True:
        cmd = ch.recv()
        if cmd == "quit":
            break
        if cmd == "profile":
            ch.send(profile_uniopd(trainer, Path(args.workdir)))
            continue
        t, faults = time.perf_counter(), minor_faults()
        metrics, samples = trainer.step()
        logger.log(trainer.step_idx, metrics, samples)
        wall = time.perf_counter() - t
        ch.send({"wall": wall, "rollout": metrics["time/rollout"], "verify": metrics["time/verify"],
                 "old_logprobs": metrics.get("time/old_logprobs", 0.0),
                 "teacher": metrics["time/teacher"], "update": metrics["time/update"],
                 "tokens": float(metrics["update/tokens"]), "resp_len": metrics["resp_len"],
                 "loss": metrics.get("loss"), "threads": torch.get_num_threads(), "rss_peak_mb": rss_peak_mb(),
                 "minor_faults": minor_faults() - faults})
    logger.close()
    trainer.engine.close()  # a vLLM engine in this process: shut it down before the interpreter exits
    ch.send({"done": True, "rss_peak_mb": rss_peak_mb()})


def profile_uniopd(trainer, workdir: Path) -> dict[str, Any]:
    """One uniopd step under torch.profiler, with labelled regions (patched in this process only)."""
    import functools

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import uniopd.algo.losses.chunked as chunked
    import uniopd.rollout.hf as hf
    import uniopd.teachers.local as local
    import uniopd.train.update as upd

    def labelled(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return wrapper

    patches = [(hf, "sample_top_p", "rollout/sample_top_p"), (hf, "generate_batch", "rollout/generate_batch"),
               (chunked, "chunked_token_logprobs", "lm_head+logsoftmax (chunked_token_logprobs)"),
               (upd, "build_layout", "update/build_layout"), (local, "build_layout", "teacher/build_layout"),
               (upd, "ppo_clip_loss", "update/ppo_clip_loss")]
    saved = [(m, a, getattr(m, a)) for m, a, _ in patches]
    for m, a, label in patches:
        setattr(m, a, labelled(label, getattr(m, a)))
    student = trainer.student.model
    teacher = next(iter(trainer.teachers.values())).model
    inst = [(student, "forward", "student/CausalLM.forward (rollout)"),
            (student.model, "forward", "student/base.forward"),
            (teacher.model, "forward", "teacher/base.forward"),
            (trainer.optimizer, "step", "update/optimizer.step"),
            (trainer, "collect", "PHASE rollout+verify"), (trainer, "score", "PHASE teacher"),
            (trainer, "update", "PHASE update"), (trainer, "verify", "verify")]
    for obj, attr, label in inst:
        setattr(obj, attr, labelled(label, getattr(obj, attr)))
    orig_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        with record_function("update/loss.backward"):
            return orig_backward(self, *a, **k)
    torch.Tensor.backward = backward
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            t = time.perf_counter()
            trainer.step()
            wall = time.perf_counter() - t
    finally:
        torch.Tensor.backward = orig_backward
        for m, a, fn in saved:
            setattr(m, a, fn)
        for obj, attr, _ in inst:
            try:
                delattr(obj, attr)
            except AttributeError:
                pass
    events = prof.key_averages()
    labels = [e for e in events if e.key.startswith(("PHASE", "rollout/", "student/", "teacher/", "update/",
                                                      "lm_head", "verify"))]
    regions = {e.key: {"total_s": e.cpu_time_total / 1e6, "calls": e.count} for e in labels}
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    top_ops = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops[:25]]
    text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    out = workdir / "uniopd_profile.txt"
    out.write_text(text)
    try:
        prof.export_chrome_trace(str(workdir / "uniopd_profile_trace.json"))
    except Exception:  # noqa: BLE001 - the trace is a convenience
        pass
    return {"wall": wall, "regions": regions, "top_ops": top_ops, "table": str(out)}


def worker_trl(args) -> None:
    ch = Channel()
    import torch

    torch.set_num_threads(args.threads)
    if args.trl_reuse_cpu_memory:  # uniopd's allocator setting, given to TRL for a like-for-like run
        from uniopd.runtime import reuse_freed_cpu_memory

        reuse_freed_cpu_memory()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(args.student)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    # The collator takes messages[:-1] as the prompt; the assistant turn is replaced on-policy.
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["answer"]}]} for r in rows])
    total = args.warmup + args.steps
    gargs = GKDConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.prompts,
        gradient_accumulation_steps=1, max_steps=total, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1,
        save_strategy="no", report_to="none", bf16=False, fp16=False, use_cpu=True,
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=args.new_tokens)

    class Gate(TrainerCallback):
        """Runs one step per parent command and reports it; time between release and step end."""

        def __init__(self):
            self.acc = {"generate": 0.0, "teacher": 0.0, "tokens": 0.0}
            self.t0 = 0.0

        def _wait(self, control):
            cmd = ch.recv()
            if cmd != "step":
                control.should_training_stop = True
            self.acc = {k: 0.0 for k in self.acc}
            self.t0, self.faults = time.perf_counter(), minor_faults()
            return control

        def on_train_begin(self, a, state, control, **kw):
            return self._wait(control)

        def on_step_end(self, a, state, control, **kw):
            wall = time.perf_counter() - self.t0
            ch.send({"wall": wall, "generate": self.acc["generate"], "teacher": self.acc["teacher"],
                     "update": wall - self.acc["generate"] - self.acc["teacher"], "tokens": self.acc["tokens"],
                     "threads": torch.get_num_threads(), "rss_peak_mb": rss_peak_mb(),
                     "minor_faults": minor_faults() - self.faults})
            if state.global_step >= total:
                return control
            return self._wait(control)

    gate = Gate()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=gargs, train_dataset=ds,
                         processing_class=tok, callbacks=[gate])
    # Same response length as uniopd: block EOS until max_new_tokens.
    trainer.generation_config.min_new_tokens = args.new_tokens
    trainer.generation_kwargs["min_new_tokens"] = args.new_tokens
    torch.set_num_threads(args.threads)

    gen = trainer.generate_on_policy_outputs

    def timed_generate(model, inputs, generation_config):
        t = time.perf_counter()
        ids, attn, labels = gen(model, inputs, generation_config)
        gate.acc["generate"] += time.perf_counter() - t
        gate.acc["tokens"] += float((labels != -100).sum())
        return ids, attn, labels
    trainer.generate_on_policy_outputs = timed_generate

    tmod = trainer.teacher_model
    tstart: list[float] = []
    tmod.register_forward_pre_hook(lambda m, a: tstart.append(time.perf_counter()))

    def teacher_done(m, a, o):
        gate.acc["teacher"] += time.perf_counter() - tstart.pop()
    tmod.register_forward_hook(teacher_done)

    ch.send({"ready": True, "threads": torch.get_num_threads(), "rss_mb": rss_now_mb(),
             "trl_version": __import__("trl").__version__, "optim": gargs.optim,
             "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
             "gen_config": {k: getattr(trainer.generation_config, k) for k in
                            ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                             "eos_token_id", "pad_token_id", "use_cache")}})
    trainer.train()
    ch.recv()  # the parent's final "quit"
    ch.send({"done": True, "rss_peak_mb": rss_peak_mb()})


# ============================================================================ parent

class Worker:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, text=True, bufsize=1)
        self.log_path = log_path

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text()[-4000:]
            raise RuntimeError(f"{self.name} worker died (rc={self.proc.returncode}); log tail:\n{tail}")
        return json.loads(line)

    def cmd(self, text: str) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        try:
            final = self.cmd("quit")
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
            self.log.close()
        return final


def summarise(steps: list[dict], keys: list[str]) -> dict[str, float]:
    return {k: med([s[k] for s in steps]) for k in keys}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="measured steps per framework (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and left out of the medians")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (one rollout each)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per response (min = max)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in each framework")
    p.add_argument("--student", help="student model directory (default: a random ~30M Llama, cached)")
    p.add_argument("--teacher", help="teacher model directory (default: a random ~50M Llama, cached)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--uniopd-loss", default="sampled", choices=("sampled", "full"),
                   help="uniopd loss.kind (full = full-vocabulary reverse KL, the loss GKD beta=1 computes)")
    p.add_argument("--uniopd-rollout-threads", type=int, default=0,
                   help="uniopd rollout.threads (0: same as --threads, as TRL's generate)")
    p.add_argument("--uniopd-reuse-cpu-memory", default="on", choices=("on", "off"),
                   help="uniopd's trainer.reuse_cpu_memory (on by default in uniopd)")
    p.add_argument("--uniopd-share-prefix", default="on", choices=("on", "off"),
                   help="uniopd's model/teacher share_prompt_prefix (on by default in uniopd)")
    p.add_argument("--trl-reuse-cpu-memory", action="store_true",
                   help="give TRL's process the same allocator setting (uniopd.runtime.reuse_freed_cpu_memory)")
    p.add_argument("--rollout-backend", default="hf", choices=("hf", "vllm"),
                   help="uniopd rollout.backend (vllm: run with the vLLM venv's python, .venv-vllm/bin/python)")
    p.add_argument("--skip-trl", action="store_true", help="run uniopd only")
    p.add_argument("--profile", action="store_true", help="also profile one uniopd step (torch.profiler)")
    p.add_argument("--workdir", help="run files (prompts, metrics.jsonl, logs, profile); default: a temp dir")
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--worker", choices=("uniopd", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker == "uniopd":
        worker_uniopd(args)
        return {}
    if args.worker == "trl":
        worker_trl(args)
        return {}

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="uniopd_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if bool(args.student) != bool(args.teacher):
        p.error("--student and --teacher go together")
    if not args.student:
        print("preparing models (cached under %s) ..." % CACHE, file=sys.stderr)
        student, teacher = build_models(args)
    else:
        student, teacher = Path(args.student), Path(args.teacher)
    prompt_file = write_prompts(workdir / "prompts.jsonl", max(64, 2 * args.prompts))
    peak = measure_matmul_peak(args.threads)
    print(f"fp32 matmul peak ({args.threads} threads): {peak / 1e9:.1f} GFLOP/s", file=sys.stderr)

    env = thread_env(args.threads)
    common = [sys.executable, os.path.abspath(__file__), "--student", str(student), "--teacher", str(teacher),
              "--prompt-file", str(prompt_file), "--workdir", str(workdir), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens),
              "--threads", str(args.threads), "--lr", str(args.lr), "--uniopd-loss", args.uniopd_loss,
              "--uniopd-rollout-threads", str(args.uniopd_rollout_threads),
              "--uniopd-reuse-cpu-memory", args.uniopd_reuse_cpu_memory, "--uniopd-share-prefix", args.uniopd_share_prefix,
              "--rollout-backend", args.rollout_backend]
    if args.trl_reuse_cpu_memory:
        common.append("--trl-reuse-cpu-memory")
    names = ["uniopd"] + ([] if args.skip_trl else ["trl"])
    load_start = os.getloadavg()
    workers = {n: Worker(n, common + ["--worker", n], env, workdir / f"{n}.log") for n in names}
    ready = {n: w.read() for n, w in workers.items()}
    steps: dict[str, list[dict]] = {n: [] for n in names}
    profile = None
    try:
        for i in range(args.warmup + args.steps):
            order = names if i % 2 == 0 else names[::-1]  # u t | t u | u t ...: noise hits both alike
            for n in order:
                r = workers[n].cmd("step")
                steps[n].append(r)
                print(f"step {i + 1:2d} {n:6s} {r['wall']:.2f}s", file=sys.stderr)
        if args.profile:
            profile = workers["uniopd"].cmd("profile")
    finally:
        finals = {}
        for n, w in workers.items():
            try:
                finals[n] = w.close()
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{n}: {exc}", file=sys.stderr)
                w.proc.kill()

    measured = {n: s[args.warmup:] for n, s in steps.items()}
    # FLOP estimates: every prompt has the same length here (see write_prompts).
    P = med([float(x) for x in ready["uniopd"]["prompt_lens"]])
    B, T = args.prompts, args.new_tokens
    ds, dt = llama_dims(student), llama_dims(teacher)
    S = P + T
    C = ready["uniopd"]["shared_prefix"]  # positions uniopd runs once per micro-batch, not per row
    flops_u = {"rollout": decode_flops(ds, B, int(P), T), "teacher": forward_flops(dt, B, int(S), T, prefix=C),
               "update": 3 * forward_flops(ds, B, int(S), T, prefix=C)}
    # TRL: lm_head (and log-softmax) over every position of both models, not just the response.
    flops_t = {"generate": decode_flops(ds, B, int(P), T), "teacher": forward_flops(dt, B, int(S), int(S)),
               "update": 3 * forward_flops(ds, B, int(S), int(S))}

    res: dict[str, Any] = {
        "config": {"prompts": B, "new_tokens": T, "prompt_tokens": P, "threads": args.threads,
                   "steps": args.steps, "warmup": args.warmup, "dtype": "float32", "rollouts_per_prompt": 1,
                   "uniopd_loss": args.uniopd_loss,
                   "uniopd_rollout_threads": args.uniopd_rollout_threads or args.threads,
                   "uniopd_reuse_cpu_memory": args.uniopd_reuse_cpu_memory == "on",
                   "uniopd_shared_prefix_tokens": C,
                   "trl_reuse_cpu_memory": args.trl_reuse_cpu_memory,
                   "student_params": ds["params"], "teacher_params": dt["params"],
                   "vocab": json.loads((Path(student) / "config.json").read_text())["vocab_size"]},
        "peak_matmul_gflops": peak / 1e9,
        "loadavg_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "workdir": str(workdir),
    }
    u = measured["uniopd"]
    us = summarise(u, ["wall", "rollout", "teacher", "update", "verify", "tokens", "minor_faults", "old_logprobs"])
    res["uniopd_rollout_backend"] = args.rollout_backend
    res["uniopd_old_logprobs_s"] = us["old_logprobs"]  # the trainer's recompute of a vLLM engine's log-probs
    res["uniopd_s_per_step"] = us["wall"]
    res["uniopd_tokens_per_s"] = us["tokens"] / us["wall"]
    res["uniopd_phase_s"] = {k: us[k] for k in ("rollout", "teacher", "update", "verify")}
    res["uniopd_phase_gflops"] = {k: flops_u[k] / us[k] / 1e9 for k in flops_u}
    res["uniopd_phase_frac_of_peak"] = {k: flops_u[k] / us[k] / peak for k in flops_u}
    res["uniopd_peak_rss_mb"] = u[-1]["rss_peak_mb"]
    res["uniopd_minor_faults_per_step"] = us["minor_faults"]
    res["uniopd_rss_after_load_mb"] = ready["uniopd"]["rss_mb"]
    res["threads_seen"] = {n: sorted({s["threads"] for s in st}) for n, st in measured.items()}
    res["uniopd_steps_s"] = [round(s["wall"], 3) for s in u]
    res["uniopd_steps_rollout_s"] = [round(s["rollout"], 3) for s in u]
    res["uniopd_steps_rss_peak_mb"] = [round(s["rss_peak_mb"]) for s in u]  # growth would show here
    res["uniopd_metrics"] = ready["uniopd"]["metrics"]
    if "trl" in measured:
        t = measured["trl"]
        ts = summarise(t, ["wall", "generate", "teacher", "update", "tokens", "minor_faults"])
        res["trl_version"] = ready["trl"]["trl_version"]
        res["trl_s_per_step"] = ts["wall"]
        res["trl_tokens_per_s"] = ts["tokens"] / ts["wall"]
        res["tokens_per_s_ratio"] = res["uniopd_tokens_per_s"] / res["trl_tokens_per_s"]
        res["trl_phase_s"] = {k: ts[k] for k in ("generate", "teacher", "update")}
        res["trl_phase_gflops"] = {k: flops_t[k] / ts[k] / 1e9 for k in flops_t}
        res["trl_phase_frac_of_peak"] = {k: flops_t[k] / ts[k] / peak for k in flops_t}
        res["trl_peak_rss_mb"] = t[-1]["rss_peak_mb"]
        res["trl_minor_faults_per_step"] = ts["minor_faults"]
        res["trl_rss_after_load_mb"] = ready["trl"]["rss_mb"]
        res["trl_steps_s"] = [round(s["wall"], 3) for s in t]
        res["trl_steps_generate_s"] = [round(s["generate"], 3) for s in t]
        res["trl_generation_config"] = ready["trl"]["gen_config"]
        res["trl_gradient_checkpointing"] = ready["trl"]["gradient_checkpointing"]
        res["phase_ratio_trl_over_uniopd"] = {
            "rollout": ts["generate"] / us["rollout"], "teacher": ts["teacher"] / us["teacher"],
            "update": ts["update"] / (us["update"] + us["verify"])}
    else:
        res["trl_tokens_per_s"] = None
        res["tokens_per_s_ratio"] = None
    if profile:
        res["uniopd_profile"] = profile

    print_table(res, flops_u, flops_t)
    line = json.dumps(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(line)
    return res


# Why a phase can sit below half the matmul peak on these shapes (see benchmarks/README.md).
BELOW_HALF_WHY = {
    "rollout": "each decode step multiplies only rows-in-flight (prompts x n) by every weight matrix, so "
               "it is bound by reading the weights, not by FLOPs: even on oneDNN-packed weights the GEMMs read "
               "them at about half the speed of a plain read (benchmarks/decode_step.py), and every read "
               "evicts the caches, so the small ops between GEMMs (norms, RoPE, attention, sampling) run "
               "cold, about a third of the step. More rows per step (rollout.n, batch_size) raise it.",
    "teacher": "one forward over the padded batch; short sequences make thin GEMMs and the 49k-row "
               "output layer's log-softmax is memory-bound.",
    "update": "forward + backward at micro_batch_size rows; the output layer's softmax and its backward "
              "are memory-bound, and the optimizer step and attention are not matmuls.",
}


def print_table(res: dict, flops_u: dict, flops_t: dict) -> None:
    c = res["config"]
    print(f"OPD step throughput: {c['prompts']} prompts x {c['new_tokens']} new tokens (prompt {c['prompt_tokens']:.0f}"
          f" tokens), {c['threads']} threads, fp32; student {c['student_params'] / 1e6:.1f}M, teacher "
          f"{c['teacher_params'] / 1e6:.1f}M, vocab {c['vocab']}; medians of {c['steps']} steps; "
          f"fp32 matmul peak {res['peak_matmul_gflops']:.1f} GFLOP/s")
    on_off = {True: "on", False: "off"}
    print(f"freed CPU memory reused (trainer.reuse_cpu_memory): uniopd {on_off[c['uniopd_reuse_cpu_memory']]}, "
          f"TRL {on_off[c['trl_reuse_cpu_memory']]} (--trl-reuse-cpu-memory); uniopd runs the prompts' shared "
          f"{c['uniopd_shared_prefix_tokens']}-token prefix once per micro-batch (--uniopd-share-prefix)")
    has_trl = res.get("trl_tokens_per_s") is not None
    print(f"{'':22s} {'uniopd':>10s}" + (f" {'TRL GKD':>10s} {'TRL/uniopd':>10s}" if has_trl else ""))

    def row(label, uval, tval=None, fmt="{:10.3f}"):
        s = f"{label:22s} " + fmt.format(uval)
        if has_trl and tval is not None:
            s += " " + fmt.format(tval) + (f" {tval / uval:10.2f}" if uval else "")
        print(s)
    row("s/step", res["uniopd_s_per_step"], res.get("trl_s_per_step"))
    row("tokens/s", res["uniopd_tokens_per_s"], res.get("trl_tokens_per_s"), "{:10.1f}")
    up, tp = res["uniopd_phase_s"], res.get("trl_phase_s", {})
    row("rollout / generate s", up["rollout"], tp.get("generate"))
    row("teacher s", up["teacher"], tp.get("teacher"))
    row("update s (+verify)", up["update"] + up["verify"], tp.get("update"))
    row("peak RSS MB", res["uniopd_peak_rss_mb"], res.get("trl_peak_rss_mb"), "{:10.0f}")
    row("page faults / step", res["uniopd_minor_faults_per_step"], res.get("trl_minor_faults_per_step"), "{:10.0f}")
    for k, tk in (("rollout", "generate"), ("teacher", "teacher"), ("update", "update")):
        ug = res["uniopd_phase_gflops"][k]
        s = f"{k + ' GFLOP/s (%peak)':22s} {ug:6.1f} ({100 * ug * 1e9 / (res['peak_matmul_gflops'] * 1e9):3.0f}%)"
        if has_trl:
            tg = res["trl_phase_gflops"][tk]
            s += f" {tg:6.1f} ({100 * tg / res['peak_matmul_gflops']:3.0f}%)"
        print(s)
        if ug < 0.5 * res["peak_matmul_gflops"]:
            print(f"  {k} below half of peak: {BELOW_HALF_WHY[k]}")
    if has_trl:
        print(f"tokens/s ratio uniopd/TRL: {res['tokens_per_s_ratio']:.2f}")


if __name__ == "__main__":
    main()
