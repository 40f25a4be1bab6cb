"""Caption generation from injected E_post (stages 7 and 8): batched vs the batch-1 loop, every family.

Both variants run in one process on the same images and the same E_post (the model's own, cast to
fp16 and back as a default store holds it), through ``vlmc.eval.inject.caption_from_post``:

* ``loop``: one ``generate`` call per image (``batch_size=1``), what the seed pipeline did;
* ``batched``: ``--batch_size`` images per call, grouped by token shape (no padding inside a batch).

Prints images/s of each, the ratio batched/loop (goal ≥ 3 for tiny LLaVA at the demo settings:
sample/images, 32 new tokens, batch 8) and whether the batched captions equal the loop's (they
must: a batch never mixes token shapes). Each timing is the best of ``--repeats`` interleaved runs,
so a burst of load on a shared machine hits both variants alike.

    python bench/bench_captions.py                       # every family, demo settings
    python bench/bench_captions.py --models llava --n 64 --batch_size 16
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from vlmc.data.images import discover_images, load_image
from vlmc.eval.inject import caption_from_post
from vlmc.models.base import families
from vlmc.models.load import load_vlm
from vlmc.utils.cli import make_parser, parse_csv_list


def bench_family(family: str, source: str, images, args) -> dict:
    vlm = load_vlm(family, source)
    ad = vlm.adapter
    posts = []
    for i in range(0, len(images), args.batch_size):
        cap = ad.encode(vlm, ad.preprocess(vlm.processor, images[i : i + args.batch_size], args.img_size))
        posts += [p.to(torch.float16).to(vlm.dtype) for p in cap.post]
    kw = dict(max_new_tokens=args.max_new_tokens, img_size=args.img_size)
    caption_from_post(vlm, images[:2], posts[:2], batch_size=2, **kw)  # warm-up
    best = {"loop": float("inf"), "batched": float("inf")}
    out = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        out["loop"] = [caption_from_post(vlm, [im], [p], batch_size=1, **kw)[0] for im, p in zip(images, posts, strict=True)]
        best["loop"] = min(best["loop"], time.perf_counter() - t)
        t = time.perf_counter()
        out["batched"] = caption_from_post(vlm, images, posts, batch_size=args.batch_size, **kw)
        best["batched"] = min(best["batched"], time.perf_counter() - t)
    n = len(images)
    return {
        "family": family,
        "images": n,
        "shapes": len({tuple(p.shape) for p in posts}),
        "loop_img_s": n / best["loop"],
        "batched_img_s": n / best["batched"],
        "ratio": best["loop"] / best["batched"],
        "same_captions": out["loop"] == out["batched"],
    }


def main(argv: list[str] | None = None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--models", default="all", help="'all' or a comma list of families")
    p.add_argument("--model-path", dest="model_path", default="tiny", help="source for every model")
    p.add_argument("--root", default="sample/images", help="image root (the demo's)")
    p.add_argument("--n", type=int, default=32, help="images (first N in (shard, key) order)")
    p.add_argument("--batch_size", type=int, default=8, help="batched variant's images per generate call")
    p.add_argument("--max_new_tokens", type=int, default=32, help="caption length (the stages' default)")
    p.add_argument("--img_size", type=int, default=None, help="square resize (default: processor's, as the demo)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the best of each is kept")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")), help="torch threads")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = families() if args.models == "all" else parse_csv_list(args.models)
    images = [load_image(r.path) for r in discover_images(args.root)[: args.n]]
    rows = []
    for m in models:
        rows.append(bench_family(m, args.model_path, images, args))
        print(f"{m}: done", file=sys.stderr, flush=True)
    print(f"# caption_from_post, {len(images)} images from {args.root}, {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size} vs 1, {args.threads} thread(s), best of {args.repeats}")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    llava = next((r for r in rows if r["family"] == "llava"), None)
    if llava is not None:
        print(f"llava batched/loop = {llava['ratio']:.2f}x (goal >= 3): {'OK' if llava['ratio'] >= 3 else 'BELOW GOAL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    bad = [r["family"] for r in rows if not r["same_captions"]]
    if bad:
        print(f"batched captions differ from the batch-1 loop for: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
