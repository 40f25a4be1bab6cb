"""Stage-1 throughput and storage (issue #2): our extraction vs the bare loop vs a seed-style generate loop.

Every variant runs in one process on the same images, the same batches (``--batch_size``, chunk-aligned
as in ``run_shard``), the same compute dtype and the same decoding: a DataLoader over ``ImageDataset``
with ``--num_workers`` workers. Variants:

* ``bare`` (the issue's baseline): DataLoader whose workers decode and run the adapter's own
  ``preprocess`` → the model's ``get_image_features`` (vision tower + connector); outputs dropped.
* ``ours``: ``run_shard`` end to end: the same DataLoader, adapter ``encode`` (hooks + canonical
  order), cast to the storage dtype, chunk files (``--save_every``), sha256, manifest, fsync.
* ``seed``: what the seed pipeline did: the same DataLoader decoding, then ``generate`` with
  ``--new_tokens`` new tokens per batch, forward hooks on the connector copying its input and output
  to the host. It runs on the first ``--seed_n`` images only (it is 3-10x slower and has no per-run
  fixed cost worth amortizing); its images/s is compared.
* ``forward`` / ``encode`` (diagnostics, no decoding): ``get_image_features`` vs adapter ``encode`` over
  batches preprocessed up front, i.e. the cost of our hooks and reordering alone.

Repeats are interleaved (``forward, encode, bare, ours, seed``, the order rotating every repeat) so
load from other jobs hits every variant alike; the table gives the median images/s of each and the
median over repeats of the paired ratios (throughput of ours / throughput of the other, both measured
in the same repeat): ``ours/bare`` (goal ≥ 0.95; ``ours/bare range``: its lowest and highest repeat),
``ours/seed`` (goal ≥ 3), ``encode/forward``, and the bytes on disk against the raw fp16 tensor bytes
(goal ≤ 1.02). ``disk_MB_s``: raw write + fsync of the output folder, measured in the same run
(``bench_store.measure_disk``); ``disk_img_s`` = that ÷ the bytes ``ours`` stored per image: the
images/s the disk allows; ``ours/min(forward,disk)`` (goal ≥ 0.9). ``bare_workers_busy`` / ``ours_workers_busy``: the decoding workers' CPU seconds over
the wall seconds of the run. With tiny models both loops wait on the workers (busy ≈ 1 per worker): the
same value for both says ours keeps its decoders as busy as the bare loop, and that a lower ``ours/bare``
in such a run came from the workers themselves running slower (a shared machine), not from ours.

Steady state: ``run_shard`` has fixed costs per shard (worker start-up, shared with ``bare``; manifest
writes, ~10-30 ms) and per chunk (two fsynced files, a manifest). On tiny models a batch costs ~1 ms, so
``--n`` must be large enough (default 512 = two 256-image chunks, the CLI's ``--save_every``) for them
to be amortized as they are in a real run. ``--threads`` pins torch's intra-op threads (default 1): on
a shared machine more threads than free cores makes every parallel region wait for a descheduled
thread, which swamps the comparison. ``--img_size`` (Qwen families, Idefics2) raises the token count
for a heavier vision forward than the tiny 64 px default.

    python bench/bench_extract.py --models llava --n 512 --repeats 3
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_store import measure_disk  # bench/ is on sys.path when this runs as a script
from torch.utils.data import DataLoader

from vlmc.data.images import ImageDataset, ImageRecord, discover_images
from vlmc.data.scenes import write_scenes
from vlmc.extract.runner import RunConfig, batch_plan, chunk_slices, run_shard
from vlmc.extract.vectors import VLMEncoder
from vlmc.models.base import VLM, families
from vlmc.models.load import load_vlm
from vlmc.store.vectors import ShardReader
from vlmc.utils.cli import make_parser, parse_csv_list

VARIANTS = ("forward", "encode", "bare", "ours", "seed")


class _Preprocess:
    """DataLoader collate for ``bare``: the adapter's own preprocessing, in the workers."""

    def __init__(self, vlm: VLM, img_size: int | None) -> None:
        self.vlm, self.img_size = vlm, img_size

    def __call__(self, items: list) -> dict[str, Any]:
        return self.vlm.adapter.preprocess(self.vlm.processor, [im for _, im, _ in items], self.img_size)


def _images(items: list) -> list:
    """DataLoader collate for ``seed``: the decoded images (its processor runs with the prompt)."""
    return [im for _, im, _ in items]


