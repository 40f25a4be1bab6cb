"""One grammar for "which weights", shared by every stage (VLMs, stage-2 references, CLIPScore, BERTScore).

A *source* is one of

* an **HF id** ``org/name`` (optionally ``org/name@REVISION``): resolved through the normal Hugging Face
  cache (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` never touches the network) with
  ``huggingface_hub.snapshot_download``; ``--revision`` (or ``@REVISION``) pins a branch, tag or commit,
  and the resolved **commit hash** is what manifests and score sidecars record;
* a **local folder** (an existing path; it must hold weights);
* ``open_clip:<name>:<pretrained>`` (an open_clip architecture and a pretrained tag or checkpoint file;
  ``open_clip:hf-hub:org/repo`` and ``open_clip:local-dir:/path`` carry their own weights);
* ``config:<name>`` (VLMs only: published dimensions, random weights, no download);
* a **short name** the stage knows: ``tiny`` (seeded random weights, built offline), ``testbed`` (the
  models trained on synthetic scenes), and per stage a few more (``tiny-dino``, ``minilm``, bert-score
  model types such as ``roberta-large``).

An unknown short name (no ``/``, not an existing path) is refused at once, with the known names and the
closest match, before any network access. Every refusal is one :class:`~vlmc.utils.cli.UsageError` line
that names the source: ``<flag> '<source>': <what is wrong>``.

This module imports nothing from ``eval/`` or ``train/``; stages add their own short names.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlmc.utils.cli import UsageError

CONFIG_PREFIX = "config:"
OPEN_CLIP_PREFIX = "open_clip:"
OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
SHA = re.compile(r"^[0-9a-f]{40}$")
# Files fetched from a hub repository: configs, processors, tokenizers and one weight format.
HUB_META = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.spm"]
WEIGHT_FORMATS = (["*.safetensors"], ["*.bin"])
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

Kind = Literal["hub", "local", "named", "config", "open_clip"]

GRAMMAR = (
    "an HF id org/name[@REVISION] (through the Hugging Face cache: HF_HOME, HF_HUB_OFFLINE=1 for no network), "
    "a local folder, {extra}"
)


def source_help(names: Sequence[str], open_clip: bool = False, config: bool = False, default: str = "") -> str:
    """The ``--help`` text of a weights flag: the grammar plus this stage's short names (one place for all)."""
    extra = []
    if open_clip:
        extra.append("open_clip:<name>:<pretrained tag or checkpoint file>")
    if config:
        extra.append("config:<name> (published dimensions, random weights, no download)")
    extra.append("or a name: " + ", ".join(names))
    text = GRAMMAR.format(extra=", ".join(extra))
    return f"{text}. {default}".strip() if default else text


@dataclass(frozen=True)
class Named:
    """A stage's short name: ``resolve()`` gives its local folder (built or found on first use).

    Attributes:
        resolve: returns the local folder (or, for ``bare hub`` names, ``None``: resolve as an HF id).
        random_weights: the weights are seeded random (``tiny``): recorded, and scored only on request.
    """

    resolve: Callable[[], str | None]
    random_weights: bool = False


@dataclass(frozen=True)
class Source:
    """A resolved source.

    Attributes:
        spec: what the user gave (``llava-hf/llava-1.5-7b-hf``, ``tiny``, a folder, ...).
        kind: ``hub``, ``local``, ``named``, ``config`` or ``open_clip``.
        path: the local folder (or checkpoint file) to load from; ``None`` for ``config`` and open_clip tags.
        repo_id: the HF id (``hub`` only).
        commit: the resolved commit hash (``hub`` only).
        name: the config name, open_clip architecture or short name.
        pretrained: open_clip's pretrained tag or checkpoint file.
        random_weights: seeded random weights (``tiny``, ``config:``).
    """

    spec: str
    kind: Kind
    path: str | None = None
    repo_id: str | None = None
    commit: str | None = None
    name: str | None = None
    pretrained: str | None = None
    random_weights: bool = False

    @property
    def canonical(self) -> str:
        """A string that resolves to exactly these weights again: ``org/name@commit`` for hub sources."""
        if self.kind == "hub":
            return f"{self.repo_id}@{self.commit}"
        if self.kind in ("local", "named"):
            return str(self.path)
        return self.spec

    def record(self) -> dict[str, Any]:
        """What a manifest or sidecar records about these weights."""
        return {
            "source": self.repo_id if self.kind == "hub" else (self.spec if self.kind != "local" else self.path),
            "source_kind": self.kind,
            "revision": self.commit,
            "path": self.path,
            "random_weights": self.random_weights,
        }


