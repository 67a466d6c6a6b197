"""The OPD training loop.

One step:  prompts → rollout engine (student, n per prompt) → verify (outcomes) → online
balance → teacher scorers (routed by domain, teacher view) → token advantages → margin
calibration → update → engine weight sync → metrics / checkpoint. Each phase is one call on a
seam (`RolloutEngine`, `TeacherScorer`, the loss registry, `TrainingStrategy`); nothing
reaches back upstream.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from uniopd.batch import StepBatch
from uniopd.config import RunConfig, save_config
from uniopd.data.prompts import load_prompt_records, prepare_prompts
from uniopd.data.records import PromptRecord
from uniopd.data.sampler import PromptSampler
from uniopd.models.loading import LoadedModel, load_model
from uniopd.models.multimodal import StudentVision
from uniopd.rollout.base import EngineFailed, build_rollout_engine
from uniopd.rollout.collect import ResponseVerifier, collect_step
from uniopd.runtime import rng_state, set_rng_state, setup_process
from uniopd.teachers.base import ScorerContext, TeacherScorer, TeacherServiceError, scorer_class
from uniopd.teachers.router import Router
from uniopd.teachers.views import check_views
from uniopd.train.checkpoint import prepare_run_dir
from uniopd.train.logger import MetricsLogger, NullLogger
from uniopd.train.plan import plan_teachers
from uniopd.train.distributed import build_strategy, gather_step_batch, merge_teacher_metrics, take_rows
from uniopd.train.token_advantages import token_advantages
from uniopd.train.update import policy_update

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients."""


class TeacherUnavailable(TrainingStopped, TeacherServiceError):
    """A teacher failed on more than `teachers.<name>.max_failed_share` of a step's rows."""