class Bench:
    """One model's variants over one image set.

    Args:
        vlm: the loaded model.
        records: the images (one shard).
        out: scratch folder for ``ours``.
        cfg: batch size, workers and chunking, shared by every variant.
        img_size: square resize (``None``: the processor's own size).
        new_tokens: generate length of ``seed``.
    """

    def __init__(
        self,
        vlm: VLM,
        records: list[ImageRecord],
        out: Path,
        cfg: RunConfig,
        img_size: int | None,
        new_tokens: int,
        seed_n: int = 0,
    ) -> None:
        self.vlm, self.records, self.out, self.cfg = vlm, records, out, cfg
        self.img_size, self.new_tokens = img_size, new_tokens
        self.plan = batch_plan(chunk_slices(len(records), cfg.save_every), cfg.batch_size)
        self.seed_n = min(seed_n or len(records), len(records))

    def _loader(self, collate: Callable[[list], Any], n: int | None = None) -> DataLoader:
        records = self.records[:n] if n else self.records
        plan = batch_plan(chunk_slices(len(records), self.cfg.save_every), self.cfg.batch_size)
        return DataLoader(ImageDataset(records), batch_sampler=plan, num_workers=self.cfg.num_workers, collate_fn=collate)

    def _inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.vlm.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def preprocessed(self) -> list[dict[str, Any]]:
        """Every batch decoded and preprocessed up front (input of ``forward`` and ``encode``)."""
        return [self._inputs(b) for b in DataLoader(
            ImageDataset(self.records), batch_sampler=self.plan, num_workers=0,
            collate_fn=_Preprocess(self.vlm, self.img_size),
        )]

    def forward(self, batches: list[dict[str, Any]]) -> None:
        """The model's own image-feature path over in-memory batches."""
        with torch.inference_mode():
            for inputs in batches:
                self.vlm.model.model.get_image_features(**inputs)

    def encode(self, batches: list[dict[str, Any]]) -> None:
        """The adapter's ``encode`` (capture + canonical order) over in-memory batches."""
        with torch.inference_mode():
            for inputs in batches:
                self.vlm.adapter.encode(self.vlm, inputs)

    def bare(self) -> None:
        """Decode + preprocess in DataLoader workers → ``get_image_features``, outputs dropped."""
        inner = self.vlm.model.model
        with torch.inference_mode():
            for inputs in self._loader(_Preprocess(self.vlm, self.img_size)):
                inner.get_image_features(**self._inputs(inputs))

    def clean(self) -> None:
        """Remove the previous ``ours`` output (untimed: a real run writes into a new folder)."""
        shutil.rmtree(self.out, ignore_errors=True)

    def ours(self) -> None:
        """``run_shard`` into ``out``, as stage 1 does (``clean`` first)."""
        run_shard(VLMEncoder(self.vlm, self.img_size), "bench", self.records, self.out, self.cfg)

    def warm_up(self, batches: list[dict[str, Any]]) -> None:
        """One untimed pass of each path (first-call allocations, lazy inits, chat template)."""
        self.forward(batches[:1])
        self.encode(batches[:1])
        self.clean()
        self.ours()
        if self.new_tokens > 0:
            images = [ImageDataset(self.records)[i].image for i in range(min(self.cfg.batch_size, len(self.records)))]
            self.vlm.adapter.generate(self.vlm, images, None, self.new_tokens, img_size=self.img_size)

    def seed(self) -> None:
        """``generate`` per batch with hooks copying the connector's input and output to the host."""
        connector = self.vlm.adapter.connector_module(self.vlm.model)
        captured: list = []

        def hook(_m: torch.nn.Module, args: tuple, out: Any) -> None:
            out = out if isinstance(out, torch.Tensor) else out[0]  # every family's connector returns a tensor
            captured.append((args[0].detach().cpu(), out.detach().cpu()))

        handle = connector.register_forward_hook(hook)
        try:
            for images in self._loader(_images, self.seed_n):
                self.vlm.adapter.generate(self.vlm, images, None, self.new_tokens, img_size=self.img_size)
                captured.clear()
        finally:
            handle.remove()

    def disk_over_raw(self) -> float:
        """Bytes of ``ours``'s chunk files over the bytes of the token tensors they hold, in fp16."""
        disk = sum(f.stat().st_size for f in self.out.glob("*_vectors_*.pt"))
        r = ShardReader.open(self.out)
        return disk / sum(v.numel() * 2 for kind in ("pre", "post") for v in r.tokens(kind)[1])


