"""Vision-language models: prompts with images, processor outputs, M-RoPE positions.

A multimodal prompt is two things kept side by side: its token ids (with the processor's
image placeholder tokens already expanded, so lengths, layouts and masks work exactly as
for text) and a `MultimodalInputs` holding what the processor made besides the ids
(`pixel_values`, `image_grid_thw`, the per-token `mm_token_type_ids`, ...). Text-only
models never build one: every function here is skipped when the inputs are None.

Batching. Per-prompt tensors that are not token-aligned (pixel values, grids) are
concatenated along dim 0, which is how Qwen-VL (patches), LLaVA and Gemma-3 (images) batch
them. Token-aligned ones (`*token_type_ids`) are padded like the ids: on the left in the
rollout, on the right in the update/scoring layout, with 0 (text) for padding and for
response tokens.

Positions. Qwen2-VL / Qwen2.5-VL / Qwen3-VL use M-RoPE: a [3, B, L] position index
(temporal, height, width) from the model's own `get_rope_index`, where an image's tokens
share positions and the text after it resumes at max + 1. We call that function with the
attention mask (so left or right padding is ignored) and pass its result explicitly, both
at prefill and, as last + 1, in the decode steps: the model's cached `rope_deltas` state
is never relied on. Models without `get_rope_index` keep 1-D positions as text models do.

Placeholder tokens. A sampled `<|image_pad|>` in a response would make the next forward
pass look for one more image than it was given. The rollout therefore never samples the
vision placeholder tokens: the policy is the model's distribution restricted to the other
tokens, renormalised,

    π'(y) = π(y) / (1 − Σ_{v ∈ S} π(v))   for y ∉ S,

and `restrict_logprobs` applies the same renormalisation to the update and scoring
forward passes, so rollout and update log-probs stay equal. Dense losses still see the
full vocabulary (S carries almost no mass in a trained model).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uniopd.data.images import is_data_uri, load_image, short_ref
from uniopd.models.prompts import Prompt, as_messages

log = logging.getLogger(__name__)

# Processor outputs aligned with the token ids (padded like them); everything else is concatenated.
TOKEN_ALIGNED_SUFFIX = "token_type_ids"
_SKIPPED_KEYS = ("input_ids", "attention_mask")


class ImageInputError(ValueError):
    """An image of a record could not be loaded or processed; the message names the record."""


@dataclass
class MultimodalInputs:
    """What the processor made for one prompt besides its token ids.

    tensors: not token-aligned, batched by concatenation along dim 0 (pixel_values [patches, D]
        or [images, C, H, W], image_grid_thw [images, 3], ...).
    token_types: token-aligned, each [P] for a prompt of P tokens (mm_token_type_ids: 0 text,
        1 image, 2 video).
    text, images: what the processor was given (the rendered prompt, one image placeholder per
        image, and the PIL images), for engines that run the checkpoint's processor themselves (vLLM).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    token_types: dict[str, torch.Tensor] = field(default_factory=dict)
    text: str | None = None
    images: list = field(default_factory=list)

    @property
    def num_images(self) -> int:
        grid = self.tensors.get("image_grid_thw")
        if grid is not None:
            return int(grid.shape[0])
        pixels = self.tensors.get("pixel_values")
        return int(pixels.shape[0]) if pixels is not None else 0


# ----------------------------------------------------------------------------- messages


def record_images(prompt: Prompt, images: list[str]) -> list[str]:
    """Every image of a prompt in the order it is rendered: the `images` field first (placed at
    the start of the first user message), then image parts of the messages in order."""
    refs = list(images)
    if not isinstance(prompt, str):
        for message in prompt:
            content = message.get("content")
            if isinstance(content, list):
                refs.extend(part.get("image", part.get("url")) for part in content if part.get("type") == "image")
    return refs


