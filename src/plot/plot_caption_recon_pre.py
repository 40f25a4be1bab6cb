"""Caption drops vs reconstruction quality in the E_pre space: does a worse Ê_pre predict a worse caption?

x: ``cosine_pre`` / ``mse_pre`` (stage 6, eval_recon: the reconstructor's Ê_pre vs the true E_pre,
held-out images); y: ``clipscore_drop``, ``bertscore_drop``, ``bertscore_f1_recon_vs_post_direct``
(stage 7, score_captions; drop = post_direct − recon, positive = worse). One panel per model: scatter,
least-squares line, Pearson r and Spearman ρ with p-values.

Writes ``<out_dir>/caption_recon_pre/scatter_<x>_vs_<y>.png`` (y = the drops; every y with ``--all_pairs``),
``drops_by_model.png``,
``recon_quality_by_model.png`` and ``<results_dir>/caption_recon_pre_correlations.csv`` / ``.tex``
(model, x, y, n, pearson_r, pearson_p, spearman_rho, spearman_p, slope, intercept).

Example:
    python src/plot/plot_caption_recon_pre.py --in_dir sample
"""

from __future__ import annotations

import sys

from vlmc.plot.caption_recon import build_parser, run
from vlmc.utils.cli import entry_point


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    return run(args, "pre", "caption_recon_pre", "caption_recon_pre_correlations")


if __name__ == "__main__":
    sys.exit(main())