def bench_model(name: str, args: Any) -> dict[str, Any]:
    """All measurements for one model: median images/s per variant and median paired ratios."""
    tmp = Path(tempfile.mkdtemp(prefix="vlmc-bench-"))
    try:
        write_scenes(tmp / "img" / "00000", n=args.n, seed=0, size=args.img_size or 224)
        records = discover_images(tmp / "img")
        vlm = load_vlm(name, args.model_path)
        cfg = RunConfig(batch_size=args.batch_size, num_workers=args.num_workers, save_every=args.save_every,
                        save="tokens", store_dtype="fp16")
        b = Bench(vlm, records, tmp / "out", cfg, args.img_size, args.new_tokens, args.seed_n)
        batches = b.preprocessed()
        runs: dict[str, Callable[[], None]] = {
            "forward": lambda: b.forward(batches), "encode": lambda: b.encode(batches),
            "bare": b.bare, "ours": b.ours, "seed": b.seed,
        }
        variants = [v for v in VARIANTS if v != "seed" or args.new_tokens > 0]
        b.warm_up(batches)
        times: dict[str, list[float]] = {v: [] for v in variants}
        busy: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.repeats):
            for v in variants[r % len(variants):] + variants[: r % len(variants)]:
                if v == "ours":
                    b.clean()
                c, t = _workers_cpu(), time.perf_counter()
                runs[v]()
                times[v].append(time.perf_counter() - t)
                busy[v].append((_workers_cpu() - c) / times[v][-1])
        row: dict[str, Any] = {"model": name, "images": args.n}
        counts = {v: b.seed_n if v == "seed" else args.n for v in times}
        row.update({f"{v}_img_s": counts[v] / statistics.median(ts) for v, ts in times.items()})

        def ratios(a: str, b_: str) -> list[float]:  # throughput a / throughput b, paired per repeat
            return [(counts[a] / ta) / (counts[b_] / tb) for ta, tb in zip(times[a], times[b_], strict=True)]

        def ratio(a: str, b_: str) -> float:
            return statistics.median(ratios(a, b_))

        row["encode/forward"] = ratio("encode", "forward")
        row["ours/bare"] = ratio("ours", "bare")
        paired = ratios("ours", "bare")
        row["ours/bare range"] = f"{min(paired):.2f}-{max(paired):.2f}"  # the run-to-run spread
        if args.num_workers > 0:  # decoding workers' CPU time / wall time (their busy fraction, summed)
            row.update({f"{v}_workers_busy": statistics.median(busy[v]) for v in ("bare", "ours")})
        row["ours/seed"] = ratio("ours", "seed") if "seed" in times else float("nan")
        row["disk/raw_fp16"] = b.disk_over_raw()
        # the disk's images/s: raw write+fsync MB/s of the output folder, measured now, / bytes per image
        row["disk_MB_s"] = measure_disk(tmp)
        row["disk_img_s"] = row["disk_MB_s"] * 1e6 * args.n / sum(f.stat().st_size for f in b.out.glob("*_vectors_*.pt"))
        row["ours/min(forward,disk)"] = row["ours_img_s"] / min(row["forward_img_s"], row["disk_img_s"])
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _workers_cpu() -> float:
    """CPU seconds of this process's finished children (the DataLoader workers, joined after each run)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cell(key: str, value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if key.endswith("_img_s") else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--models", default="all", help="'all' or a comma list of families")
    p.add_argument("--model-path", dest="model_path", default="tiny", help="source for every model")
    p.add_argument("--n", type=int, default=512, help="images (enough to amortize per-shard fixed costs)")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass, every variant")
    p.add_argument("--save_every", type=int, default=256, help="images per chunk file of 'ours' (batches never cross)")
    p.add_argument("--img_size", type=int, default=None, help="square resize; None: the processor's own size")
    p.add_argument("--num_workers", type=int, default=1, help="DataLoader workers decoding + preprocessing, every variant")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process (0: torch's default)")
    p.add_argument("--new_tokens", type=int, default=32, help="generate length of the seed-style loop (0: skip it)")
    p.add_argument("--seed_n", type=int, default=128, help="images the seed-style loop runs on (the first ones; 0: all)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = families() if args.models == "all" else parse_csv_list(args.models)
    rows = []
    for m in names:
        rows.append(bench_model(m, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    cols = list(rows[0])
    print(f"threads={torch.get_num_threads()} workers={args.num_workers} batch={args.batch_size} "
          f"save_every={args.save_every} n={args.n} seed_n={min(args.seed_n or args.n, args.n)} "
          f"repeats={args.repeats} (medians)")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_cell(k, v) for k, v in r.items()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
