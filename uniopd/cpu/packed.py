"""Linear layers on oneDNN-packed weights, for CPU inference in fp32.

    y = x W^T + b,   computed by oneDNN from W reordered once into its blocked layout

PyTorch's CPU `F.linear` hands fp32 GEMMs to MKL, which repacks W on every call; with a
few rows (a decode step: B = 8) it read weights at 4 to 7 GB/s where a plain read of the
same bytes runs at 20 to 24, and at 512 rows × 49k vocabulary (a teacher's output head) it
reached 86 GFLOP/s where oneDNN on the packed weight reached 148 (a CPU profile of the step).
So weights that do not change while they are used are reordered once and multiplied by
oneDNN:

* a frozen weight (requires_grad False: a teacher) is packed on first use and the packed
  copy is kept beside it (`packed_weight`), checked against the weight's version counter
  so an in-place write (`copy_`, loading a state dict) repacks it;
* a trainable weight (the student) is packed only by a caller that knows it will not change
  while in use (`pack`: the rollout, once per decode batch), and never cached: a fused
  AdamW step updates weights without bumping their version counter.

The cost is one extra copy of each packed weight. Anything else (GPU, bf16, a gradient to
compute, a torch without the oneDNN ops) runs `F.linear` as before. oneDNN sums in a
different order from MKL: results agree to fp32 rounding (~1e-6 relative), not bitwise.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_ROWS_HINT = 1024  # oneDNN's reorder takes a row-count hint; timings did not depend on it (8 to 4096)
# (id of the weight's storage owner, offset, shape, stride) -> (weakref to it, version, packed copy)
_FROZEN: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}


def can_pack(w: torch.Tensor) -> bool:
    # Plain tensors only: a sharded (DTensor) or otherwise wrapped weight keeps F.linear.
    return (type(w.data) is torch.Tensor and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack(w: torch.Tensor, rows: int = _ROWS_HINT) -> torch.Tensor:
    """W [N, K] reordered for `linear(..., packed=)`; the caller keeps W unchanged while using it."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)


def packed_weight(w: torch.Tensor) -> torch.Tensor | None:
    """The cached packed copy of a frozen CPU fp32 weight, or None where packing does not apply."""
    if w.requires_grad or not can_pack(w):
        return None
    # Keyed by the storage it views (output_head slices a padded head afresh on every call)
    # and checked against the version counter, which views share with their base.
    root = w if w._base is None else w._base
    key = (id(root), w.storage_offset(), tuple(w.shape), tuple(w.stride()))
    hit = _FROZEN.get(key)
    if hit is not None and hit[0]() is root and hit[1] == w._version:
        return hit[2]
    if hit is None or hit[0]() is not root:
        weakref.finalize(root, _FROZEN.pop, key, None)
    _FROZEN[key] = (weakref.ref(root), w._version, pack(w))
    return _FROZEN[key][2]


def packed_linear(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor | None = None, *,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b (+ residual) for an fp32 x and W packed by `pack`; the residual is added by
    oneDNN as it writes the output (one call instead of a GEMM and an add)."""
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, b, "add")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b, on `packed` (or W's cached frozen copy) when there is one and no gradient is needed."""
    if packed is None and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        packed = packed_weight(w)
    if packed is None or x.dtype != torch.float32:
        return F.linear(x, w, b)
    return packed_linear(x, packed, b)


def thin_linear(h_BK: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *,
                packed: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b for a few rows (a decode step): on `packed` when given, else as (W @ h^T)^T,
    since F.linear with few rows spent more time repacking W than multiplying (MKL, B = 8,
    V = 49k: 33 vs 21 ms a token)."""
    if packed is not None:
        return linear(h_BK, w, b, packed=packed)
    y_BN = (w @ h_BK.T).T
    return y_BN if b is None else y_BN + b


@contextlib.contextmanager
def packed_linears(model: nn.Module) -> Iterator[int]:
    """Inside the block, every plain nn.Linear of `model` whose weight is frozen runs on its
    packed copy (`packed_weight`); yields how many. Module types and state dicts are untouched."""
    mods = [m for m in model.modules() if type(m) is nn.Linear and packed_weight(m.weight) is not None]
    for m in mods:
        m.forward = _PackedForward(m)
    try:
        yield len(mods)
    finally:
        for m in mods:
            del m.forward  # back to nn.Linear.forward


class _PackedForward:
    def __init__(self, module: nn.Linear):
        self.module = weakref.proxy(module)  # no reference cycle through the instance attribute

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.module.weight, self.module.bias)
