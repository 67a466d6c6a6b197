"""easy-VQA as prompt records, for vision-language and cross-modal OPD.

The `easy-vqa` package ships 64×64 images of one coloured shape (circle, rectangle or
triangle, in one of 8 colours) on a light background, with questions and one-word answers
(a colour, a shape, yes or no): 4,000 train and 1,000 test images, 38,575 / 9,673
questions. Everything is offline.

Each question becomes one record:

    id          "easyvqa-<split>-<n>"
    domain      "vqa", or with domains="subject" "vqa_color" / "vqa_shape" (what the
                question is about), so two teachers can be routed by domain
    prompt      "<question> Answer with one word."
    images      [the image]: copied to <out>/images/ with copy_images=True (portable), else
                the package's own file
    answer      the package's answer; verifier "exact"
    image_text  "a <color> <shape> on a light background": the text a text-only teacher
                reads in place of the image (cross-modal view `image_text`)
    meta        {"split", "image_id", "color", "shape", "subject"}

Where the description comes from. The package gives no per-image metadata, only the
questions. An image's colour and shape are read off its own questions and answers
("what color is the shape?" → blue; "what is the blue shape?" → rectangle; "does the image
not contain a circle?" → no, so a circle; ...). About 11% of images have no question that
names one of the two; for those the image itself decides: the colour is the palette colour
(easy-VQA draws in 8 pure RGB colours) covering most pixels, the shape the fill ratio of the
shape's bounding box (rectangle ≈ 1, circle ≈ π/4, triangle ≈ 1/2). On the 3,500+ train
images where the questions name both, the pixel rule agrees with them (measured by
`check_pixel_rule`; see the issue note).

    uniopd prepare easyvqa --out data/easyvqa --split train --limit-images 500
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

SHAPES = ("circle", "rectangle", "triangle")
PALETTE = {(255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue", (255, 255, 0): "yellow",
           (0, 128, 128): "teal", (165, 42, 42): "brown", (0, 0, 0): "black", (128, 128, 128): "gray"}
COLORS = tuple(sorted(PALETTE.values()))
INSTRUCTION = "Answer with one word."


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the easy-VQA data ships in the `easy-vqa` package: pip install easy-vqa") from exc
    return easy_vqa


def _words(question: str) -> list[str]:
    return re.findall(r"[a-z]+", question.lower())


def facts_from_question(question: str, answer: str) -> dict[str, str]:
    """Shape / colour that one question-answer pair says the image has (possibly none)."""
    words = _words(question)
    found: dict[str, str] = {}
    if answer in SHAPES:
        found["shape"] = answer
    elif answer in COLORS:
        found["color"] = answer
    if answer in ("yes", "no"):
        negated = "not" in words or "no" in words
        if (answer == "yes") == negated:  # the named colour / shape is absent
            return found
    elif not question.lower().startswith("what"):
        return found
    for w in words:
        if w in SHAPES:
            found.setdefault("shape", w)
        elif w in COLORS:
            found.setdefault("color", w)
    return found


def subject_of(question: str, answer: str) -> str:
    """'color' or 'shape': what the question asks about."""
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    return "color" if any(w in COLORS for w in _words(question)) else "shape"


def facts_from_pixels(path: str | Path) -> dict[str, str]:
    """Colour (palette colour with most pixels) and shape (bounding-box fill ratio) of an image."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    width = rgb.width
    pixels = list(rgb.getdata()) if not hasattr(rgb, "get_flattened_data") else list(rgb.get_flattened_data())
    counts = Counter(p for p in pixels if p in PALETTE)
    if not counts:
        return {}
    fg = counts.most_common(1)[0][0]
    near = [i for i, p in enumerate(pixels) if sum(abs(a - b) for a, b in zip(p, fg)) < 60]
    xs, ys = [i % width for i in near], [i // width for i in near]
    fill = len(near) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    shape = "triangle" if fill < 0.71 else "circle" if fill < 0.955 else "rectangle"
    return {"color": PALETTE[fg], "shape": shape}


def image_facts(split: str = "train", only: set[int] | None = None) -> dict[int, dict[str, str]]:
    """{image id: {"color", "shape"}} for the images of a split (all, or `only` these), from their
    questions first and their pixels to fill gaps."""
    ev = _easy_vqa()
    texts, answers, image_ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    facts: dict[int, dict[str, str]] = {i: {} for i in paths if only is None or i in only}
    for q, a, i in zip(texts, answers, image_ids):
        if i not in facts:
            continue
        for key, value in facts_from_question(q, a).items():
            facts[i].setdefault(key, value)
    for i, f in facts.items():
        if len(f) < 2:
            for key, value in facts_from_pixels(paths[i]).items():
                f.setdefault(key, value)
    return facts


def check_pixel_rule(split: str = "train", limit: int | None = None) -> dict[str, float]:
    """How often the pixel rule agrees with what the questions say (images where they say both)."""
    ev = _easy_vqa()
    texts, answers, image_ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    from_q: dict[int, dict[str, str]] = {}
    for q, a, i in zip(texts, answers, image_ids):
        for key, value in facts_from_question(q, a).items():
            from_q.setdefault(i, {}).setdefault(key, value)
    both = [i for i, f in sorted(from_q.items()) if len(f) == 2][:limit]
    agree = Counter()
    for i in both:
        px = facts_from_pixels(paths[i])
        agree["color"] += px.get("color") == from_q[i]["color"]
        agree["shape"] += px.get("shape") == from_q[i]["shape"]
    return {"images": float(len(both)), "color": agree["color"] / max(len(both), 1),
            "shape": agree["shape"] / max(len(both), 1)}


def easyvqa_records(split: str = "train", *, limit_images: int | None = None, domains: str = "vqa",
                    image_dir: Path | None = None, image_prefix: str = "images") -> list[dict[str, Any]]:
    """Prompt records (plain dicts, schema of docs/data.md) for the first `limit_images` images.

    image_dir: copy each used image there and refer to it as `<image_prefix>/<name>` (relative to
    the prompt file written next to `image_dir`); None refers to the package's files.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if domains not in ("vqa", "subject"):
        raise ValueError(f"domains must be 'vqa' or 'subject', got {domains!r}")
    ev = _easy_vqa()
    texts, answers, image_ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    keep = set(sorted(paths)[:limit_images]) if limit_images else set(paths)
    facts = image_facts(split, keep)
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for n, (q, a, i) in enumerate(zip(texts, answers, image_ids)):
        if i not in keep:
            continue
        name = f"{split}_{i}.png"
        if image_dir is not None:
            target = Path(image_dir) / name
            if not target.exists():
                shutil.copyfile(paths[i], target)
            ref = f"{image_prefix}/{name}"
        else:
            ref = paths[i]
        f = facts[i]
        subject = subject_of(q, a)
        rows.append({
            "id": f"easyvqa-{split}-{n}",
            "domain": "vqa" if domains == "vqa" else f"vqa_{subject}",
            "prompt": f"{q[0].upper()}{q[1:]} {INSTRUCTION}",
            "images": [ref],
            "answer": a,
            "verifier": "exact",
            "image_text": f"a {f.get('color', 'colored')} {f.get('shape', 'shape')} on a light background",
            "meta": {"split": split, "image_id": i, "color": f.get("color"), "shape": f.get("shape"),
                     "subject": subject},
        })
    return rows


def prepare_easyvqa(out_dir: str | Path, *, split: str = "train", limit_images: int | None = None,
                    domains: str = "vqa", copy_images: bool = True) -> Path:
    """Write <out_dir>/<split>.jsonl (and <out_dir>/images/ when copying); returns the file."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = easyvqa_records(split, limit_images=limit_images, domains=domains,
                           image_dir=out / "images" if copy_images else None)
    path = out / f"{split}.jsonl"
    from uniopd.utils import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path
