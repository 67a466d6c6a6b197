"""Data-parallel training with torch.distributed (`trainer.strategy: data_parallel`), one
process per device, launched by `torchrun` (or `uniopd train --nproc N`).

Each process rolls out, verifies and scores its own contiguous share of a step's prompts
(a prompt's whole group stays on one process). Everything that is a statistic of the whole
batch is computed on the whole batch: the rows of every process are gathered (a few [B, T]
tensors and the records, never hidden states) so token advantages, margin calibration in
either scope, online-balancing statistics and step metrics are those a single process
would compute on the same global batch; the update then runs on each process's own rows,
each loss divided by the token (or response) count of the whole mini-batch, and gradients
are summed across processes, so one optimizer step sees the gradient of the global
token-mean loss.

Student sharding (`trainer.student_sharding`):
* `replicate`: every process holds the whole student; after the backward pass the
  gradients are summed across processes in one flat all-reduce (what DDP does, without
  wrapping the model, so the chunked head loss and the prefix-sharing forward that call the
  model's parts directly keep working).
* `shard`: the decoder layers are sharded with FSDP2 (`fully_shard`); the embeddings,
  final norm and output head stay replicated (the chunked head loss reads the head weight
  outside any forward) and are all-reduced as above. Rollouts and evaluation run on
  gathered layers (`unshard`), so processes may decode different numbers of steps; the
  update pads every process to the same number of micro-batches, since each sharded
  layer's forward and backward are collectives.

Frozen local teachers are replicated on every process, or with `teachers.<name>.shard` have
their decoder layers sharded with FSDP2 as well (`shard_frozen`); such a teacher's forwards
are collectives, so every process scores each step, padding with one-token forwards to the
largest micro-batch count.

Checkpoints (`trainer.checkpoint_format`) are either `full`, the weights and optimizer state
gathered to process 0 and written in the single-process format (`uniopd.train.checkpoint`),
or `sharded`, each process writing its own shards with torch.distributed.checkpoint
(`uniopd.train.sharded_checkpoint`); `auto` takes `sharded` when the student is sharded. A
run resumes from either at any world size.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from uniopd.config import ConfigError, TrainerConfig
from uniopd.models.weights import load_weights
from uniopd.train.checkpoint import checkpoint_format, find_resumable, load_trainer_state, save_checkpoint
from uniopd.train.strategy import SingleProcess, TrainingStrategy

log = logging.getLogger(__name__)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", t)).__name__ == "DTensor"


class DataParallel(TrainingStrategy):
    def __init__(self, sharding: str = "replicate", timeout_s: float = 600.0, checkpoint_format: str = "auto"):
        if "RANK" not in os.environ and not dist.is_initialized():
            raise ConfigError("trainer.strategy=data_parallel needs torchrun: `torchrun --nproc_per_node N -m uniopd "
                              "train ...` or `uniopd train --nproc N ...`")
        if not dist.is_initialized():
            # On GPUs, NCCL for CUDA tensors and gloo for the small CPU tensors the metric and stop-signal
            # reductions use (NCCL has no CPU backend).
            gpu = torch.cuda.is_available() and os.environ.get("UNIOPD_DEVICE", "") != "cpu"
            dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo", timeout=timedelta(seconds=timeout_s))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sharding = sharding
        self.pads_micro_batches = sharding == "shard"
        self.checkpoint_format = ("sharded" if checkpoint_format == "sharded"
                                  or (checkpoint_format == "auto" and sharding == "shard") else "full")
        self._replicated: list[torch.nn.Parameter] = []
        self._sharded_layers: list[torch.nn.Module] = []
        self.loss_scale = float(self.world_size)  # FSDP averages gradients; the losses are already global means

    # ------------------------------------------------------------------ model
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.sharding == "shard":
            from torch.distributed.fsdp import fully_shard

            for layer in _decoder_layers(model, "trainer.student_sharding=shard", "use replicate"):
                fully_shard(layer)
                self._sharded_layers.append(layer)
        self._replicated = [p for p in model.parameters() if not _is_dtensor(p)]
        # Every process must start from the same weights (the model was built on each).
        with torch.no_grad():
            for p in self._replicated:
                dist.broadcast(p.data, src=0)
        return model

    def shard_frozen(self, model: torch.nn.Module, key: str) -> torch.nn.Module:
        """Shard a frozen model's decoder layers (embeddings, norm and head stay whole: the chunked
        head reads its weight outside any forward). Each forward then gathers one layer at a time
        and frees it after, so every process must run the same number of forwards."""
        from torch.distributed.fsdp import fully_shard

        from uniopd.models.forward import base_model

        layers = _decoder_layers(model, f"{key}.shard=true", f"remove {key}.shard")
        for layer in layers:
            fully_shard(layer)
        # Each sharded layer is its own FSDP root, and FSDP keeps a root's weights gathered after
        # its forward (expecting a backward) from the first forward on. A frozen model has no
        # backward: one forward settles that, then each layer frees its gathered weights again.
        device = next(model.parameters()).device
        with torch.inference_mode():
            base_model(model)(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
        for layer in layers:
            layer.set_reshard_after_forward(True)
            layer.reshard()
        log.info("%s: %d decoder layers sharded over %d processes", key, len(layers), self.world_size)
        return model

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module):
        """Inside: sharded layers are gathered, so forwards need no collective (rollouts, eval)."""
        if not self._sharded_layers:
            yield
            return
        for layer in self._sharded_layers:
            layer.set_reshard_after_forward(False)
            layer.unshard()
        try:
            yield
        finally:
            for layer in self._sharded_layers:
                layer.reshard()
                layer.set_reshard_after_forward(True)

    def sync_gradients(self, model: torch.nn.Module) -> None:
        grads = [p.grad for p in self._replicated if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.loss_scale)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        shard_sq = torch.zeros((), dtype=torch.float64)
        repl_sq = torch.zeros((), dtype=torch.float64)
        for g in grads:
            if _is_dtensor(g):
                shard_sq += g.to_local().double().pow(2).sum()
            else:
                repl_sq += g.double().pow(2).sum()  # identical on every process after sync_gradients
        if self._sharded_layers:
            dist.all_reduce(shard_sq)
        total = (shard_sq + repl_sq).sqrt().float()
        if max_norm != float("inf") and torch.isfinite(total):
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for g in grads:
                (g.to_local() if _is_dtensor(g) else g).mul_(coef)
        return total

    # ------------------------------------------------------------------ data and reductions
    def shard(self, items: list) -> list:
        """Contiguous shares, the first `len % world` processes one item longer: no overlap, no gap."""
        per, extra = divmod(len(items), self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return items[start: start + per + (1 if self.rank < extra else 0)]

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def reduce_max(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def all_gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------------ checkpoints
    def save(self, run_dir, step, model, tokenizer, state, *, keep, optimizer=None):
        """`full`: every process gathers and process 0 writes the checkpoint a single process
        writes. `sharded`: every process writes its own shards."""
        if self.checkpoint_format == "sharded":
            from uniopd.train.sharded_checkpoint import save_sharded

            # This process's optimizer.state_dict() holds only its shards: they go to the DCP files.
            state = {k: v for k, v in state.items() if k != "optimizer"}
            return save_sharded(run_dir, step, model, tokenizer, state, keep=keep, optimizer=optimizer, strategy=self)
        model_sd = None
        if self._sharded_layers:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(model, options=options)
            if optimizer is not None:  # gathered to process 0 only (cpu_offload)
                optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
                if self.is_main:
                    state = {**state, "optimizer": _optimizer_state_by_index(model, optim_sd)}
        path = None
        if self.is_main:
            path = save_checkpoint(run_dir, step, model, tokenizer, state, keep=keep, state_dict=model_sd)
        self.barrier()
        return path or find_resumable(run_dir)

    def load_latest(self, run_dir, model, optimizer=None):
        path = find_resumable(run_dir) if self.is_main else None
        path = self.all_gather_objects(path)[0]  # every process loads the checkpoint process 0 verified
        if path is None:
            return None
        state = load_trainer_state(path)
        if checkpoint_format(path) == "sharded":
            from uniopd.train.sharded_checkpoint import load_sharded

            load_sharded(path, model, optimizer, no_dist=False)
            return path, state
        if not self._sharded_layers:
            load_weights(model, path)
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
            return path, state
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        full_sd = load_file(str(path / "model.safetensors"))
        set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, strict=False))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, _optimizer_state_by_name(model, state["optimizer"]),
                                     options=options)
        return path, state

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _decoder_layers(model: torch.nn.Module, choice: str, instead: str) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, model.base_model_prefix, None), "layers", None)
    if layers is None:
        raise ConfigError(f"{choice}: {type(model).__name__} has no decoder `layers` to shard; {instead}")
    return layers


def _param_names(model: torch.nn.Module) -> list[str]:
    # The optimizer was built from model.parameters(): the same order, tied weights once.
    return [name for name, _ in model.named_parameters()]


def _optimizer_state_by_name(model: torch.nn.Module, sd: dict) -> dict:
    """A plain optimizer state_dict (parameters by index) keyed by parameter name instead."""
    names = _param_names(model)
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def _optimizer_state_by_index(model: torch.nn.Module, sd: dict) -> dict:
    """The reverse of `_optimizer_state_by_name`: the format a single process saves."""
    index = {name: i for i, name in enumerate(_param_names(model))}
    return {"state": {index[k]: v for k, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in sd["param_groups"]]}


def build_strategy(cfg: TrainerConfig) -> TrainingStrategy:
    if cfg.strategy == "data_parallel":
        return DataParallel(cfg.student_sharding, checkpoint_format=cfg.checkpoint_format)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConfigError(f"trainer.strategy=single, but this process is one of WORLD_SIZE="
                          f"{os.environ['WORLD_SIZE']} (torchrun): set trainer.strategy=data_parallel")
    if cfg.student_sharding != "replicate":
        raise ConfigError(f"trainer.student_sharding={cfg.student_sharding!r} needs trainer.strategy=data_parallel")
    if cfg.checkpoint_format == "sharded":
        raise ConfigError("trainer.checkpoint_format=sharded needs trainer.strategy=data_parallel (one process "
                          "writes the full format; it can resume from a sharded checkpoint)")
    return SingleProcess()


def merge_teacher_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """One step's `teacher/<name>/...` service metrics over every process (`parts`, one dict per
    process; a process without rows for a teacher has none of its keys).

    Wall times (`*_s`) are the slowest process's, since the step waits for it; `request_latency_s`
    is the mean over processes that sent requests; `tokens_per_s` is every process's scored
    tokens over the slowest process's scoring time; everything else is a count, summed.
    """
    keys = sorted({k for part in parts for k in part})
    out: dict[str, float] = {}
    for key in keys:
        values = [part[key] for part in parts if key in part]
        if key.endswith("/tokens_per_s"):
            latency = key.removesuffix("tokens_per_s") + "latency_s"
            tokens = sum(part[key] * part.get(latency, 0.0) for part in parts if key in part)
            slowest = max((part.get(latency, 0.0) for part in parts if key in part), default=0.0)
            out[key] = tokens / slowest if slowest > 0 else max(values)
        elif key.endswith("/request_latency_s"):
            out[key] = sum(values) / len(values)
        elif key.endswith("_s"):
            out[key] = max(values)
        else:
            out[key] = sum(values)
    return out


def gather_step_batch(strategy: TrainingStrategy, batch, num_prompts: int):
    """The whole step's batch on every process (rows in rank order; group ids made global),
    and the slice of it that is this process's rows. Hidden states and top-k stay local."""
    from uniopd.batch import StepBatch, pad_rows

    parts = strategy.all_gather_objects({
        "records": batch.records, "samples": batch.samples, "group_ids": batch.group_ids_B.tolist(),
        "num_prompts": num_prompts, "teacher_logp": batch.teacher_logp_BT, "correct": batch.correct_B.tolist(),
        "score": batch.score_B.tolist(), "names": batch.teacher_names,
        "balance_keep": None if batch.balance_keep_B is None else batch.balance_keep_B.tolist(),
        "teacher_ok": None if batch.teacher_ok_B is None else batch.teacher_ok_B.tolist()})
    records, samples, gids, names, correct, score, keep, ok, teacher_rows = [], [], [], [], [], [], [], [], []
    offset = start = 0
    for rank, part in enumerate(parts):
        if rank == strategy.rank:
            start = len(samples)
        records += part["records"]
        samples += part["samples"]
        gids += [g + offset for g in part["group_ids"]]
        offset += part["num_prompts"]
        names += part["names"]
        correct += part["correct"]
        score += part["score"]
        keep += part["balance_keep"] if part["balance_keep"] is not None else [True] * len(part["samples"])
        ok += part["teacher_ok"] if part["teacher_ok"] is not None else [True] * len(part["samples"])
        teacher_rows += [row.tolist() for row in part["teacher_logp"]]
    from uniopd.batch import response_mask

    full = StepBatch(records=records, samples=samples, group_ids_B=torch.tensor(gids, dtype=torch.long),
                     mask_BT=response_mask(samples), old_logp_BT=pad_rows([s.logprobs for s in samples]),
                     correct_B=torch.tensor(correct, dtype=torch.bool),
                     score_B=torch.tensor(score, dtype=torch.float32), teacher_names=names,
                     balance_keep_B=None if all(keep) else torch.tensor(keep, dtype=torch.bool),
                     teacher_ok_B=None if all(ok) else torch.tensor(ok, dtype=torch.bool))
    T = full.mask_BT.shape[1]
    full.teacher_logp_BT = pad_rows([row[:T] for row in teacher_rows]) if T else torch.zeros(len(samples), 0)
    return full, slice(start, start + batch.size)


def take_rows(full, batch, rows: slice) -> None:
    """Copy the whole batch's token advantages and masks back to this process's rows."""
    T = batch.mask_BT.shape[1]
    batch.adv_BT = full.adv_BT[rows, :T].clone()
    batch.mask_BT = full.mask_BT[rows, :T].clone()
    batch.keep_B = full.keep_B[rows].clone()
