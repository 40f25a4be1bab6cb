"""Per-patch reconstruction loss on the image grid, overlaid on example images.

Reads stage 6's ``<recon_dir>/<model>/loss_maps.pt`` ({keys, shards, grids [N,2], maps [N,h,w]}: per-patch
MSE(Ê_pre, E_pre) in standardised units on the pre-connector patch grid, NaN-padded). Example images are
chosen evenly by mean loss (lowest → highest). Image files come from an ``image_path`` column of the
caption CSVs when there is one, else ``<image_dir>/<shard>/<key>.<ext>``.

Each map is stretched over the whole image (row-major patch grid, top-left first). Processors that
centre-crop (LLaVA's CLIP processor) see only the central square of a non-square image: pass
``--center_crop`` to show that square. Grids with a single row or column (tokens without a spatial
layout) are drawn as a per-token loss bar chart instead of an overlay.

Writes ``<out_dir>/recon_maps/recon_maps_<model>.png``.

Example:
    python src/plot/plot_recon_maps.py --in_dir sample --n_examples 4
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vlmc.plot.common import add_io_args, model_label, model_slug, pick_models, require_dir, save_figure
from vlmc.plot.data import add_stage_args, find_image, read_captions, read_loss_maps, stage_dir
from vlmc.utils.cli import UsageError, entry_point, make_parser

log = logging.getLogger("vlmc.plot.recon_maps")
CMAP = "magma"
CBAR_LABEL = "per-patch MSE(Ê_pre, E_pre)\n(standardised units)"


def pick_examples(maps: np.ndarray, n: int) -> list[int]:
    """Indices of ``n`` maps evenly spaced in mean loss (NaN padding ignored), lowest first."""
    means = np.array([np.nanmean(m) if np.isfinite(m).any() else np.nan for m in maps])
    order = [i for i in np.argsort(means) if np.isfinite(means[i])]
    if not order:
        return []
    pos = np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))
    return [int(order[p]) for p in pos]


def load_image(path: Path | None, center_crop: bool):
    if path is None:
        return None
    try:
        im = Image.open(path).convert("RGB")
    except OSError as e:
        log.warning("%s: cannot read image (%s)", path, e)
        return None
    if center_crop:
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s))
    return np.asarray(im)


def image_hints(args) -> dict[tuple[str, str, str], str]:
    """(model, shard, key) → image_path from the caption CSVs, when they exist."""
    cap_dir = stage_dir(args, "captions")
    if not cap_dir.is_dir():
        return {}
    try:
        caps = read_captions(cap_dir)
    except UsageError as e:
        log.warning("image paths from caption CSVs unavailable: %s", e)
        return {}
    if "image_path" not in caps.columns:
        return {}
    return {(m, s, k): p for m, s, k, p in caps[["model", "shard", "key", "image_path"]].itertuples(index=False)}


def plot_model(model: str, lm: dict, hints: dict, args) -> None:
    import matplotlib.pyplot as plt

    idx = pick_examples(lm["maps"], args.n_examples)
    if not idx:
        log.warning("%s: loss maps are all NaN; skipped", model)
        return
    crops = [lm["maps"][i][: lm["grids"][i][0], : lm["grids"][i][1]] for i in idx]
    vmin, vmax = np.nanmin([np.nanmin(c) for c in crops]), np.nanmax([np.nanmax(c) for c in crops])
    imgs = [load_image(find_image(args.image_dir_path, lm["shards"][i], lm["keys"][i],
                                  hints.get((model, lm["shards"][i], lm["keys"][i]), "")), args.center_crop) for i in idx]
    missing = [f"{lm['shards'][i]}/{lm['keys'][i]}" for i, img in zip(idx, imgs, strict=True) if img is None]
    rows = 2 if len(missing) < len(idx) else 1  # no image at all: the maps alone
    fig, axes = plt.subplots(rows, len(idx), figsize=(2.8 * len(idx) + 0.8, 2.9 * rows + 0.4), squeeze=False,
                             layout="constrained")
    im_artist = None
    for j, (i, loss, img) in enumerate(zip(idx, crops, imgs, strict=True)):
        name = f"{lm['shards'][i]}/{lm['keys'][i]}\nmean loss {np.nanmean(loss):.3g}"
        top, bottom = axes[0, j], axes[-1, j]
        if rows == 2:
            if img is not None:
                top.imshow(img)
                top.set_title(name, fontsize=7.5)
                top.axis("off")
            else:  # shown in the map's title instead of a blank panel
                top.set_visible(False)
        if loss.shape[0] > 1 and loss.shape[1] > 1:
            if img is not None:
                bottom.imshow(img)
                extent = (-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5)  # the image's own pixel extent
            else:
                extent = None
            im_artist = bottom.imshow(loss, cmap=CMAP, vmin=vmin, vmax=vmax, alpha=0.6 if img is not None else 1.0,
                                      extent=extent, interpolation="nearest")
            bottom.axis("off")
        else:  # non-spatial tokens: a strip
            flat = loss.ravel()
            bottom.bar(np.arange(flat.size), flat, color="#7a0177")
            bottom.set(xlabel="token index (no spatial grid)", ylabel="MSE (std. units)", ylim=(0, vmax * 1.05))
        spatial = loss.shape[0] > 1 and loss.shape[1] > 1
        grid = f"loss on the {loss.shape[0]}×{loss.shape[1]} patch grid" if spatial else "loss per token"
        bottom.set_title(grid if (rows == 2 and img is not None) else f"{name}\n{grid}", fontsize=7.5)
    if missing:
        log.warning("%s: %d of %d example images not found (%s): neither <image_dir>/<shard>/<key>.* (image_dir: %s) "
                    "nor an image_path in the caption CSVs", model, len(missing), len(idx), ", ".join(missing),
                    args.image_dir_path or "none")
    if im_artist is not None:
        fig.colorbar(im_artist, ax=axes[-1, :].tolist(), shrink=0.8, label=CBAR_LABEL)
    fig.suptitle(f"{model_label(model)}: per-patch reconstruction loss of E_pre (held-out examples, low → high loss)")
    save_figure(fig, f"{args.out_dir}/recon_maps", f"recon_maps_{model_slug(model)}", args.pdf, args.dpi)


def build_parser():
    p = make_parser(__doc__)
    add_io_args(p)
    add_stage_args(p, "recon", "captions", "images")
    p.add_argument("--n_examples", type=int, default=4, help="example images per model")
    p.add_argument("--center_crop", action="store_true", help="show the central square of each image")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_examples < 1:
        raise UsageError("--n_examples must be >= 1")
    recon_dir = require_dir(stage_dir(args, "recon"), "recon folder")
    files = {p.parent.name: p for p in sorted(recon_dir.glob("*/loss_maps.pt"))}
    if not files:
        raise UsageError(f"{recon_dir}: no <model>/loss_maps.pt")
    image_dir = stage_dir(args, "images")
    args.image_dir_path = image_dir if image_dir.is_dir() else None  # a missing image is reported per figure
    hints = image_hints(args)
    for m in pick_models(files, args.models):
        plot_model(m, read_loss_maps(files[m]), hints, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
