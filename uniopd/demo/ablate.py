"""`uniopd ablate`: which part of the Uni-OPD recipe helps, on the demo's tasks, offline.

Methods (same data, steps, prompts per step and rollouts; only the recipe's switches differ):

    student   the student before OPD (no training)
    opd       plain OPD: reverse KL of the teacher on the student's own rollouts
    shift     + margin shift as released: group scope, mean margin, both sides, δ 0.4
    mask      + greedy margin mask, δ 0.4
    online    + the release's online balancing (the larger outcome side of each group is
              dropped down to the smaller one's count; dropped rollouts keep weight 0)
    offline   + offline difficulty balancing of the prompt file (pass rates from
              `balance.offline_k` student samples per prompt, as `uniopd balance`)
    uniopd    shift + online + offline: the full recipe

Settings:

    single    the demo: one addition teacher, a weaker student
    multi     the multi-teacher demo: an addition and a subtraction expert, one student,
              each record routed to its domain's teacher
    neighbour the failure the paper targets, built in: the addition student distilled from
              the subtraction expert, a teacher for a neighbouring task whose token-level
              scores say little about which of the student's sums are right
    noisy     (not in the default grid) an addition teacher trained on labels that drop the
              carry in half of the problems with one (57 + 25 -> 72); measured: still
              order-consistent on the student's rollouts, so not the failure above

The order-consistency rate of every teacher is measured on the student's rollouts of the
first step, before any update (`calib/order_consistency_rate` of that step).

Every run lives in OUT/<setting>/<method>/seed<k>. A finished run writes `result.json` and
is skipped when the command runs again; an interrupted one resumes from its last checkpoint.
`ablation.md` / `ablation.json` hold the tables (mean ± sample std over seeds), `plots/` the
PNGs, `<setting>/report.html` the `uniopd report` page of each method's first-seed run. Teacher and student builds are cached like the demo's (`--build-seed` rebuilds them
from another seed, so results can be read over builds as well as over OPD seeds).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from uniopd.data.loader import write_records
from uniopd.demo.ablate_report import ablation_markdown, save_plots
from uniopd.demo.build import (STUDENT, TEACHER, TinyModelSpec, build_model, default_cache_dir, heldout_records,
                               is_built, mixed_records)
from uniopd.demo.multi import EXPERTS, MIXED_STUDENT
from uniopd.demo.run import accuracy_by_domain, demo_config
from uniopd.report import read_run, render_report
from uniopd.utils import atomic_write_text

SHIFT = ("calibration.enabled=true", "calibration.method=shift", "calibration.delta=0.4", "calibration.mode=mean",
         "calibration.direction=both", "calibration.scope=group")
MASK = ("calibration.enabled=true", "calibration.method=mask", "calibration.delta=0.4", "calibration.mode=mean",
        "calibration.mask_strategy=greedy", "calibration.scope=group")
ONLINE = ("balance.online=true", "balance.mode=release")


class AblationError(ValueError):
    """A plan that cannot run: unknown names, or a results directory of another budget."""


@dataclass(frozen=True)
class Method:
    overrides: tuple[str, ...] = ()
    offline: bool = False  # train on the offline-balanced prompt file
    trains: bool = True


METHODS: dict[str, Method] = {
    "student": Method(trains=False),
    "opd": Method(),
    "shift": Method(SHIFT),
    "mask": Method(MASK),
    "online": Method(ONLINE),
    "offline": Method(offline=True),
    "uniopd": Method(SHIFT + ONLINE, offline=True),
}

# Trained on answers that drop the carry in half of the carry problems: it cannot reach the
# clean teacher's validation target, so it trains for its full step count.
NOISY_TEACHER = replace(TEACHER, label_noise=0.5, target_acc=None)


@dataclass(frozen=True)
class Setting:
    teachers: tuple[tuple[str, TinyModelSpec], ...]  # (domain, build) per teacher
    student: TinyModelSpec
    steps: int
    num_heldout: int  # per domain

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.teachers)


# The neighbour runs stop early: every method has taken the student to ~0 % by step 20.
SETTINGS: dict[str, Setting] = {
    "single": Setting((("addition", TEACHER),), STUDENT, steps=300, num_heldout=300),
    "multi": Setting(tuple(EXPERTS.items()), MIXED_STUDENT, steps=300, num_heldout=200),
    "neighbour": Setting((("addition", EXPERTS["subtraction"]),), STUDENT, steps=100, num_heldout=300),
    "noisy": Setting((("addition", NOISY_TEACHER),), STUDENT, steps=300, num_heldout=300),
}
DEFAULT_SETTINGS = ("single", "multi", "neighbour")

# The budget every method gets: half the demo's prompts per step, so that the 54 training runs
# of the default grid stay within an hour on 2 cores. At 16 prompts the demo's lr (3e-4) first
# drops the single student's accuracy for ~70 steps and never lifts the mixed student (teacher
# KL flat over 300 steps, both domains below the start); 1e-4 lifts both from the first evaluation.
# calibration.mode and delta also set how every run measures order consistency and margins
# (the statistics are logged with calibration off too), so all methods are read alike.
BUDGET = ("rollout.prompts_per_step=16", "rollout.n=8", "trainer.lr=1e-4", "trainer.warmup_steps=5",
          "calibration.mode=mean", "calibration.delta=0.4")
EVAL_EVERY = 10
SAVE_EVERY = 25  # an interrupted run resumes from here
NUM_TRAIN = 2000


@dataclass
class AblationPlan:
    settings: dict[str, Setting]
    methods: list[str]
    seeds: list[int]
    build_seed: int = 0
    num_train: int = NUM_TRAIN
    extra: tuple[str, ...] = ()  # overrides for every run (tests: tiny batches)
    steps: int | None = None  # overrides every setting's steps

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise AblationError(f"unknown ablation method(s) {unknown} (choose from {', '.join(METHODS)})")
        if not self.seeds:
            raise AblationError("ablation needs at least one seed")

    def built(self, spec: TinyModelSpec) -> TinyModelSpec:
        return replace(spec, seed=spec.seed + self.build_seed) if self.build_seed else spec


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


class Ablation:
    """Runs the plan's grid into `out_dir`, resumable, then writes tables and plots."""

    def __init__(self, plan: AblationPlan, out_dir: Path, *, cache_dir: Path | None = None, progress: bool = True,
                 log=print):
        self.plan, self.out = plan, Path(out_dir)
        self.cache_dir = cache_dir or default_cache_dir() / "demo"
        self.progress, self.log = progress, log
        self.t0 = time.perf_counter()
        self.trained_seconds: list[float] = []

    # ------------------------------------------------------------------ the grid
    def run(self) -> dict[str, Any]:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
        plan = self.plan
        self._check_same_plan()
        todo = [(s, m, seed) for s in plan.settings for seed in plan.seeds for m in plan.methods]
        self.todo_trained = sum(METHODS[m].trains and not self._result_path(s, m, seed).exists()
                                for s, m, seed in todo)
        self.log(f"uniopd ablate: {len(plan.settings)} setting(s) x {len(plan.methods)} method(s) x "
                 f"{len(plan.seeds)} seed(s); {self.todo_trained} training run(s) to do; results in {self.out}")
        to_build = self.models_to_build()
        if to_build:
            # The ETA printed after each run counts training runs only: a build stops on
            # validation accuracy, so its time is not known in advance.
            self.log(f"{len(to_build)} model(s) not in {self.cache_dir} yet, each built when its setting starts "
                     f"(minutes each; not in the time left shown below): {', '.join(to_build)}")
        summary: dict[str, Any] = {"plan": {"settings": list(plan.settings), "methods": plan.methods,
                                            "seeds": plan.seeds, "build_seed": plan.build_seed,
                                            "steps": {s: self.steps(s) for s in plan.settings},
                                            "budget": list(BUDGET) + list(plan.extra)},
                                   "settings": {}}
        done = 0
        for name, setting in plan.settings.items():
            ctx = self._prepare_setting(name, setting)
            runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in plan.methods}
            for seed in plan.seeds:
                for method in plan.methods:
                    runs[method][seed] = self._run_one(name, setting, ctx, method, seed)
                    done += 1
                    self._report_progress(done, len(todo), name, method, seed, runs[method][seed])
            summary["settings"][name] = {"domains": list(setting.domains), "teachers": ctx["teacher_acc"],
                                         "runs": {m: {str(k): v for k, v in r.items()} for m, r in runs.items()},
                                         "offline_balance": self._balance_summaries(name)}
        summary["seconds"] = time.perf_counter() - self.t0
        _write_json(self.out / "ablation.json", summary)
        table = ablation_markdown(summary)
        atomic_write_text(self.out / "ablation.md", table)
        plots = save_plots(summary, self.out / "plots")
        reports = [self._write_report(name) for name in plan.settings]
        self.log("\n" + table)
        self.log(f"tables: {self.out / 'ablation.md'}, {self.out / 'ablation.json'}; plots: "
                 f"{', '.join(str(p) for p in plots)}; reports: {', '.join(str(r) for r in reports if r)}  "
                 f"({summary['seconds']:.0f}s in all)")
        return summary

    def _write_report(self, setting: str) -> Path | None:
        """OUT/<setting>/report.html (`uniopd report`): every trained method's run of the first
        seed overlaid, with the config keys that tell the methods apart."""
        seed = self.plan.seeds[0]
        runs = [self._result_path(setting, m, seed).parent for m in self.plan.methods if METHODS[m].trains]
        if not runs:
            return None
        path = self.out / setting / "report.html"
        atomic_write_text(path, render_report(runs))
        return path

    def _check_same_plan(self) -> None:
        """Results in one directory must share a budget: refuse to mix runs of another plan.

        Settings, methods and seeds may be added to a directory; what each run trained with
        (steps, build seed, overrides, prompts) may not change."""
        budget = {"build_seed": self.plan.build_seed, "steps": self.plan.steps, "extra": list(self.plan.extra),
                  "num_train": self.plan.num_train, "budget": list(BUDGET), "eval_every": EVAL_EVERY}
        path = self.out / "plan.json"
        if path.exists():
            before = json.loads(path.read_text())
            changed = sorted(k for k in budget.keys() | before.keys() if budget.get(k) != before.get(k))
            if changed:
                diff = ", ".join(f"{k}: {before.get(k)!r} there, {budget.get(k)!r} now" for k in changed)
                raise AblationError(f"{self.out} holds runs of another budget ({diff}); use another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json(path, budget)

    def models_to_build(self) -> list[str]:
        """Cache keys of the plan's models that are not built yet, each once."""
        wanted = {}
        for setting in self.plan.settings.values():
            for kind, spec in [("teacher", s) for _, s in setting.teachers] + [("student", setting.student)]:
                spec = self.plan.built(spec)
                wanted[spec.key(kind)] = is_built(kind, spec, self.cache_dir)
        return [key for key, built in wanted.items() if not built]

    def steps(self, setting: str) -> int:
        return self.plan.steps or self.plan.settings[setting].steps

    def _result_path(self, setting: str, method: str, seed: int) -> Path:
        return self.out / setting / method / f"seed{seed}" / "result.json"

    def _report_progress(self, done: int, total: int, setting: str, method: str, seed: int,
                         result: dict[str, Any]) -> None:
        acc = "  ".join(f"{d} {a:.1%}" for d, a in result["acc"].items() if d != "all" or len(result["acc"]) == 1)
        eta = ""
        if self.trained_seconds:
            left = self.todo_trained - len(self.trained_seconds)
            eta = f", about {left * sum(self.trained_seconds) / len(self.trained_seconds) / 60:.0f} min left"
        self.log(f"[{done}/{total}] {setting} {method} seed {seed}: {acc} "
                 f"({time.perf_counter() - self.t0:.0f}s elapsed{eta})")

    def _prepare_setting(self, name: str, setting: Setting) -> dict[str, Any]:
        """Build (or reuse) the models, write the held-out file, measure the references."""
        plan, root = self.plan, self.out / name
        teachers = {}
        for domain, spec in setting.teachers:
            teachers[domain], cached = build_model("teacher", plan.built(spec), self.cache_dir,
                                                   progress=self.progress, log=self.log)
            self.log(f"{name}: {domain} teacher {teachers[domain]}{' (cached)' if cached else ''}")
        student, cached = build_model("student", plan.built(setting.student), self.cache_dir,
                                      progress=self.progress, log=self.log)
        self.log(f"{name}: student {student}{' (cached)' if cached else ''}")
        heldout = [r for d in setting.domains for r in heldout_records(setting.num_heldout, task=d)]
        heldout_file = root / "data" / "heldout.jsonl"
        write_records(heldout_file, heldout)
        ref_path = root / "references.json"
        refs = json.loads(ref_path.read_text()) if ref_path.exists() else {}
        if refs.get("teachers") is None or refs.get("paths") != {d: str(p) for d, p in teachers.items()}:
            refs = {"paths": {d: str(p) for d, p in teachers.items()},
                    "teachers": {d: accuracy_by_domain(p, heldout) for d, p in teachers.items()}}
            _write_json(ref_path, refs)
        return {"teachers": teachers, "student": student, "heldout": heldout, "heldout_file": heldout_file,
                "teacher_acc": refs["teachers"]}

    def _train_file(self, name: str, setting: Setting, ctx: dict[str, Any], seed: int, offline: bool) -> Path:
        data = self.out / name / "data"
        train_file = data / f"train_seed{seed}.jsonl"
        if not train_file.exists():
            # Same seed scheme as the demo: far from the SFT, validation and held-out seeds.
            write_records(train_file, mixed_records(self.plan.num_train, seed=1_000_000 * (seed + 1),
                                                    tasks=setting.domains, prefix="train"))
        if not offline:
            return train_file
        balanced, summary_path = data / f"train_seed{seed}_balanced.jsonl", data / f"balance_seed{seed}.json"
        if not summary_path.exists():
            from uniopd.commands.balance import run_offline_balance

            cfg = self._config(name, ctx, train_file, data / f"balance_seed{seed}", seed, ())
            _write_json(summary_path, run_offline_balance(cfg, balanced, work_dir=data / f"balance_seed{seed}.work",
                                                          progress=self.progress))
        return balanced

    def _balance_summaries(self, name: str) -> dict[str, Any]:
        paths = {seed: self.out / name / "data" / f"balance_seed{seed}.json" for seed in self.plan.seeds}
        return {str(seed): json.loads(p.read_text()) for seed, p in paths.items() if p.exists()}

    def _config(self, name: str, ctx: dict[str, Any], train_file: Path, run_dir: Path, seed: int,
                overrides: tuple[str, ...]):
        teacher = ctx["teachers"] if len(ctx["teachers"]) > 1 else next(iter(ctx["teachers"].values()))
        extra = (*BUDGET, f"data.eval={ctx['heldout_file']}", f"trainer.eval_every={EVAL_EVERY}",
                 "trainer.eval_greedy=true", f"trainer.save_every={SAVE_EVERY}", "balance.offline_k=8",
                 "balance.num_bins=10", *self.plan.extra, *overrides)
        return demo_config(ctx["student"], teacher, train_file, run_dir, seed=seed, steps=self.steps(name),
                           method="opd", progress=self.progress, extra=extra)

    def _run_one(self, name: str, setting: Setting, ctx: dict[str, Any], method: str, seed: int) -> dict[str, Any]:
        result_path = self._result_path(name, method, seed)
        if result_path.exists():
            result = json.loads(result_path.read_text())
            if "metrics_path" in result:
                # The run's own curves, wherever the results directory has been moved or copied.
                result["metrics_path"] = str(result_path.parent / "metrics.jsonl")
            return result
        run_dir = result_path.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = METHODS[method]
        if not spec.trains:
            result = {"acc": accuracy_by_domain(ctx["student"], ctx["heldout"]), "seconds": 0.0}
            _write_json(result_path, result)
            return result
        from uniopd.train.trainer import Trainer

        t = time.perf_counter()
        train_file = self._train_file(name, setting, ctx, seed, spec.offline)
        cfg = self._config(name, ctx, train_file, run_dir, seed, spec.overrides)
        trainer = Trainer(cfg)
        if trainer.resume():
            self.log(f"{name} {method} seed {seed}: resumed at step {trainer.step_idx}")
        out = trainer.train()
        if out["stopped_by_signal"] is not None:
            # The trainer saved a checkpoint; this run has no result yet, and the next
            # `uniopd ablate` with the same --out resumes it.
            self.log(f"{name} {method} seed {seed}: stopped by signal {out['stopped_by_signal']} at step "
                     f"{out['step']}; run the same command again to resume")
            raise SystemExit(128 + out["stopped_by_signal"])
        final = run_dir / "checkpoints" / f"step_{out['step']:06d}"
        rows = read_run(run_dir)["rows"]
        first = rows[0] if rows and rows[0]["step"] == 1 else {}
        kl = [r["teacher_kl"] for r in rows[-10:] if "teacher_kl" in r]
        result = {"acc": accuracy_by_domain(final, ctx["heldout"]), "seconds": time.perf_counter() - t,
                  "steps": out["step"], "train_file": str(train_file), "metrics_path": str(run_dir / "metrics.jsonl"),
                  "first_step": {k: first[k] for k in ("calib/order_consistency_rate", "calib/mean_margin",
                                                       "calib/num_two_outcome_groups") if k in first},
                  **({"final_teacher_kl": sum(kl) / len(kl)} if kl else {})}
        # Checkpoints are the bulk of a run's disk; the curves and the result are what the
        # tables and plots read. The final weights stay for `uniopd eval`.
        for ckpt in (run_dir / "checkpoints").glob("step_*"):
            if ckpt != final:
                shutil.rmtree(ckpt, ignore_errors=True)
        _write_json(result_path, result)
        self.trained_seconds.append(result["seconds"])
        return result
