"""Stage 3: geometry of the connector (kNN overlap, CKA, Procrustes, spectra) from the vector stores.

KNOR, CKA, Procrustes, distance correlations, reference agreement and per-image token spectra, from the
stage-1 (and stage-2 reference) stores.

    python src/extract/extract_knn.py --pre_pt data/vector/llava --post_pt data/vector/llava \\
        --ref clip:data/clip_ref --out_dir data/output/knn_out/llava --pool mean --metric l2 --svd_per_image_csv

Inputs: ``--pre_pt`` (kind ``pre``) and ``--post_pt`` (kind ``post``) are stage-1 stores, ``--ref LABEL:PATH``
(repeatable) stage-2 reference stores (kind ``ref``); each PATH may be a chunk file, a shard folder or a
parent of shard folders. Images are identified by ``(shard, key)`` (keys repeat across shards); only ids
present in pre, post and every ref are used, and how many each space lost is logged and written
(``n_dropped``). Pre/post vectors are pooled with ``--pool`` (``mean`` uses the stored mean when present);
reference stores hold one vector per image and are used as stored.

Neighbours exclude the query by id; ``--count_self`` counts it as the first neighbour of its own list,
as the original pipeline's faiss ``IndexFlatL2.search(X, k)`` did, so per image
KNOR_self@k = (1 + (k-1)·KNOR_excl@(k-1)) / k. Ties are broken by index among equal float32 scores (see
``vlmc.metrics.knn``: exact distance ties can be reordered by fp32 rounding).

Protocols: by default ONE GLOBAL gallery: the neighbours of an image are searched among all aligned images
of all shards. ``--per_shard`` is the original pipeline's protocol: neighbours only within the image's own shard (then
k is clipped to the smallest shard's size - 1). ``--k`` is clipped to N - 1 (global) with a warning.
Neighbour lists are computed once at the largest k and sliced. CKA / Procrustes / distance correlations
are whole-set measures over all aligned images in both protocols.

Outputs (all written atomically into ``--out_dir``; k = the effective, clipped k values):

``overlap_top<K>_<metric>.json`` — ONE file, ``K`` = the largest effective k, holding every k::

    {"n": N, "n_images": N,
     "n_dropped": {"pre": int, "post": int, "<ref>": int, ...},
     "n_per_shard": {"<shard>": int, ...},
     "refs": ["<ref>", ...],
     "ks": [k, ...], "k_requested": [k, ...],
     "per_k": {"<k>": {
         "pre_post":     {"mean", "median", "std", "n", "ci95_lo", "ci95_hi"},  # KNOR(pre, post) over images
         "<ref>_pre":    {same keys},                         # KNOR(ref, pre)   (std ddof=0; ci95 = percentile
         "<ref>_post":   {same keys},                         # KNOR(ref, post)   bootstrap, 1000, seed 0)
         "three_way":    {"<ref>": {"all3", "ref_pre_only", "ref_post_only", "pre_post_only"}},  # mean counts
         "pre_post_detail": {"rank_displacement": {"mean", "median", "std", "n"},   # pre's top-k ranked by post
                             "jaccard":           {"mean", "median", "std", "n"}},  # mutual-kNN Jaccard
         "chance_knor": float}},   # E[KNOR] of random neighbourhoods: k/(N-1); --count_self (1+(k-1)^2/(N-1))/k
     "global": {
         "pre_post": {"cka_debiased", "cka", "procrustes_residual", "dist_pearson", "dist_spearman", "dist_n_pairs"},
         "<ref>_pre":  {same keys}, "<ref>_post": {same keys},
         "spectra": {"pre": {"energy_mean_normalized": [...]}, "post": {...}}},   # only with --svd_per_image_csv
     "settings": {"pre_pt", "post_pt", "refs": {"<ref>": path}, "pool", "metric", "protocol": "global"|"per_shard",
                  "count_self", "backend", "device", "seed", "pairs_sample", "svd_per_image_csv"}}

NaN values (e.g. a constant space) are written as ``null``. ``cka_debiased`` is the unbiased-HSIC linear
CKA, ``cka`` the biased one; ``procrustes_residual`` is the relative orthogonal-Procrustes residual (0 =
identical up to rotation, scale and shift); ``dist_*`` correlate pairwise distances (``--metric``) over all
pairs, or ``--pairs_sample`` seeded random pairs when there are more (see ``vlmc.metrics``).

``per_image.csv`` — one row per aligned image, columns in this order:
``shard, key`` (written verbatim: read with ``dtype=str`` so "000010000" stays a string), then per k
``pre_post_knor<k>``, then per ref and k ``<ref>_pre_knor<k>``, ``<ref>_post_knor<k>``; with
``--svd_per_image_csv`` also, for side in (pre, post): ``<side>_effective_rank`` (raw),
``<side>_effective_rank_norm_min_t1_d`` (divided by min(T-1, D)), ``<side>_top1_energy_ratio``, ``<side>_top5_energy_ratio``,
``<side>_top10_energy_ratio``, ``<side>_k80_energy``, ``<side>_k90_energy``, ``<side>_cos_mean``,
``<side>_cos_std``, ``<side>_cos_median`` (token spectra of the un-pooled [T, D] matrix and pairwise token
cosine concentration; definitions in ``vlmc.metrics.spectral``). Empty cell = NaN.

``spectra.json`` (with ``--svd_per_image_csv``): ``{"n": N, "pre": [...], "post": [...]}`` — the mean over
images of the normalised squared singular values (energy fractions, descending, zero-padded to the longest).
"""

