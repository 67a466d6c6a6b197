"""A character-level Hugging Face tokenizer for the demo's tiny models.

Built with `tokenizers` and wrapped in `PreTrainedTokenizerFast`, saved with
`save_pretrained`, so the demo's models load through the same `AutoTokenizer` path as a
real checkpoint. One token per printable ASCII character keeps arithmetic learnable by a
model of a few hundred thousand parameters.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer(*, extra_specials: list[str] | tuple[str, ...] = (),
                   eos_token: str = "</s>") -> PreTrainedTokenizerFast:
    """One token per printable character after SPECIALS + extra_specials (e.g. a VLM's image tokens)."""
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(extra_specials) + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    kwargs = {"additional_special_tokens": list(extra_specials)} if extra_specials else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token=eos_token,
                                   unk_token="<unk>", padding_side="left", **kwargs)