def vision_messages(prompt: Prompt, images: list[str], system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Chat messages with `{"type": "image"}` parts where the images go (the form processors'
    chat templates expect). `images` (the record field) go first in the first user message."""
    messages = [dict(m) for m in as_messages(prompt, system_prompt)]
    for m in messages:
        if isinstance(m["content"], list):
            m["content"] = [{"type": "image"} if p.get("type") == "image"
                            else {"type": "text", "text": p.get("text", "")} for p in m["content"]]
    if images:
        first = next((m for m in messages if m.get("role") == "user"), None)
        if first is None:
            raise ValueError("a prompt with images needs a user message")
        content = first["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        first["content"] = [{"type": "image"} for _ in images] + parts
    return messages


# ----------------------------------------------------------------------------- processors


class PlaceholderProcessor:
    """A processor for Qwen-VL-style checkpoints built from its parts (image processor + tokenizer).

    transformers builds a Qwen-VL `AutoProcessor` only with torchvision installed (for its video
    processor), and there is no CPU torchvision build here. This does what that processor does for
    images: render the chat template (one `<|image_pad|>` per image), expand each placeholder to
    grid_t·grid_h·grid_w / merge_size² tokens, and mark them in `mm_token_type_ids`.
    """

    def __init__(self, image_processor, tokenizer, *, image_token: str = "<|image_pad|>",
                 chat_template: str | None = None):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {image_token!r} token")
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    def save_pretrained(self, path) -> None:
        """Tokenizer, image processor and chat template, so the directory loads back the same way."""
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if self.chat_template:
            (Path(path) / "chat_template.jinja").write_text(self.chat_template)

    def apply_chat_template(self, messages, *, tokenize: bool = False, add_generation_prompt: bool = True, **kw):
        return self.tokenizer.apply_chat_template(messages, tokenize=tokenize, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, **kw)

    def __call__(self, *, text: list[str], images=None, return_tensors: str = "pt", **kw) -> dict[str, Any]:
        if len(text) != 1:
            raise ValueError("PlaceholderProcessor encodes one prompt at a time")
        out: dict[str, Any] = {}
        prompt = text[0]
        if images:
            pixel = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel)
            merge = getattr(self.image_processor, "merge_size", 1) ** 2
            pieces = prompt.split(self.image_token)
            if len(pieces) - 1 != len(images):
                raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders for {len(images)} images")
            counts = [int(g.prod()) // merge for g in pixel["image_grid_thw"]]
            prompt = pieces[0] + "".join(self.image_token * n + rest for n, rest in zip(counts, pieces[1:]))
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out["input_ids"] = torch.tensor([ids], dtype=torch.long)
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).long()
        return out


def _saved_chat_template(source: str) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        path = Path(source) / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def load_processor(source: str, tokenizer, kwargs: dict[str, Any]):
    """The checkpoint's `AutoProcessor`, or a `PlaceholderProcessor` when transformers cannot
    build it here (Qwen-VL without torchvision). Image processors use the PIL backend when
    torchvision is missing (transformers falls back by itself)."""
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            processor.tokenizer = tokenizer  # the padded / pad-token-fixed tokenizer the rest uses
            return processor
    except (ImportError, ValueError, OSError, TypeError, AttributeError) as exc:
        log.info("AutoProcessor(%s) unavailable (%s); building it from its image processor", source, exc)
    image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    return PlaceholderProcessor(image_processor, tokenizer, chat_template=_saved_chat_template(source))


def is_vision_config(config) -> bool:
    """A model config with a vision tower (Qwen-VL, LLaVA, Gemma-3, ... all carry `vision_config`)."""
    return getattr(config, "vision_config", None) is not None


# ----------------------------------------------------------------------------- encoding


def encode_prompt(processor, prompt: Prompt, images: list[str], *, chat_template: bool = True,
                  system_prompt: str | None = None) -> tuple[list[int], MultimodalInputs]:
    """Token ids and vision inputs of one prompt; `images` as in `record_images` (refs or PIL)."""
    refs = record_images(prompt, images)
    pil = [load_image(ref) for ref in refs]
    messages = vision_messages(prompt, images, system_prompt)
    if chat_template and getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        image_token = getattr(processor, "image_token", "<image>")
        text = "\n".join("".join(image_token if p["type"] == "image" else p["text"] for p in m["content"])
                         if isinstance(m["content"], list) else m["content"] for m in messages)
    out = processor(text=[text], images=pil or None, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    mm = MultimodalInputs(text=text, images=pil)
    for key, value in out.items():
        if key in _SKIPPED_KEYS or not isinstance(value, torch.Tensor):
            continue
        if key.endswith(TOKEN_ALIGNED_SUFFIX):
            mm.token_types[key] = value[0].long()
        else:
            mm.tensors[key] = value
    return ids, mm


class PromptEncoder:
    """Token ids + vision inputs for records as one model sees them, rebuilt on demand.

    Pixel values are large (a 448 px image is ~5 MB in fp32 for Qwen-VL), so only the last
    `cache_size` prompts are kept; the ids are small and stay in the caller's hands.
    """

    def __init__(self, processor, *, chat_template: bool = True, system_prompt: str | None = None,
                 cache_size: int = 256):
        self.processor, self.chat_template, self.system_prompt = processor, chat_template, system_prompt
        self.cache_size = cache_size
        self._cache: OrderedDict[Any, tuple[list[int], MultimodalInputs]] = OrderedDict()

    def __call__(self, key: Any, record_id: str, prompt: Prompt,
                 images: list[str]) -> tuple[list[int], MultimodalInputs]:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            value = encode_prompt(self.processor, prompt, images, chat_template=self.chat_template,
                                  system_prompt=self.system_prompt)
        except (ValueError, OSError) as exc:
            shown = ", ".join((short_ref(r) if is_data_uri(r) else r) if isinstance(r, str) else type(r).__name__
                              for r in record_images(prompt, images))
            raise ImageInputError(f"record {record_id!r}: cannot prepare its images ({shown}): {exc}") from exc
        self._cache[key] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value


class StudentVision:
    """A vision-language student's prompt side: ids via its processor, vision inputs on demand,
    and the placeholder tokens its rollout never samples. `of()` is None for a text model, so
    callers keep the text path untouched."""

    def __init__(self, loaded, *, chat_template: bool = True):
        self.encoder = PromptEncoder(loaded.processor, chat_template=chat_template)
        self.suppress_ids = placeholder_token_ids(loaded.model, loaded.vocab_size)

    @classmethod
    def of(cls, loaded, model_cfg) -> "StudentVision | None":
        return cls(loaded, chat_template=model_cfg.chat_template) if loaded.is_multimodal else None

    def ids(self, record) -> list[int]:
        return self.encoder(record.id, record.id, record.prompt, record.images)[0]

    def inputs(self, records) -> list[MultimodalInputs]:
        return [self.encoder(r.id, r.id, r.prompt, r.images)[1] for r in records]


# ----------------------------------------------------------------------------- batching


def collate(rows: list[MultimodalInputs | None], lengths: list[int], width: int, *, left: bool,
            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Model keyword inputs for a batch: tensors concatenated, token types padded to `width`.

    lengths[b] is row b's prompt length; its token types fill positions [width - len, width)
    with left padding, [0, len) with right padding (responses after the prompt stay 0).
    """
    out: dict[str, torch.Tensor] = {}
    keys = sorted({k for r in rows if r is not None for k in r.tensors})
    for key in keys:
        parts = [r.tensors[key] for r in rows if r is not None and key in r.tensors]
        out[key] = torch.cat(parts, dim=0).to(device)
    type_keys = sorted({k for r in rows if r is not None for k in r.token_types})
    for key in type_keys:
        padded = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (r, n) in enumerate(zip(rows, lengths)):
            if r is not None and key in r.token_types:
                if left:
                    padded[b, width - n:] = r.token_types[key]
                else:
                    padded[b, :n] = r.token_types[key]
        out[key] = padded.to(device)
    return out


def rope_index_fn(model):
    """The model's M-RoPE index function (Qwen-VL family), or None for 1-D positions."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return getattr(base, "get_rope_index", None)


def mrope_positions(model, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor,
                    mm_kwargs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """[3, B, L] M-RoPE positions from the model's own `get_rope_index`, or None (1-D model)."""
    fn = rope_index_fn(model)
    if fn is None:
        return None
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in mm_kwargs.items() if k in accepted and k != "mm_token_type_ids"}
    types = mm_kwargs.get("mm_token_type_ids")
    if types is None:
        types = torch.zeros_like(input_ids_BL)
    positions, _ = fn(input_ids_BL, mm_token_type_ids=types, attention_mask=attention_mask_BL, **kwargs)
    return positions