class Trainer:
    def __init__(self, cfg: RunConfig, *, records: list[PromptRecord] | None = None,
                 student: LoadedModel | None = None, teachers: dict[str, LoadedModel] | None = None):
        """records / student / teachers: given in code instead of loaded from the config (tests, demo)."""
        self.cfg = cfg
        # Impossible backend / loss / diagnostics combinations fail here, before any model loads.
        self.plan = plan_teachers(cfg)
        self.strategy = build_strategy(cfg.trainer)
        self.device = setup_process(cfg.trainer)
        # A file (/dev/null), a read-only or unwritable directory fails here, naming the key.
        self.run_dir = prepare_run_dir(cfg.trainer.output_dir)

        records = records if records is not None else load_prompt_records(cfg.data, cfg.data.train)
        self.router = Router(cfg.teachers)
        self.router.check(records)  # unroutable records fail here, before any model loads
        check_views(records, self.router.teacher_for, cfg.teachers)  # e.g. image_text view without image_text

        self.student = student or load_model(cfg.model, "model", device=self.device)
        self.student.model = self.strategy.prepare_model(self.student.model)
        # A vision-language student encodes prompts with its processor and never samples image
        # placeholder tokens; a text student has no `vision` (the text path).
        self.vision = StudentVision.of(self.student, cfg.model)
        self.suppress_ids = self.vision.suppress_ids if self.vision else []
        self.engine = build_rollout_engine(cfg.rollout, self.student, suppress_ids=self.suppress_ids)
        self.verifier = ResponseVerifier(self.student.tokenizer, cfg.data.domain_verifiers)
        self.teachers = self._build_teachers(teachers or {})
        check_views(records, self.router.teacher_for, cfg.teachers,
                    vision_teachers={n for n, t in self.teachers.items() if t.sees_images})
        self.records, self.prompt_ids, self.prompt_stats = prepare_prompts(
            records, self.student.tokenizer, cfg.model, cfg.data, encode=self.vision.ids if self.vision else None,
            limit=self.engine.prompt_limit(cfg.model.max_prompt_tokens))
        self._ids_by_record = {r.id: ids for r, ids in zip(self.records, self.prompt_ids)}

        # fused: one kernel over all parameters (the default on CPU is a per-tensor Python loop, ~7x slower).
        # Sharded and plain parameters cannot share one fused or foreach call.
        mixed = any(type(p.data).__name__ == "DTensor" for p in self.student.model.parameters())
        self.optimizer = torch.optim.AdamW(self.student.model.parameters(), lr=cfg.trainer.lr,
                                           betas=tuple(cfg.trainer.betas), weight_decay=cfg.trainer.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda") and not mixed,
                                           foreach=False if mixed else None)
        warmup = cfg.trainer.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        self.sampler = PromptSampler(list(range(len(self.records))), seed=cfg.trainer.seed,
                                     shuffle=cfg.data.shuffle)
        # Each process draws its own samples; process 0's stream is the single-process one.
        self.generator = torch.Generator(self.device).manual_seed(cfg.trainer.seed + 7919 * self.strategy.rank)
        self.generator_cpu = torch.Generator().manual_seed(cfg.trainer.seed + 1)  # balancing choices
        self.step_idx = 0
        self.bad_steps = 0
        self._stop_signal: int | None = None
        self._eval_records: list[PromptRecord] | None = None
        if self.strategy.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

    def _build_teachers(self, given: dict[str, LoadedModel]) -> dict[str, TeacherScorer]:
        out = {}
        for name, tcfg in self.cfg.teachers.items():
            ctx = ScorerContext(self.student, self.device, chunk_size=self.cfg.loss.chunk_size,
                                micro_batch_size=self.cfg.trainer.micro_batch_size,
                                suppress_ids=list(self.suppress_ids), preloaded=given.get(name),
                                strategy=self.strategy)
            out[name] = scorer_class(name, tcfg).from_config(name, tcfg, ctx)
        return out

    def vision_inputs(self, records: list[PromptRecord]) -> list | None:
        """Per-record vision inputs of a vision-language student; None for a text student."""
        return self.vision.inputs(records) if self.vision else None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_idx, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "rng": rng_state(), "generator": self.generator.get_state(), "generator_cpu": self.generator_cpu.get_state(),
                "bad_steps": self.bad_steps}

    def save(self) -> Path:
        # A VLM's processor saves its tokenizer, image processor and chat template together.
        return self.strategy.save(self.run_dir, self.step_idx, self.student.model,
                                  self.student.processor or self.student.tokenizer, self.state_dict(),
                                  keep=self.cfg.trainer.keep_checkpoints, optimizer=self.optimizer)

    def resume(self) -> bool:
        """Continue from the newest verified checkpoint in the run directory, if any."""
        found = self.strategy.load_latest(self.run_dir, self.student.model, self.optimizer)
        if found is None:
            return False
        path, state = found
        self.engine.update_weights(self.student.model)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        if self.strategy.rank:  # the checkpoint holds process 0's streams; the others get their own
            self.generator.manual_seed(self.cfg.trainer.seed + 7919 * self.strategy.rank + 104729 * state["step"])
        self.generator_cpu.set_state(state["generator_cpu"])
        self.step_idx, self.bad_steps = state["step"], state["bad_steps"]
        log.info("resumed from %s at step %d", path, self.step_idx)
        return True

    # ------------------------------------------------------------------ one step, phase by phase
    def collect(self, indices: list[int]) -> tuple[StepBatch, dict[str, float]]:
        """Rollout + verify, with correctness-aware oversampling and selection when enabled."""
        with self.strategy.full_weights(self.student.model):
            return collect_step(self.engine, [self.records[i] for i in indices],
                                [self.prompt_ids[i] for i in indices], n=self.cfg.rollout.n, balance=self.cfg.balance,
                                verifier=self.verifier, vision=self.vision, generator=self.generator,
                                generator_cpu=self.generator_cpu)

    def score(self, batch: StepBatch) -> dict[str, float]:
        """Teacher scores for every response token, each row scored by its routed teacher.

        Rows a teacher could not score (a served teacher down or answering garbage) get
        `batch.teacher_ok_B` False and their teacher log-probs set to the student's, so nothing
        downstream reads a signal there; past `max_failed_share` of a teacher's rows the run stops.
        Returns per-teacher metrics (over every process): failed rows, wall time, scored tokens per second.
        """
        batch.teacher_names = [self.router.teacher_for(r) for r in batch.records]
        teacher_logp_BT = torch.zeros_like(batch.old_logp_BT)
        ok_B = torch.ones(batch.size, dtype=torch.bool)
        metrics: dict[str, float] = {}
        for name, teacher in self.teachers.items():
            rows = [b for b, t in enumerate(batch.teacher_names) if t == name]
            if not rows:
                if teacher.collective:  # its forwards are collectives: this process pads them
                    teacher.score([], [], want=self.plan.want[name])
                continue
            t = time.perf_counter()
            scores = teacher.score([batch.records[b] for b in rows], [batch.samples[b].response_ids for b in rows],
                                   want=self.plan.want[name])
            seconds = time.perf_counter() - t
            lengths = [len(batch.samples[b].response_ids) for b in rows]
            hidden = scores.hidden_NH.split(lengths) if scores.hidden_NH is not None else [None] * len(rows)
            topk = (list(zip(scores.topk_ids_NK.split(lengths), scores.topk_logp_NK.split(lengths)))
                    if scores.topk_ids_NK is not None else [None] * len(rows))
            ok_S = scores.ok_S.cpu() if scores.ok_S is not None else torch.ones(len(rows), dtype=torch.bool)
            for b, logp, hid, top, ok in zip(rows, scores.logp_N.cpu().split(lengths), hidden, topk, ok_S.tolist()):
                if not ok:
                    ok_B[b] = False
                    teacher_logp_BT[b] = batch.old_logp_BT[b]  # log-ratio 0: no signal, even where read
                    continue
                teacher_logp_BT[b, : len(logp)] = logp
                if hid is not None:
                    batch.teacher_hidden[b] = hid
                if top is not None:
                    batch.teacher_topk[b] = top
            failed = int((~ok_S).sum())
            metrics.update({f"teacher/{name}/failed_rows": float(failed), f"teacher/{name}/latency_s": seconds,
                            f"teacher/{name}/tokens_per_s": sum(lengths) / max(seconds, 1e-9),
                            **{f"teacher/{name}/{k}": v for k, v in scores.metrics.items()}})
            share = self.cfg.teachers[name].max_failed_share
            if failed > share * len(rows):
                raise TeacherUnavailable(
                    f"teacher {name!r} gave no usable signal for {failed} of its {len(rows)} rows at step "
                    f"{self.step_idx + 1}, more than teachers.{name}.max_failed_share={share} ({scores.error}); "
                    f"stopping without saving (the last checkpoint is intact)")
        batch.teacher_logp_BT = teacher_logp_BT
        batch.teacher_ok_B = None if bool(ok_B.all()) else ok_B
        if self.strategy.world_size > 1:  # every process scored its own rows
            metrics = merge_teacher_metrics(self.strategy.all_gather_objects(metrics))
        return metrics

    def update(self, batch: StepBatch) -> dict[str, float]:
        heads = {n: t.output_head() for n, t in self.teachers.items() if self.plan.needs_hidden(n)}
        prompt_ids = [self.prompt_ids_for(r) for r in batch.records]
        result = policy_update(self.student, batch, self.optimizer, loss_cfg=self.cfg.loss,
                               trainer_cfg=self.cfg.trainer, prompt_ids=prompt_ids,
                               temperature=self.cfg.rollout.temperature, teacher_heads=heads,
                               diagnostics=self.cfg.logging.diagnostics,
                               multimodal=self.vision_inputs(batch.records), suppress_ids=self.suppress_ids or None,
                               share_prefix=self.cfg.model.share_prompt_prefix, strategy=self.strategy)
        if result.skipped_steps < self.cfg.trainer.mini_batches:
            self.scheduler.step()  # a step whose updates were all skipped does not advance the schedule
            self.engine.update_weights(self.student.model)
        if result.skipped_steps:
            self.bad_steps += 1
            if self.bad_steps >= self.cfg.trainer.max_bad_steps:
                raise TrainingStopped(f"{self.bad_steps} consecutive steps had a non-finite loss or gradient; "
                                      f"stopping without saving (last good checkpoint is intact)")
        else:
            self.bad_steps = 0
        result.metrics["update/skipped"] = float(result.skipped_steps)
        return result.metrics

    def recompute_old_logprobs(self, batch: StepBatch) -> dict[str, float]:
        """The engine's log-probs are not the trainer's: recompute them (`uniopd.train.old_logprobs`)."""
        from uniopd.train.old_logprobs import replace_engine_logprobs, trainer_logprobs

        logp_BT = trainer_logprobs(self.student, batch, [self.prompt_ids_for(r) for r in batch.records],
                                   temperature=self.cfg.rollout.temperature,
                                   micro_batch_size=self.cfg.trainer.micro_batch_size,
                                   chunk_size=self.cfg.loss.chunk_size, share_prefix=self.cfg.model.share_prompt_prefix,
                                   multimodal=self.vision_inputs(batch.records), suppress_ids=self.suppress_ids or None)
        return replace_engine_logprobs(batch, logp_BT, self.cfg.rollout, self.strategy)

    def prompt_ids_for(self, record: PromptRecord) -> list[int]:
        return self._ids_by_record[record.id]

    def step(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        timings: dict[str, float] = {}
        t = time.perf_counter()
        indices = self.strategy.shard(self.sampler.next(self.cfg.rollout.prompts_per_step))
        batch, balance_metrics = self.collect(indices)
        timings["time/rollout"] = time.perf_counter() - t - balance_metrics["time/verify"]
        if self.strategy.world_size > 1:  # online balancing's counts over every process's prompts
            balance_metrics.update(self.strategy.reduce_sums(
                {k: v for k, v in balance_metrics.items() if k.startswith("balance/")}))
        if not self.engine.support.trainer_logprobs:
            t = time.perf_counter()
            balance_metrics.update(self.recompute_old_logprobs(batch))
            timings["time/old_logprobs"] = time.perf_counter() - t

        t = time.perf_counter()
        teacher_metrics = self.score(batch) or {}
        timings["time/teacher"] = time.perf_counter() - t

        t = time.perf_counter()
        whole = batch  # with several processes: every process's rows, for whole-batch statistics
        if self.strategy.world_size > 1:
            whole, mine = gather_step_batch(self.strategy, batch, len(indices))
        calib_metrics = token_advantages(whole, self.cfg.loss, self.cfg.calibration)
        if whole is not batch:
            take_rows(whole, batch, mine)
        update_metrics = self.update(batch)
        timings["time/update"] = time.perf_counter() - t

        self.step_idx += 1
        metrics = {**self.step_metrics(whole), **balance_metrics, **teacher_metrics, **calib_metrics,
                   **update_metrics, **timings}
        total = sum(timings.values()) + balance_metrics["time/verify"]
        metrics["time/step"] = total
        metrics["tokens_per_s"] = float(whole.mask_BT.sum()) / max(total, 1e-9)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics, self.samples_for_log(whole)

    def step_metrics(self, batch: StepBatch) -> dict[str, float]:
        mask = batch.mask_BT
        kl_BT = (batch.old_logp_BT - batch.teacher_logp_BT) * mask
        lengths = mask.sum(1).float()
        out = {"teacher_kl": float(kl_BT.sum() / mask.sum().clamp(min=1)),
               "acc": float(batch.correct_B.float().mean()), "score": float(batch.score_B.mean()),
               "resp_len": float(lengths.mean()),
               "truncated": float(sum(not s.finished for s in batch.samples)) / max(batch.size, 1)}
        if self.cfg.logging.diagnostics:
            from uniopd.algo.metrics import DEFAULT_LOGRATIO_EDGES, logratio_histogram

            counts = logratio_histogram(batch.old_logp_BT, batch.teacher_logp_BT, mask)
            edges = ("-inf",) + DEFAULT_LOGRATIO_EDGES
            for lo, count in zip(edges, counts.tolist()):
                out[f"diag/logratio_hist/{lo}"] = float(count)
        by_domain: dict[str, list[int]] = defaultdict(list)
        by_teacher: dict[str, list[int]] = defaultdict(list)
        for b, r in enumerate(batch.records):
            by_domain[r.domain].append(b)
            by_teacher[batch.teacher_names[b]].append(b)
        for prefix, groups in (("domain", by_domain), ("teacher", by_teacher)):
            if len(groups) < 2 and prefix == "teacher":
                continue
            for key, rows in groups.items():
                m = mask[rows]
                out[f"{prefix}/{key}/teacher_kl"] = float(kl_BT[rows].sum() / m.sum().clamp(min=1))
                out[f"{prefix}/{key}/acc"] = float(batch.correct_B[rows].float().mean())
        return out

    def samples_for_log(self, batch: StepBatch) -> list[dict[str, Any]]:
        n = min(self.cfg.logging.log_samples, batch.size)
        texts = self.student.tokenizer.batch_decode([s.response_ids for s in batch.samples[:n]],
                                                    skip_special_tokens=True)
        return [{"id": batch.records[b].id, "response": texts[b], "correct": bool(batch.correct_B[b])}
                for b in range(n)]

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        log.warning("signal %d: finishing this step, saving a checkpoint, then exiting", signum)

    def train(self) -> dict[str, Any]:
        cfg = self.cfg.trainer
        logger = (MetricsLogger(self.run_dir, self.cfg.logging, cfg.steps, start_step=self.step_idx)
                  if self.strategy.is_main else NullLogger(self.run_dir))
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        last: dict[str, Any] = {}
        try:
            while self.step_idx < cfg.steps and not self._stopping():
                at = self.step_idx + 1
                try:
                    metrics, samples = self.step()
                    if cfg.eval_every and self.cfg.data.eval and self.step_idx % cfg.eval_every == 0:
                        metrics.update(self.evaluate())
                except EngineFailed as exc:
                    # Saving now could write a half-done step that resume cannot reproduce: the
                    # last checkpoint stays the one to continue from.
                    raise EngineFailed(f"{exc}; at step {at}, stopping without saving "
                                       f"({self._last_checkpoint()})") from exc
                logger.log(self.step_idx, metrics, samples)
                last = metrics
                if cfg.save_every and self.step_idx % cfg.save_every == 0:
                    self.save()
            if self._stopping() or (cfg.save_every == 0 or self.step_idx % cfg.save_every):
                self.save()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            logger.close()
        return {"step": self.step_idx, "metrics": last, "run_dir": str(self.run_dir),
                "metrics_path": str(logger.metrics_path), "stopped_by_signal": self._stop_signal}

    def _last_checkpoint(self) -> str:
        latest = self.run_dir / "checkpoints" / "latest"
        if not latest.is_file():
            return f"no checkpoint in {self.run_dir} yet"
        path = self.run_dir / "checkpoints" / latest.read_text(errors="replace").strip()
        return f"the last checkpoint, {path}, is intact: uniopd train --resume continues from it"

    def _stopping(self) -> bool:
        """A signal reached any process: all of them finish this step, save and stop together."""
        return bool(self.strategy.reduce_max(float(self._stop_signal is not None)))

    def evaluate(self) -> dict[str, float]:
        # Process 0 evaluates; an engine spread over processes needs all of them to sample with it
        # (each asks the same, so it samples once) and process 0's numbers are kept.
        with self.strategy.full_weights(self.student.model):
            if self.strategy.is_main or self.engine.collective:
                metrics = self._evaluate()
                return metrics if self.strategy.is_main else {}
            return {}

    def _evaluate(self) -> dict[str, float]:
        from uniopd.evaluate import evaluate_model

        if self._eval_records is None:
            self._eval_records = load_prompt_records(self.cfg.data, self.cfg.data.eval)
        result = evaluate_model(self.student, self._eval_records, self.cfg.rollout, self.cfg.model, self.cfg.data,
                                k=self.cfg.trainer.eval_n, greedy=self.cfg.trainer.eval_greedy,
                                generator=torch.Generator(self.device).manual_seed(0), progress=False,
                                engine=self.engine)
        return {f"eval/{k}": v for k, v in result["metrics"].items()}
