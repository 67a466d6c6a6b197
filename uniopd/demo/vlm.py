"""Tiny random vision-language checkpoints (Qwen2-VL and Idefics3 architectures) for tests and dry runs.

No small VLM ships in a package, so tests build one: a character-level tokenizer with the
Qwen-VL special tokens (`<|im_start|>`, `<|im_end|>`, `<|vision_start|>`, `<|image_pad|>`,
`<|vision_end|>`, ...) and a minimal Qwen-style chat template, a PIL Qwen2-VL image processor
that turns a 64×64 image into 2×2 merged patches (4 image tokens), and a Qwen2-VL model
with a one-block vision tower (~0.1M parameters). Everything is written with
`save_pretrained`, so it loads through `uniopd.models.loading.load_model` exactly like a
real checkpoint.

`make_tiny_idefics3` builds the architecture of SmolVLM / Idefics3 the same way (SigLIP-style
tower, pixel-shuffle connector, Llama text model). Its processor needs no torchvision, so vLLM
runs it on CPU, which it cannot do for Qwen2-VL (tests of `rollout.backend=vllm` with images).

    python -m uniopd.demo.vlm OUT_DIR      # writes OUT_DIR/vlm (student) and OUT_DIR/text (text teacher)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vlm_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer with the Qwen-VL special tokens and a chat template; EOS is <|im_end|>."""
    from uniopd.demo.tokenizer import SPECIALS as BASE_SPECIALS, char_tokenizer

    assert SPECIALS[: len(BASE_SPECIALS)] == BASE_SPECIALS
    tok = char_tokenizer(extra_specials=SPECIALS[len(BASE_SPECIALS):], eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_vlm(path: str | Path, *, hidden: int = 32, layers: int = 2, seed: int = 0,
                  tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    """A random Qwen2-VL checkpoint (model, tokenizer, PIL image processor, chat template) at `path`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path = Path(path)
    tok = tokenizer or vlm_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    heads = 4
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         # M-RoPE sections (temporal, height, width) sum to head_dim / 2
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": _mrope_section(hidden // heads // 2)}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    # 56×56 pixels exactly: any small image becomes 4×4 patches of 14 px, merged 2×2 -> 4 tokens.
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


IDEFICS3_SPECIALS = ["<|im_start|>", "<|im_end|>", "<image>", "<fake_token_around_image>", "<global-img>",
                     "<end_of_utterance>"]
IDEFICS3_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")


def make_tiny_idefics3(path: str | Path, *, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A random Idefics3 checkpoint: a 64×64 image becomes one 56×56 tile of 4×4 patches,
    pixel-shuffled to 4 image tokens. The text model's heads are 32 wide (vLLM's CPU attention
    kernels take 32 and up); the image processor is the PIL one (no torchvision)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from uniopd.demo.tokenizer import char_tokenizer

    path = Path(path)
    tok = char_tokenizer(extra_specials=IDEFICS3_SPECIALS, eos_token="<|im_end|>")
    tok.chat_template = IDEFICS3_TEMPLATE
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64),
                       max_position_embeddings=512, tie_word_embeddings=True, **special)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=56, patch_size=14)
    cfg = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=True, **special)
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(cfg).save_pretrained(path)
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 56},
                                                max_image_size={"longest_edge": 56})
    Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                      chat_template=IDEFICS3_TEMPLATE).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _mrope_section(half_head_dim: int) -> list[int]:
    t = half_head_dim // 2
    h = (half_head_dim - t) // 2
    return [t, h, half_head_dim - t - h]


def make_tiny_text_teacher(path: str | Path, *, hidden: int = 48, layers: int = 2, seed: int = 0) -> Path:
    """A random text-only Qwen2 model with the same tokenizer as `make_tiny_vlm` (cross-modal teacher)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tok = vlm_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


if __name__ == "__main__":  # pragma: no cover - convenience entry point
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_vlm")
    print(make_tiny_vlm(out / "vlm", seed=1))
    print(make_tiny_vlm(out / "vlm_teacher", hidden=48, seed=2))
    print(make_tiny_text_teacher(out / "text", seed=3))