def prefill_inputs(model, ids_BP: torch.Tensor, attn_BP: torch.Tensor, rows: list[MultimodalInputs | None],
                   prompt_lengths: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Keyword inputs for the rollout's prefill of left-padded prompts, and M-RoPE positions
    ([3, B, P]; None for models with 1-D positions)."""
    kwargs = collate(rows, prompt_lengths, ids_BP.shape[1], left=True, device=ids_BP.device)
    return kwargs, mrope_positions(model, ids_BP, attn_BP, kwargs)


def layout_inputs(model, layout, rows: list[MultimodalInputs | None],
                  prompt_lengths: list[int]) -> dict[str, torch.Tensor]:
    """Keyword inputs (vision tensors, token types, M-RoPE positions) for a right-padded
    `ResponseLayout` whose rows start with these prompts."""
    device = layout.input_ids_BL.device
    kwargs = collate(rows, prompt_lengths, layout.input_ids_BL.shape[1], left=False, device=device)
    positions = mrope_positions(model, layout.input_ids_BL, layout.attention_mask_BL, kwargs)
    if positions is not None:
        kwargs["position_ids"] = positions
    return kwargs


# ----------------------------------------------------------------------------- placeholder tokens


def placeholder_token_ids(model, vocab_size: int) -> list[int]:
    """Vision placeholder / delimiter token ids of a VLM (never to be sampled in a response)."""
    cfg = model.config
    ids = set()
    for name in dir(cfg):
        if not (name.endswith("_token_id") or name.endswith("_token_index")):
            continue
        if not any(word in name for word in ("image", "video", "vision", "boi", "eoi")):
            continue
        value = getattr(cfg, name, None)
        if isinstance(value, int) and 0 <= value < vocab_size:
            ids.add(value)
    return sorted(ids)


def restrict_logprobs(logp_N: torch.Tensor, hidden_NH: torch.Tensor, head_VH: torch.Tensor,
                      target_N: torch.Tensor, suppressed: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log π'(y) = log π(y) − log(1 − Σ_{v∈S} π(v)) for the distribution restricted to V \\ S.

    π(v) = exp(z_v − z_y + log π(y)) needs only the logits of y and of S: [N] + [N, |S|].
    """
    ids = torch.tensor(suppressed, dtype=torch.long, device=hidden_NH.device)
    dtype = torch.promote_types(logp_N.dtype, torch.float32)
    z_y_N = (hidden_NH * head_VH.index_select(0, target_N)).sum(-1).to(dtype) / temperature
    z_s_NS = (hidden_NH @ head_VH.index_select(0, ids).T).to(dtype) / temperature
    log_p_s_N = (torch.logsumexp(z_s_NS - z_y_N[:, None], dim=-1) + logp_N).clamp(max=-1e-6)
    # log(1 - e^a), stable on both sides of a = -ln 2
    log_keep_N = torch.where(log_p_s_N > -0.6931, torch.log(-torch.expm1(log_p_s_N)),
                             torch.log1p(-torch.exp(log_p_s_N)))
    return logp_N - log_keep_N
