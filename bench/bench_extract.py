"""Stage-1 throughput and storage (issue #2): our extraction vs the bare loop vs a seed-style generate loop.

Every variant runs in one process on the same images, the same batches (``--batch_size``, chunk-aligned
as in ``run_shard``), the same compute dtype and the same decoding: a DataLoader over ``ImageDataset``
with ``--num_workers`` workers. Variants:

* ``bare`` (the baseline): DataLoader whose workers decode and run the adapter's own
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
(goal ≤ 1.02). ``bare_workers_busy`` / ``ours_workers_busy``: the decoding workers' CPU seconds over
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

GPU (and real dimensions): ``--device cuda --dtype bf16 --model-path config:<name>`` (one name per
model: ``llava=config:llava-1.5-7b,...``) reads the clock after ``torch.cuda.synchronize()`` and
reports each variant's peak device memory (``*_peak_gb``: the benchmarked model's weights plus the
peak of ``torch.cuda.max_memory_allocated`` over what was allocated when the variant started, reset
before every variant, so the batches ``forward`` keeps preprocessed on the device and a seed model do not
count: what a stage-1 run itself holds) and the weights resident on the device (``weights_gb``). The model is loaded
vision-only (``vlmc.models.partial``) unless ``--full_model``; the seed-style loop, which runs the
LM, then loads the whole model separately (skip it with ``--new_tokens 0``). ``--preprocess``: where
``ours`` runs the image processor (auto: on the device for cuda, in the workers on cpu);
``ours_workers`` adds ``ours`` with the processor in the workers whenever ``ours`` uses the device.

``disk``: raw sequential write + fsync MB/s of the output folder (``--disk_mb`` MB in 8 MB blocks,
measured in the same run by ``bench_store.measure_disk``), divided by the fp16 bytes one image's E_pre + E_post take: the images/s
the disk allows. ``ours/min(forward,disk)`` is the end-to-end goal (>= 0.9 on a GPU).

    python bench/bench_extract.py --models llava --n 512 --repeats 3
    python bench/bench_extract.py --models llava --model-path config:llava-1.5-7b --device cuda --dtype bf16 \
        --img_size 336 --batch_size 32 --num_workers 12 --new_tokens 0
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
from bench_store import measure_disk  # bench/ is on sys.path when run as a script
from torch.utils.data import DataLoader

from vlmc.data.images import ImageDataset, ImageRecord, discover_images
from vlmc.data.scenes import write_scenes
from vlmc.extract.runner import RunConfig, batch_plan, chunk_slices, run_shard
from vlmc.extract.vectors import VLMEncoder, resolve_preprocess_on
from vlmc.models.attention import add_attn_arg, check_attn_implementation
from vlmc.models.base import VLM, families
from vlmc.models.load import load_vlm
from vlmc.store.vectors import ShardReader
from vlmc.utils.cli import UsageError, entry_point, make_parser, parse_csv_list, resolve_device, resolve_dtype

VARIANTS = ("forward", "encode", "bare", "ours", "ours_workers", "seed")


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
        preprocess_on: str = "workers",
        seed_vlm: VLM | None = None,
    ) -> None:
        self.vlm, self.records, self.out, self.cfg = vlm, records, out, cfg
        self.img_size, self.new_tokens = img_size, new_tokens
        self.plan = batch_plan(chunk_slices(len(records), cfg.save_every), cfg.batch_size)
        self.seed_n = min(seed_n or len(records), len(records))
        self.preprocess_on = preprocess_on
        self.seed_vlm = seed_vlm or vlm  # generate needs the LM: the whole model when vlm is vision-only

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

    def ours(self, preprocess_on: str | None = None) -> None:
        """``run_shard`` into ``out``, as stage 1 does (``clean`` first)."""
        encoder = VLMEncoder(self.vlm, self.img_size, preprocess_on=preprocess_on or self.preprocess_on)
        run_shard(encoder, "bench", self.records, self.out, self.cfg)

    def warm_up(self, batches: list[dict[str, Any]]) -> None:
        """One untimed pass of each path (first-call allocations, lazy inits, chat template)."""
        self.forward(batches[:1])
        self.encode(batches[:1])
        self.clean()
        self.ours()
        if self.new_tokens > 0:
            images = [ImageDataset(self.records)[i].image for i in range(min(self.cfg.batch_size, len(self.records)))]
            self.seed_vlm.adapter.generate(self.seed_vlm, images, None, self.new_tokens, img_size=self.img_size)

    def seed(self) -> None:
        """``generate`` per batch with hooks copying the connector's input and output to the host."""
        vlm = self.seed_vlm
        connector = vlm.adapter.connector_module(vlm.model)
        captured: list = []

        def hook(_m: torch.nn.Module, args: tuple, out: Any) -> None:
            out = out if isinstance(out, torch.Tensor) else out[0]  # every family's connector returns a tensor
            captured.append((args[0].detach().cpu(), out.detach().cpu()))

        handle = connector.register_forward_hook(hook)
        try:
            for images in self._loader(_images, self.seed_n):
                vlm.adapter.generate(vlm, images, None, self.new_tokens, img_size=self.img_size)
                captured.clear()
        finally:
            handle.remove()

    def raw_fp16_bytes(self) -> int:
        """Bytes of the token tensors ``ours`` stored, in fp16."""
        r = ShardReader.open(self.out)
        return sum(v.numel() * 2 for kind in ("pre", "post") for v in r.tokens(kind)[1])

    def disk_over_raw(self) -> float:
        """Bytes of ``ours``'s chunk files over the bytes of the token tensors they hold, in fp16."""
        disk = sum(f.stat().st_size for f in self.out.glob("*_vectors_*.pt"))
        return disk / self.raw_fp16_bytes()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_gb(vlm: VLM) -> float:
    """GB (10^9 bytes) of parameters and buffers with real storage (meta ones excluded)."""
    tensors = [*vlm.model.parameters(), *vlm.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta") / 1e9


def load_models(name: str, source: str | None, args: Any) -> tuple[VLM, VLM | None]:
    """The benchmarked model (vision-only unless ``--full_model``) and, for ``seed``, the whole model."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    attn = check_attn_implementation(args.attn_implementation)
    vlm = load_vlm(name, source, dtype, device, vision_only=not args.full_model, attn_implementation=attn)
    seed_vlm = None
    if args.new_tokens > 0 and vlm.vision_only:
        seed_vlm = load_vlm(name, source, dtype, device, attn_implementation=attn)
    return vlm, seed_vlm


def bench_model(name: str, source: str | None, records: list[ImageRecord], args: Any) -> dict[str, Any]:
    """All measurements for one model: median images/s per variant and median paired ratios."""
    tmp = Path(tempfile.mkdtemp(prefix="vlmc-bench-", dir=args.tmp_dir))
    try:
        vlm, seed_vlm = load_models(name, source, args)
        device = vlm.device
        cfg = RunConfig(batch_size=args.batch_size, num_workers=args.num_workers, save_every=args.save_every,
                        save="tokens", store_dtype="fp16")
        where = resolve_preprocess_on(args.preprocess, device)
        b = Bench(vlm, records, tmp / "out", cfg, args.img_size, args.new_tokens, args.seed_n, where, seed_vlm)
        batches = b.preprocessed()
        runs: dict[str, Callable[[], None]] = {
            "forward": lambda: b.forward(batches), "encode": lambda: b.encode(batches),
            "bare": b.bare, "ours": b.ours, "ours_workers": lambda: b.ours("workers"), "seed": b.seed,
        }
        skip = {"seed"} if args.new_tokens <= 0 else set()
        if where == "workers":
            skip.add("ours_workers")  # the same as ours
        wanted = parse_csv_list(args.variants) or list(VARIANTS)
        variants = [v for v in VARIANTS if v not in skip and v in wanted]
        b.warm_up(batches)
        times: dict[str, list[float]] = {v: [] for v in variants}
        busy: dict[str, list[float]] = {v: [] for v in variants}
        peak: dict[str, float] = {}
        weights = resident_gb(vlm)
        for r in range(args.repeats):
            for v in variants[r % len(variants):] + variants[: r % len(variants)]:
                if v.startswith("ours"):
                    b.clean()
                if device.type == "cuda":
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    held = torch.cuda.memory_allocated(device)  # weights + other variants' batches
                _sync(device)
                c, t = _workers_cpu(), time.perf_counter()
                runs[v]()
                _sync(device)
                times[v].append(time.perf_counter() - t)
                busy[v].append((_workers_cpu() - c) / times[v][-1])
                if device.type == "cuda":  # the weights + this variant's own working memory
                    own = (torch.cuda.max_memory_allocated(device) - held) / 1e9
                    peak[v] = max(peak.get(v, 0.0), weights + own)
        row: dict[str, Any] = {"model": name, "images": len(records), "device": str(device),
                               "dtype": str(vlm.dtype).replace("torch.", ""), "preprocess": where,
                               "vision_only": vlm.vision_only, "weights_gb": resident_gb(vlm)}
        counts = {v: b.seed_n if v == "seed" else len(records) for v in times}
        row.update({f"{v}_img_s": counts[v] / statistics.median(ts) for v, ts in times.items()})

        def ratios(a: str, b_: str) -> list[float]:  # throughput a / throughput b, paired per repeat
            return [(counts[a] / ta) / (counts[b_] / tb) for ta, tb in zip(times[a], times[b_], strict=True)]

        def ratio(a: str, b_: str) -> float:
            return statistics.median(ratios(a, b_)) if a in times and b_ in times else float("nan")

        row["encode/forward"] = ratio("encode", "forward")
        row["ours/bare"] = ratio("ours", "bare")
        if "ours" in times and "bare" in times:
            paired = ratios("ours", "bare")
            row["ours/bare range"] = f"{min(paired):.2f}-{max(paired):.2f}"  # the run-to-run spread
        if args.num_workers > 0:  # decoding workers' CPU time / wall time (their busy fraction, summed)
            row.update({f"{v}_workers_busy": statistics.median(busy[v]) for v in ("bare", "ours") if v in busy})
        row["ours/seed"] = ratio("ours", "seed")
        if not (b.out / "manifest.json").is_file():
            b.ours()  # the disk figures need one complete store (the last timed ours* left one)
        row["disk/raw_fp16"] = b.disk_over_raw()
        bytes_per_image = b.raw_fp16_bytes() / len(records)
        row["disk_mb_s"] = measure_disk(tmp, args.disk_mb << 20) if args.disk_mb > 0 else float("nan")
        row["disk_img_s"] = row["disk_mb_s"] * 1e6 / bytes_per_image
        if "ours" in times and "forward" in times:
            row["ours/min(forward,disk)"] = row["ours_img_s"] / min(row["forward_img_s"], row["disk_img_s"])
        row.update({f"{v}_peak_gb": g for v, g in peak.items()})
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
    if key.endswith("_img_s"):
        return f"{value:.0f}" if value >= 10 else f"{value:.2f}"
    return f"{value:.2f}" if key.endswith(("_gb", "_mb_s")) else f"{value:.3f}"


def model_sources(names: list[str], text: str | None) -> dict[str, str | None]:
    """``--model-path``: one source for every model, or ``name=source`` pairs."""
    if not text or "=" not in text:
        return dict.fromkeys(names, text)
    pairs = dict(item.split("=", 1) for item in parse_csv_list(text))
    return {n: pairs.get(n, "tiny") for n in names}


def build_parser():
    """CLI arguments; ``--help`` shows defaults."""
    p = make_parser(__doc__)
    p.add_argument("--models", default="all", help="'all' or a comma list of families")
    p.add_argument("--model-path", dest="model_path", default="tiny",
                   help="source for every model, or per model: 'llava=config:llava-1.5-7b,qwen3.5=tiny'")
    p.add_argument("--n", type=int, default=512, help="images (enough to amortize per-shard fixed costs)")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass, every variant")
    p.add_argument("--save_every", type=int, default=256, help="images per chunk file of 'ours' (batches never cross)")
    p.add_argument("--img_size", type=int, default=None, help="square resize; None: the processor's own size")
    p.add_argument("--num_workers", type=int, default=1, help="DataLoader workers decoding + preprocessing, every variant")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process (0: torch's default)")
    p.add_argument("--new_tokens", type=int, default=32, help="generate length of the seed-style loop (0: skip it)")
    p.add_argument("--seed_n", type=int, default=128, help="images the seed-style loop runs on (the first ones; 0: all)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 on cuda, fp32 on cpu), bf16, fp16, fp32")
    add_attn_arg(p)
    p.add_argument("--preprocess", default="auto", choices=["auto", "workers", "device"],
                   help="where 'ours' runs the image processor (auto: device on cuda, workers on cpu)")
    p.add_argument("--full_model", action="store_true", help="load the whole VLM (default: vision tower + connector only)")
    p.add_argument("--variants", default="", help=f"comma list of variants to run (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--disk_mb", type=int, default=256, help="MB written for the raw write+fsync probe (0: skip)")
    p.add_argument("--image_root", default=None,
                   help="benchmark these images (first --n of one shard) instead of generating --n scenes")
    p.add_argument("--tmp_dir", default=None, help="scratch folder for images and stores (default: the system's temp)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file (rewritten after each model)")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_device(args.device)  # --device cuda without a GPU: one line, exit 2
    check_attn_implementation(args.attn_implementation)
    if args.n < 1 or args.repeats < 1 or args.batch_size < 1:
        raise UsageError("--n, --repeats and --batch_size must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = families() if args.models == "all" else parse_csv_list(args.models)
    sources = model_sources(names, args.model_path)
    tmp = Path(tempfile.mkdtemp(prefix="vlmc-bench-img-", dir=args.tmp_dir))
    try:
        if args.image_root:
            records = discover_images(args.image_root, max_items=args.n)
        else:
            write_scenes(tmp / "00000", n=args.n, seed=0, size=args.img_size or 224)
            records = discover_images(tmp)
        if len({r.shard for r in records}) != 1:
            raise UsageError(f"--image_root {args.image_root}: benchmark one shard (got several)")
        rows = []
        for m in names:
            rows.append(bench_model(m, sources[m], records, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.json:  # as we go: a run cut short keeps its figures
                Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(f"threads={torch.get_num_threads()} workers={args.num_workers} batch={args.batch_size} "
          f"save_every={args.save_every} n={args.n} seed_n={min(args.seed_n or args.n, args.n)} "
          f"repeats={args.repeats} (medians)")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_cell(k, r.get(k, "")) for k in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
