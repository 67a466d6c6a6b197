"""Loading students and teachers: a local directory, a Hugging Face hub id, or a GGUF file.

All three go through `transformers.from_pretrained`, so a model made by `save_pretrained`
in a test takes exactly the path of a real checkpoint. GGUF files are dequantised by
transformers (needs the `gguf` package) into ordinary torch weights.

A checkpoint whose config has a vision tower (`vision_config`: Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, LLaVA, Gemma-3, ...) is loaded with `AutoModelForImageTextToText` and its
processor (`uniopd.models.multimodal.load_processor`); `LoadedModel.processor` is then set
and prompts with images take the multimodal path. Text checkpoints never touch it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

# Loading bars for every model load clutter the training progress bar.
hf_logging.disable_progress_bar()

from uniopd.config import ModelConfig
from uniopd.models.forward import limit_vocabulary
from uniopd.utils import resolve_path

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message names the config key and path."""


class VocabularyMismatch(ValueError):
    """Student and teacher tokenizers disagree, so token log-probs cannot be compared."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    processor: Any = None  # set for vision-language models: turns prompts + images into model inputs

    def __post_init__(self) -> None:
        # A head padded past the tokenizer never samples or scores its padded rows.
        limit_vocabulary(self.model, self.vocab_size)

    @property
    def is_multimodal(self) -> bool:
        return self.processor is not None

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce; the embedding may be padded beyond this."""
        return len(self.tokenizer)


def split_model_path(cfg: ModelConfig) -> tuple[str, str | None]:
    """(directory-or-hub-id, gguf file name or None) for a model config."""
    path = resolve_path(cfg.path)
    if path.endswith(".gguf"):
        p = Path(path)
        return str(p.parent), p.name
    return path, cfg.gguf_file


def load_tokenizer(cfg: ModelConfig, key: str = "model") -> PreTrainedTokenizerBase:
    source, gguf = split_model_path(cfg)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises many types; the user needs the key and path
        raise ModelLoadError(f"{key}.path={cfg.path!r}: cannot load tokenizer: {exc}") from exc
    if tok.pad_token_id is None:
        # Decoder-only checkpoints often ship no pad token; EOS is safe since masks hide it.
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ModelLoadError(f"{key}.path={cfg.path!r}: tokenizer has no EOS token, rollouts could not stop")
    tok.padding_side = "left"
    return tok


def load_model(cfg: ModelConfig, key: str = "model", *, device: torch.device | str = "cpu",
               trainable: bool = True) -> LoadedModel:
    """Load model + tokenizer described by `cfg`. `key` names the config section in errors."""
    if not cfg.path:
        raise ModelLoadError(f"{key}.path is empty: name a directory, a hub id or a .gguf file")
    source, gguf = split_model_path(cfg)
    if not Path(source).exists() and (source.startswith((".", "/")) or gguf):
        raise ModelLoadError(f"{key}.path={cfg.path!r}: {source} does not exist")
    if (Path(source) / "dcp").is_dir() and (Path(source) / "manifest.json").is_file():
        # Its weights are torch.distributed.checkpoint shards (uniopd.train.sharded_checkpoint).
        raise ModelLoadError(f"{key}.path={cfg.path!r}: a sharded training checkpoint, not a model directory; "
                             f"write one with `uniopd export {source} OUT_DIR`")
    tokenizer = load_tokenizer(cfg, key)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, "dtype": _DTYPES[cfg.dtype]}
    if gguf:
        kwargs["gguf_file"] = gguf
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    processor = None
    try:
        if not gguf and _is_vision_checkpoint(source, kwargs):
            from transformers import AutoModelForImageTextToText

            from uniopd.models.multimodal import load_processor

            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
            processor = load_processor(source, tokenizer, {k: v for k, v in kwargs.items() if k != "dtype"})
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{key}.path={cfg.path!r}: cannot load model: {exc}") from exc
    if gguf:
        _forget_gguf_quantizer(model)
    model.to(device)
    if trainable:
        model.train()
        if cfg.gradient_checkpointing:  # transformers 5 renamed it; the old name warns there
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    else:
        model.eval()
        model.requires_grad_(False)
    # Dropout would make rollout, scoring and update log-probs disagree; OPD wants them equal.
    _disable_dropout(model)
    return LoadedModel(model=model, tokenizer=tokenizer, source=cfg.path, processor=processor)


def _is_vision_checkpoint(source: str, kwargs: dict[str, Any]) -> bool:
    from transformers import AutoConfig

    from uniopd.models.multimodal import is_vision_config

    try:
        config = AutoConfig.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "dtype"})
    except Exception:  # let the model load report the problem
        return False
    return is_vision_config(config)


def _forget_gguf_quantizer(model: torch.nn.Module) -> None:
    """GGUF weights are dequantised to ordinary tensors on load; transformers still marks the
    model as quantised and then refuses `save_pretrained`. Clear the mark so checkpoints of a
    GGUF-initialised student are plain safetensors."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:  # read-only property in some versions
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def check_vocabularies(student: LoadedModel, teacher: LoadedModel, teacher_name: str) -> None:
    """Fail before training when the teacher cannot score the student's tokens.

    Sampled-token log-probs compare the probability of the *same token id* under both
    models, so the two tokenizers must map every string to the same ids. Embedding matrices
    padded to different sizes are fine (logits beyond the tokenizer are never used).
    """
    s_vocab = student.tokenizer.get_vocab()
    t_vocab = teacher.tokenizer.get_vocab()
    if s_vocab == t_vocab:
        return
    only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
    only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
    moved = [tok for tok in s_vocab if tok in t_vocab and s_vocab[tok] != t_vocab[tok]][:5]
    raise VocabularyMismatch(
        f"teacher {teacher_name!r} ({teacher.source}) and the student ({student.source}) have "
        f"different vocabularies: {len(t_vocab)} vs {len(s_vocab)} tokens; only in student: {only_s}, "
        f"only in teacher: {only_t}, different ids: {moved}. Sampled-token OPD needs one tokenizer; "
        f"pick a teacher of the same family.")