def _fail(flag: str, spec: str, what: str) -> UsageError:
    return UsageError(f"{flag} {spec!r}: {what}")


def split_revision(spec: str) -> tuple[str, str | None]:
    """``org/name@rev`` → ``("org/name", "rev")``; anything else → ``(spec, None)``."""
    if "@" in spec and not spec.startswith((OPEN_CLIP_PREFIX, CONFIG_PREFIX)):
        base, rev = spec.rsplit("@", 1)
        if HUB_ID.match(base) and rev:
            return base, rev
    return spec, None


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a weight file (safetensors, bin, pt, ...), directly."""
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", os.sep, "~")) or spec.endswith(os.sep) or spec.count("/") > 1


def resolve(
    spec: str,
    flag: str,
    named: Mapping[str, Named],
    *,
    revision: str | None = None,
    open_clip: bool = False,
    config: bool = False,
    placeholders: Sequence[str] = (),
) -> Source:
    """Resolve ``spec`` under the shared grammar (see the module docstring).

    Args:
        spec: the user's source string.
        flag: the CLI flag it came from (named in every error).
        named: this stage's short names.
        revision: ``--revision`` for an HF id (a branch, tag or commit).
        open_clip: accept ``open_clip:...``.
        config: accept ``config:<name>`` (the caller checks the name).
        placeholders: extra forms listed among the known names in errors (e.g. ``config:<name>``).

    Raises:
        UsageError: one line naming the source.
    """
    spec = (spec or "").strip()
    if not spec:
        raise UsageError(f"{flag} is empty")
    if spec not in named and not spec.startswith((CONFIG_PREFIX, OPEN_CLIP_PREFIX)) and Path(spec).expanduser().exists():
        if revision:
            raise _fail(flag, spec, "a revision applies to HF ids (org/name) only, not to a local folder")
        return local_source(spec, Path(spec).expanduser(), flag)
    base, at_rev = split_revision(spec)
    if at_rev and revision and at_rev != revision:
        raise _fail(flag, spec, f"pins revision {at_rev} but --revision is {revision}")
    revision = revision or at_rev
    if revision and not HUB_ID.match(base):
        raise _fail(flag, spec, "a revision applies to HF ids (org/name) only")
    if base in named:
        entry = named[base]
        path = entry.resolve()
        if path is None:  # a bare hub name (e.g. bert-score's roberta-large)
            return hub_source(base, revision, flag, spec=spec)
        return Source(spec, "named", path=str(path), name=base, random_weights=entry.random_weights)
    if base.startswith(CONFIG_PREFIX):
        if not config:
            raise _fail(flag, spec, "config:<name> (random weights at published dimensions) is for VLMs only")
        return Source(spec, "config", name=base[len(CONFIG_PREFIX) :], random_weights=True)
    if base.startswith(OPEN_CLIP_PREFIX):
        if not open_clip:
            raise _fail(flag, spec, "open_clip models are not accepted here")
        return open_clip_source(spec, flag)
    if _looks_like_path(base):
        raise _fail(flag, spec, "local folder does not exist")
    if "/" not in base:
        known = [*named, *placeholders]
        close = difflib.get_close_matches(base, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise _fail(
            flag, spec,
            f"unknown name ({hint}known names: {', '.join(known)}; or an HF id org/name, or a local folder)",
        )  # fmt: skip
    if not HUB_ID.match(base):
        raise _fail(flag, spec, "neither an HF id (org/name) nor an existing local folder")
    return hub_source(base, revision, flag, spec=spec)


def local_source(spec: str, path: Path, flag: str) -> Source:
    """An existing folder that must hold weights (a file is accepted as a checkpoint)."""
    if path.is_dir() and not has_weights(path):
        raise _fail(flag, spec, f"local folder {path} has no weights (no *.safetensors / *.bin file)")
    return Source(spec, "local", path=str(path.resolve()))


def open_clip_source(spec: str, flag: str) -> Source:
    """``open_clip:<name>:<pretrained>``; the schemas ``hf-hub:`` / ``local-dir:`` carry their weights."""
    rest = spec[len(OPEN_CLIP_PREFIX) :]
    if rest.startswith(OPEN_CLIP_SCHEMAS):
        return Source(spec, "open_clip", name=rest)
    name, _, pretrained = rest.partition(":")
    if not name:
        raise _fail(flag, spec, "empty open_clip model name (open_clip:<name>:<pretrained>, e.g. open_clip:ViT-B-32:openai)")
    if not pretrained:
        raise _fail(
            flag, spec,
            f"open_clip model {name!r} needs a pretrained tag or checkpoint file: open_clip:{name}:<pretrained> "
            "(see open_clip.list_pretrained_tags_by_model); random weights are never used",
        )  # fmt: skip
    if os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        ckpt = Path(pretrained).expanduser()
        if not ckpt.is_file():
            raise _fail(flag, spec, f"open_clip checkpoint {pretrained} does not exist")
        return Source(spec, "open_clip", path=str(ckpt.resolve()), name=name, pretrained=str(ckpt.resolve()))
    return Source(spec, "open_clip", name=name, pretrained=pretrained)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(e: Exception, repo_id: str, revision: str | None) -> str:
    """One line for a huggingface_hub failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision}" if revision else ""
    if isinstance(e, GatedRepoError):
        return f"gated repository: accept its terms on huggingface.co/{repo_id} and log in (hf auth login or HF_TOKEN)"
    if isinstance(e, RepositoryNotFoundError):
        return "no such repository on the Hugging Face Hub (or it is private: log in with hf auth login)"
    if isinstance(e, RevisionNotFoundError):
        return f"no revision {revision!r} in this repository"
    if isinstance(e, LocalEntryNotFoundError):
        if _offline():
            return (
                f"no such local folder, and not in the Hugging Face cache {constants.HF_HUB_CACHE}{at} with "
                f"HF_HUB_OFFLINE=1 (download it where there is network: hf download {repo_id})"
            )
        return f"cannot reach the Hugging Face Hub and not in the cache {constants.HF_HUB_CACHE}{at}"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"Hugging Face Hub error: {type(e).__name__}: {first}"


def hub_snapshot(repo_id: str, revision: str | None, flag: str, spec: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision``: from the cache, downloaded when online.

    Only configs, tokenizers/processors and one weight format (safetensors, else bin) are fetched.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    spec = spec or repo_id
    folder = None
    for weights in WEIGHT_FORMATS:
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_META + weights))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
            raise _fail(flag, spec, _hub_error(e, repo_id, revision)) from None
        if has_weights(folder):
            return folder
        if _offline():
            break
    raise _fail(flag, spec, f"the Hugging Face cache holds {folder} without weight files (*.safetensors / *.bin)")


def hub_source(repo_id: str, revision: str | None, flag: str, spec: str | None = None) -> Source:
    """An HF id resolved to its snapshot folder and commit hash."""
    folder = hub_snapshot(repo_id, revision, flag, spec)
    commit = folder.name if SHA.match(folder.name) else None
    return Source(spec or repo_id, "hub", path=str(folder), repo_id=repo_id, commit=commit)


def pinned(source: str | None, revision: str | None) -> str | None:
    """``org/name`` + a recorded commit → ``org/name@commit`` (later stages load what stage 1 loaded)."""
    if source and revision and HUB_ID.match(source):
        return f"{source}@{revision}"
    return source
