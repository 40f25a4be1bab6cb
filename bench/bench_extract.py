"""Stage-1 throughput and storage: this project's extraction vs a bare forward loop vs a seed-style loop.

All three run in one process on the same images and batches:

* ``bare``: the model's own ``get_image_features`` over pre-processed batches held in memory: vision
  tower + connector and nothing else (no decoding, no hooks, no canonical reordering, no writing).
* ``encode``: the adapter's ``encode`` on the same in-memory batches (our capture + reordering only).
* ``bare_e2e``: the loop a user would write: decode, preprocess, ``get_image_features``, in one process.
* ``ours``: ``run_shard`` end to end: decode + preprocess (DataLoader workers), adapter ``encode``,
  fp16 cast, chunk files, sha256, manifest.
* ``seed``: what the seed pipeline did: ``generate(max_new_tokens=32)`` per batch with forward hooks
  on the connector capturing its input and output.

Prints images/s and the ratios (throughput of ours / throughput of the other): ``encode/bare`` and
``ours/bare`` (goal ≥ 0.95), ``ours/bare_e2e``, ``ours/seed`` (goal ≥ 3), and the bytes on disk against
the raw fp16 tensor bytes (goal ≤ 1.02). Each timing is the best of ``--repeats`` interleaved runs, so a
burst of load on a shared machine hits every variant alike.

    python bench/bench_extract.py --models llava --n 64 --batch_size 8
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlmc.data.images import ImageDataset, discover_images
from vlmc.data.scenes import write_scenes
from vlmc.extract.runner import RunConfig, run_shard
from vlmc.extract.vectors import VLMEncoder
from vlmc.models.base import families
from vlmc.models.load import load_vlm
from vlmc.utils.cli import make_parser, parse_csv_list


def preprocessed_batches(vlm, records, batch_size: int, img_size: int | None) -> list[dict]:
    """Every batch decoded and preprocessed up front (the bare loop's input)."""
    ds = ImageDataset(records)
    images = [ds[i][1] for i in range(len(records))]
    return [
        vlm.adapter.preprocess(vlm.processor, images[i : i + batch_size], img_size)
        for i in range(0, len(images), batch_size)
    ]


def time_bare(vlm, batches: list[dict]) -> float:
    """Seconds for the model's own image-feature path over every batch."""
    inner = vlm.model.model
    t = time.perf_counter()
    with torch.inference_mode():
        for inputs in batches:
            inner.get_image_features(**inputs)
    return time.perf_counter() - t


def time_encode(vlm, batches: list[dict]) -> float:
    """Seconds for the adapter's ``encode`` (capture + canonical order) over every batch."""
    t = time.perf_counter()
    with torch.inference_mode():
        for inputs in batches:
            vlm.adapter.encode(vlm, inputs)
    return time.perf_counter() - t


def time_bare_e2e(vlm, records, batch_size: int, img_size: int | None) -> float:
    """Seconds for decode + preprocess + ``get_image_features`` in one process."""
    t = time.perf_counter()
    batches = preprocessed_batches(vlm, records, batch_size, img_size)
    return time.perf_counter() - t + time_bare(vlm, batches)


def time_seed(vlm, records, batch_size: int, img_size: int | None, new_tokens: int) -> float:
    """Seconds for a generate-with-hooks loop capturing the connector's input and output."""
    ds = ImageDataset(records)
    connector = vlm.adapter.connector_module(vlm.model)
    captured: list = []
    handle = connector.register_forward_hook(lambda m, a, o: captured.append((a, o)))
    t = time.perf_counter()
    try:
        for i in range(0, len(records), batch_size):
            images = [ds[j][1] for j in range(i, min(i + batch_size, len(records)))]
            vlm.adapter.generate(vlm, images, None, new_tokens, img_size=img_size)
            captured.clear()
    finally:
        handle.remove()
    return time.perf_counter() - t


def time_ours(
    vlm, records, out: Path, batch_size: int, img_size: int | None, workers: int
) -> tuple[float, int]:
    """Seconds for ``run_shard`` and the bytes it wrote."""
    cfg = RunConfig(
        batch_size=batch_size, num_workers=workers, save_every=max(len(records), 1), save="tokens"
    )
    t = time.perf_counter()
    run_shard(VLMEncoder(vlm, img_size), "bench", records, out, cfg)
    seconds = time.perf_counter() - t
    return seconds, sum(f.stat().st_size for f in out.glob("*_vectors_*.pt"))


def raw_fp16_bytes(out: Path) -> int:
    """Bytes of the stored token tensors themselves (fp16), the floor for bytes on disk."""
    from vlmc.store.vectors import ShardReader

    r = ShardReader.open(out)
    return sum(v.numel() * 2 for kind in ("pre", "post") for v in r.tokens(kind)[1])


def bench_model(
    name: str,
    source: str,
    n: int,
    batch_size: int,
    img_size: int | None,
    workers: int,
    new_tokens: int,
    repeats: int,
) -> dict:
    """All measurements for one model."""
    tmp = Path(tempfile.mkdtemp(prefix="vlmc-bench-"))
    try:
        write_scenes(tmp / "img" / "00000", n=n, seed=0, size=img_size or 224)
        records = discover_images(tmp / "img")
        vlm = load_vlm(name, source)
        batches = preprocessed_batches(vlm, records, batch_size, img_size)
        time_bare(vlm, batches[:1])  # warm-up
        best: dict[str, float] = {}
        for _ in range(repeats):  # interleaved, best of each
            shutil.rmtree(tmp / "out", ignore_errors=True)
            ours, disk = time_ours(vlm, records, tmp / "out", batch_size, img_size, workers)
            runs = {
                "bare": time_bare(vlm, batches),
                "encode": time_encode(vlm, batches),
                "ours": ours,
                "bare_e2e": time_bare_e2e(vlm, records, batch_size, img_size),
            }
            best = {k: min(v, best.get(k, v)) for k, v in runs.items()}
        best["seed"] = time_seed(vlm, records, batch_size, img_size, new_tokens)
        raw = raw_fp16_bytes(tmp / "out")
        row = {"model": name, "images": n}
        row.update({f"{k}_img_s": n / v for k, v in best.items()})
        row.update(
            {
                "encode_over_bare": best["bare"] / best["encode"],
                "ours_over_bare": best["bare"] / best["ours"],
                "ours_over_bare_e2e": best["bare_e2e"] / best["ours"],
                "ours_over_seed": best["seed"] / best["ours"],
                "disk_over_raw_fp16": disk / raw,
            }
        )
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--models", default="all", help="'all' or a comma list of families")
    p.add_argument("--model-path", dest="model_path", default="tiny", help="source for every model")
    p.add_argument("--n", type=int, default=64, help="images")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--img_size", type=int, default=None, help="square resize (default: processor's)")
    p.add_argument("--num_workers", type=int, default=1, help="DataLoader workers for 'ours'")
    p.add_argument("--new_tokens", type=int, default=32, help="generate length of the seed-style loop")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the best of each is kept")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    names = families() if args.models == "all" else parse_csv_list(args.models)
    rows = [
        bench_model(
            m,
            args.model_path,
            args.n,
            args.batch_size,
            args.img_size,
            args.num_workers,
            args.new_tokens,
            args.repeats,
        )
        for m in names
    ]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
