"""Runs 11 small training configurations for 3 steps each on tiny random models and writes
every logged metric (timings left out) and a SHA-256 of each run's final weights as JSON.

Run it on two checkouts and compare the files to check that a refactor changed nothing:
    PYTHONPATH=<old checkout> python benchmarks/same_metrics.py <old checkout> old.json
    python benchmarks/same_metrics.py . new.json && cmp old.json new.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

CASES = {
    "sampled": {},
    "sampled_nodiag": {"logging.diagnostics": "false"},
    "calib_shift": {"calibration.enabled": "true", "calibration.delta": "0.5"},
    "calib_mask_greedy": {"calibration.enabled": "true", "calibration.method": "mask",
                          "calibration.mask_strategy": "greedy"},
    "balance_online": {"balance.online": "true", "balance.max_resample": "1"},
    "topk": {"loss.kind": "topk"},
    "full": {"loss.kind": "full"},
    "jsd": {"loss.kind": "jsd"},
    "outcome": {"loss.outcome_weight": "0.5"},
    "mini2": {"trainer.mini_batches": "2", "trainer.micro_batch_size": "2"},
    "hfdecode": {"rollout.decode": "hf"},
}


def main(checkout: str, out: str) -> None:
    sys.path.insert(0, str(Path(checkout) / "tests"))
    torch.set_num_threads(2)
    from helpers import make_tiny_model, tiny_run_config, write_jsonl

    try:
        from uniopd.train.trainer import Trainer
    except ImportError:  # checkouts from before the train/ package
        from uniopd.trainer import Trainer

    root = Path(tempfile.mkdtemp())
    student = make_tiny_model(root / "s", layers=2, hidden=32, seed=1)
    teacher = make_tiny_model(root / "t", layers=2, hidden=48, seed=2)
    data = write_jsonl(root / "train.jsonl", [{"id": f"p{i}", "domain": "arithmetic", "prompt": f"{i}+{i + 1}=",
                                               "answer": str(2 * i + 1), "verifier": "exact"} for i in range(12)])
    result = {}
    for name, overrides in CASES.items():
        trainer = Trainer(tiny_run_config(student, teacher, data, root / name, **{"trainer.steps": 3, **overrides}))
        run = trainer.train()
        rows = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "tokens_per_s"}
                for line in open(run["metrics_path"])]
        digest = hashlib.sha256()
        for key, value in sorted(trainer.student.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().numpy().tobytes())
        result[name] = {"metrics": rows, "weights": digest.hexdigest()}
    Path(out).write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
