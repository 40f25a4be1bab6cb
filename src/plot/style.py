"""The one look of every figure: fonts, family colours, group markers and column labels.

Fonts and sizes, a colour per model family, markers per image group, and human labels for every column a
figure shows.

* :data:`RC` (applied on import): font family and sizes, grid, constrained layout.
* Models: :func:`model_color` (the family adapter's ``color``, else a stable pick from a spare palette),
  :func:`model_label` (the adapter's ``label``: ``qwen2.5vl`` → ``Qwen2.5-VL``), :func:`sort_models` (the
  adapters' ``display_rank``). The facts live on the adapters (``vlmc.models``), read on first use.
* Image groups: :data:`GROUP_MARKERS` / :data:`GROUP_LABELS` for ``scenes`` (the synthetic testbed scenes)
  and ``photos`` (everything else), so figures that pool both say which point is which.
* Columns: :func:`label` (short, for panel titles: ``clipscore_drop`` → "CLIPScore drop") and
  :func:`axis_label` (with its definition and scale, for axes). Unknown columns get a readable fallback.
* :func:`wrap`: break a long label over lines so it never runs past its panel.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from collections.abc import Iterable
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, same output everywhere

import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from vlmc.models.base import FamilyAdapter

RC = {"font.family": "DejaVu Sans", "font.size": 9, "figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3,
      "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 7.5,
      "legend.framealpha": 0.85, "figure.titlesize": 11, "savefig.facecolor": "white"}
plt.rcParams.update(RC)

_SPARE_COLORS = ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#843c39")
PRE_POST_COLORS = {"pre": "#4c72b0", "post": "#dd8452"}
CHANCE_STYLE = {"color": "#333333", "ls": (0, (1, 2)), "lw": 1.1, "zorder": 4}  # every chance / reference level

GROUP_ORDER = ("scenes", "photos")
GROUP_MARKERS = {"scenes": "o", "photos": "^"}
GROUP_LABELS = {"scenes": "synthetic scenes", "photos": "photos"}

# short names (panel titles, legends) and axis labels (with definition / scale) of every column a figure shows
COLUMN_LABELS = {
    "clipscore_drop": "CLIPScore drop",
    "bertscore_drop": "BERTScore drop",
    "bertscore_drop_gt": "BERTScore drop (vs reference caption)",
    "attr_acc_drop": "Attribute-accuracy drop",
    "clipscore_perturbed": "CLIPScore",
    "clipscore_original": "CLIPScore, unperturbed",
    "clipscore_post_direct": "CLIPScore",
    "bertscore_f1": "BERTScore F1 vs unperturbed caption",
    "attr_acc_perturbed": "Attribute accuracy",
    "bertscore_f1_recon_vs_post_direct": "BERTScore F1, recon vs own caption",
    "reproj_cosine": "Re-projection cosine",
    "reproj_mse": "Re-projection MSE",
    "cosine_pre": "Reconstruction cosine",
    "mse_pre": "Reconstruction MSE",
    "effective_rank": "Effective rank",
    "effective_rank_normalized": "Normalised effective rank",
    "top1_energy_ratio": "Top-1 energy",
}
AXIS_LABELS = {
    "clipscore_drop": "CLIPScore drop (0–2.5 scale)",
    "bertscore_drop": "BERTScore-F1 drop vs reference",
    "bertscore_drop_gt": "BERTScore-F1 drop vs reference",
    "attr_acc_drop": "attribute-accuracy drop (scenes)",
    "clipscore_perturbed": "CLIPScore (0–2.5)",
    "clipscore_post_direct": "CLIPScore of own caption (0–2.5)",
    "bertscore_f1": "BERTScore F1",
    "attr_acc_perturbed": "attribute accuracy (scenes)",
    "bertscore_f1_recon_vs_post_direct": "BERTScore F1",
    "reproj_cosine": "cos(connector(Ê_pre), E_post)",
    "reproj_mse": "MSE(connector(Ê_pre), E_post)",
    "cosine_pre": "cos(Ê_pre, E_pre)",
    "mse_pre": "MSE(Ê_pre, E_pre), standardised",
}
_WORDS = {"clipscore": "CLIPScore", "bertscore": "BERTScore", "knor": "KNOR", "attr": "attribute", "acc": "accuracy",
          "mse": "MSE", "cka": "CKA", "f1": "F1", "gt": "(vs reference)", "pre": "E_pre", "post": "E_post",
          "reproj": "re-projection", "erank": "effective rank", "normalized": "normalised"}


def _adapter(model: str) -> FamilyAdapter | None:
    """The registered family adapter named ``model`` (``None``: not a family, e.g. a reference model)."""
    from vlmc.models.base import families, get_adapter  # heavy (transformers): only when a figure needs it

    return get_adapter(model) if model in families() else None


def model_color(model: str) -> str:
    """The model's colour: its family's ``color``, else a stable pick from a spare palette."""
    adapter = _adapter(model)
    if adapter is not None and adapter.color:
        return adapter.color
    h = int(hashlib.sha256(model.encode()).hexdigest(), 16)
    return _SPARE_COLORS[h % len(_SPARE_COLORS)]


def model_label(model: str) -> str:
    """Display name: its family's label (``qwen2.5vl`` → ``Qwen2.5-VL``); other names are shown as they are."""
    adapter = _adapter(model)
    return model if adapter is None else adapter.display_label


def sort_models(models: Iterable[str]) -> list[str]:
    """Families with a ``display_rank`` in that order, then the rest alphabetically."""
    from vlmc.models.base import display_order

    return display_order(models)


def label(column: str) -> str:
    """Short human name of a column (``clipscore_drop`` → "CLIPScore drop"); a readable fallback otherwise."""
    if column in COLUMN_LABELS:
        return COLUMN_LABELS[column]
    words = [_WORDS.get(w, w) for w in re.split(r"[_\s]+", column) if w]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def axis_label(column: str, width: int = 38) -> str:
    """Axis label of a column (definition and scale), wrapped to ``width`` characters per line."""
    return wrap(AXIS_LABELS.get(column, label(column)), width)


def wrap(text: str, width: int = 38) -> str:
    """``text`` broken at spaces into lines of at most ``width`` characters (existing breaks kept)."""
    return "\n".join(textwrap.fill(line, width, break_long_words=False) for line in text.split("\n"))
