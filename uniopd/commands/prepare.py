"""`uniopd prepare`: write a packaged data set (easyvqa, math-code) as prompt records."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="write a packaged data set as prompt records (easyvqa: images + questions; "
                                       "math-code: CHAMP math + HumanEval code)")
    p.add_argument("dataset", choices=["easyvqa", "math-code"])
    p.add_argument("--out", required=True, help="directory for the JSONL (easyvqa: <split>.jsonl and images/; "
                                                "math-code: train.jsonl)")
    p.add_argument("--limit", type=int, default=0, help="math-code: at most N records per domain (0 = all)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="easyvqa: which split")
    p.add_argument("--limit-images", type=int, default=0, help="easyvqa: only the first N images (0 = all)")
    p.add_argument("--domains", default="vqa", choices=["vqa", "subject"],
                   help="vqa: one domain; subject: vqa_color / vqa_shape by what the question asks")
    p.add_argument("--no-copy", action="store_true", help="refer to the package's image files instead of copying")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.dataset == "math-code":
        from uniopd.data.math_code import prepare_math_code

        path, counts = prepare_math_code(args.out, limit=args.limit or None)
        print(json.dumps({"out": str(path), "records": sum(counts.values()), **counts}))
        return 0
    from uniopd.data.easyvqa import prepare_easyvqa

    path = prepare_easyvqa(args.out, split=args.split, limit_images=args.limit_images or None,
                           domains=args.domains, copy_images=not args.no_copy)
    print(json.dumps({"out": str(path), "records": sum(1 for _ in open(path))}))
    return 0
