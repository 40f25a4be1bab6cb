"""Caption drops vs re-projection quality: does a worse connector(Ê_pre) ≈ E_post predict a worse caption?

x: ``reproj_cosine`` / ``reproj_mse`` (stage 6, eval_recon: the reconstructed E_pre sent back through the
connector, compared with the stored E_post); y: ``clipscore_drop``, ``bertscore_drop``,
``bertscore_f1_recon_vs_post_direct`` (stage 7, score_captions; drop = post_direct − recon, positive =
worse). One panel per model: scatter, least-squares line, Pearson r and Spearman ρ with p-values.

Writes ``<out_dir>/caption_recon/scatter_<x>_vs_<y>.png`` (y = the drops; every y with ``--all_pairs``),
``drops_by_model.png``,
``recon_quality_by_model.png`` and ``<results_dir>/caption_recon_correlations.csv`` / ``.tex``
(model, x, y, n, pearson_r, pearson_p, spearman_rho, spearman_p, slope, intercept).

Example:
    python src/plot/plot_caption_recon.py --in_dir sample
"""

from __future__ import annotations

import sys

from vlmc.plot.caption_recon import build_parser, run
from vlmc.utils.cli import entry_point


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    return run(args, "reproj", "caption_recon", "caption_recon_correlations")


if __name__ == "__main__":
    sys.exit(main())