from __future__ import annotations

import logging
import sys

from vlmc.extract.geometry import (
    Space,
    align,
    clean_json,
    effective_ks,
    load_space,
    neighbours,
    overlap_metrics,
    pair_global,
    parse_ks,
    parse_refs,
    shard_groups,
    token_spectra,
    with_self,
    write_per_image_csv,
)
from vlmc.metrics.knn import resolve_backend
from vlmc.store.vectors import find_shard_dirs
from vlmc.store.verify import VERIFY_HELP, set_read_level
from vlmc.utils import cli, tracking
from vlmc.utils.cli import UsageError, ensure_writable_dir, entry_point, make_parser, resolve_device
from vlmc.utils.io import atomic_write_json
from vlmc.utils.tracking import add_tracking_args, flat_numbers

log = logging.getLogger("vlmc.extract_knn")


def build_parser():
    """The stage-3 argument parser."""
    p = make_parser(__doc__)
    p.add_argument("--pre_pt", required=True, help="stage-1 store for E_pre (file, shard folder or parent of shards)")
    p.add_argument("--post_pt", required=True, help="stage-1 store for E_post (usually the same as --pre_pt)")
    p.add_argument("--ref", action="append", default=[], metavar="LABEL:PATH",
                   help="stage-2 reference store, repeatable (e.g. clip:data/clip_ref)")
    cli.add_out_dir_arg(p, required=True, help="output folder")
    p.add_argument("--k", default="10,50,100", help="comma-separated neighbourhood sizes (clipped to N-1)")
    p.add_argument("--metric", default="l2", choices=["l2", "cosine"], help="distance for kNN and distance correlations")
    p.add_argument("--pool", default="mean", choices=["mean", "first", "max", "cls"],
                   help="pooling of pre/post tokens: mean; first = the first stored token; max = per-dim max; cls = "
                        "the CLS token, refused unless the store's manifest marks its first token as one (no "
                        "stage-1 family stores a CLS token: CLS is dropped as the model does)")
    p.add_argument("--per_shard", action="store_true", help="neighbours only within each shard (seed protocol)")
    p.add_argument("--count_self", action="store_true",
                   help="count the query as its own first neighbour, as the original pipeline's faiss IndexFlatL2.search(X, k) "
                        "did (default: excluded). Per image, KNOR_self@k = (1 + (k-1)*KNOR_excl@(k-1)) / k; "
                        "k is then clipped to N (or the shard size) instead of N-1")
    p.add_argument("--pairs_sample", type=cli.positive_int, default=100_000, help="max pairs for distance correlations")
    p.add_argument("--svd_per_image_csv", action="store_true", help="per-image token spectra in per_image.csv + spectra.json")
    p.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch", "hybrid"], help="kNN backend")
    p.add_argument("--device", type=cli.device_name, default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--seed", type=int, default=0, help="seed of the distance-correlation pair sample")
    add_tracking_args(p)
    p.add_argument("--verify", action="store_true", help=VERIFY_HELP + "; always on with --svd_per_image_csv (~1 %%)")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the hash costs ~1 % next to the token spectra, ~17 % next to pooled kNN alone (bench/bench_verify.py)
    set_read_level("hash" if args.verify or args.svd_per_image_csv else "size")
    refs = parse_refs(args.ref)
    ks_req = parse_ks(args.k)
    if args.pairs_sample < 1:
        raise UsageError("--pairs_sample must be >= 1")
    for path in (args.pre_pt, args.post_pt, *refs.values()):  # fail fast on a wrong path
        find_shard_dirs(path)
    device = resolve_device(args.device)
    try:
        backend = resolve_backend(args.backend, device)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--backend {args.backend}: {e}") from None
    out_dir = ensure_writable_dir(args.out_dir)

    spaces: list[Space] = [load_space("pre", args.pre_pt, "pre", args.pool),
                           load_space("post", args.post_pt, "post", args.pool)]
    spaces += [load_space(label, path, "ref", "mean") for label, path in refs.items()]
    al = align(spaces)
    n = len(al.ids)
    if n < 2:
        raise UsageError(f"only {n} image(s) present in every space (dropped: {al.n_dropped})")
    groups = shard_groups(al.ids) if args.per_shard else None
    ks = effective_ks(ks_req, n, groups, args.count_self)
    kmax = ks[-1]
    log.info("%d aligned images, %s protocol, k=%s, metric=%s, backend=%s, device=%s%s", n,
             "per-shard" if groups else "global", ks, args.metric, backend, device,
             ", query counted (--count_self)" if args.count_self else "")

    k_search = max(kmax - 1, 1) if args.count_self else kmax
    nn = {name: neighbours(X, k_search, metric=args.metric, backend=backend, device=device, groups=groups)
          for name, X in al.X.items()}
    if args.count_self:
        nn = {name: with_self(v, kmax) for name, v in nn.items()}
    per_k, cols = overlap_metrics(nn, list(refs), ks, groups, n, args.count_self)

    pairs = {"pre_post": ("pre", "post")}
    for r in refs:
        pairs[f"{r}_pre"], pairs[f"{r}_post"] = (r, "pre"), (r, "post")
    glob = {name: pair_global(al.X[a], al.X[b], metric=args.metric, pairs_sample=args.pairs_sample, seed=args.seed)
            for name, (a, b) in pairs.items()}

    if args.svd_per_image_csv:
        spectra = {}
        for side, path in (("pre", args.pre_pt), ("post", args.post_pt)):
            stats, spectra[side] = token_spectra(path, side, al.ids, device=device)
            cols.update({f"{side}_{c}": v for c, v in stats.items()})
        glob["spectra"] = {s: {"energy_mean_normalized": v.tolist()} for s, v in spectra.items()}
        atomic_write_json(out_dir / "spectra.json",
                          clean_json({"n": n, **{s: v.tolist() for s, v in spectra.items()}}))

    n_per_shard: dict[str, int] = {}
    for shard, _ in al.ids:
        n_per_shard[shard] = n_per_shard.get(shard, 0) + 1
    summary = {
        "n": n, "n_images": n, "n_dropped": al.n_dropped, "n_per_shard": n_per_shard, "refs": list(refs),
        "ks": ks, "k_requested": ks_req, "per_k": per_k, "global": glob,
        "settings": {"pre_pt": str(args.pre_pt), "post_pt": str(args.post_pt), "refs": refs, "pool": args.pool,
                     "metric": args.metric, "protocol": "per_shard" if groups else "global",
                     "count_self": bool(args.count_self), "backend": backend,
                     "device": str(device), "seed": args.seed, "pairs_sample": args.pairs_sample,
                     "svd_per_image_csv": bool(args.svd_per_image_csv)},
    }
    json_path = out_dir / f"overlap_top{kmax}_{args.metric}.json"
    atomic_write_json(json_path, clean_json(summary))
    write_per_image_csv(out_dir / "per_image.csv", al.ids, cols)
    pk = per_k[str(kmax)]
    with tracking.start(args, out_dir, f"knn-{out_dir.name}", job_type="knn") as tracker:
        tracker.summary(**flat_numbers(clean_json({"per_k": per_k, "global": glob, "n": n})))
    log.info("KNOR@%d(pre,post) = %.4f; CKA = %s; wrote %s and per_image.csv", kmax, pk["pre_post"]["mean"],
             glob["pre_post"]["cka_debiased"], json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
