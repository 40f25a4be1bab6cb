"""docs/formats.md's column index against what the stages write: every documented column or JSON key is
written, every written one is documented (a real extract_knn run on a small store; sample/ for the rest)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from test_extract_knn import orthogonal_store

from vlmc.extract.extract_knn import main as extract_knn

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample"
FORMATS = REPO / "docs" / "formats.md"
PLACEHOLDERS = {"<k>": r"\d+", "<ref>": r"[A-Za-z0-9][A-Za-z0-9_.-]*?", "<side>": "(?:pre|post)",
                "<c>": r"[a-z0-9_]+?"}


def column_index() -> dict[str, tuple[str, list[str]]]:
    """The rows of formats.md's "Column index": file -> (checked against, documented names)."""
    text = FORMATS.read_text().split("## Column index", 1)[1]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1] in ("run", "sample"):
            rows[cells[0].replace("`", "")] = (cells[1], re.findall(r"`([^`]+)`", cells[2]))
    return rows


def pattern(name: str) -> re.Pattern:
    """A documented name (placeholders, trailing ``?`` = optional) as a regex over real names."""
    rx = re.escape(name.rstrip("?"))
    for ph, sub in PLACEHOLDERS.items():
        rx = rx.replace(re.escape(ph), sub)
    return re.compile(rx + r"\Z")


def compare(documented: list[str], written: set[str], where: str) -> None:
    """Both directions: documented-but-absent (non-optional) and written-but-undocumented names."""
    pats = {d: pattern(d) for d in documented}
    absent = [d for d, p in pats.items() if not d.endswith("?") and not any(p.match(w) for w in written)]
    undocumented = sorted(w for w in written if not any(p.match(w) for p in pats.values()))
    assert not absent, f"{where}: documented in formats.md but not written: {absent}"
    assert not undocumented, f"{where}: written but not in formats.md: {undocumented}"


def header(path: Path) -> set[str]:
    with open(path, newline="") as f:
        return set(next(csv.reader(f)))


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory) -> Path:
    """extract_knn with a reference and per-image spectra on a small synthetic store."""
    tmp = tmp_path_factory.mktemp("knn")
    vec, ref = orthogonal_store(tmp)
    out = tmp / "knn_out" / "synth"
    assert extract_knn(["--pre_pt", str(vec), "--post_pt", str(vec), "--ref", f"clip:{ref}", "--out_dir", str(out), "--k", "5,10",
                        "--svd_per_image_csv", "--backend", "torch", "--device", "cpu"]) == 0
    return out


def written(file: str, knn_dir: Path) -> list[tuple[Path, set[str]]]:
    """(path, names) of each real file the index row ``file`` (``<path>[ <json key>]``) describes."""
    path, _, sub = file.partition(" ")
    if path.startswith("knn_out/"):
        paths = sorted(knn_dir.glob(path.split("/")[-1].replace("<K>", "*").replace("<metric>", "*")))
    else:
        paths = sorted(SAMPLE.glob(re.sub(r"<[a-z]+>", "*", path)))
    assert paths, f"no file for {file}"
    out = []
    for p in paths:
        if p.suffix == ".csv":
            out.append((p, header(p)))
        else:
            data = json.loads(p.read_text())
            out.append((p, set(data[sub] if sub else data)))
    return out


def test_the_index_lists_every_stage_output():
    rows = column_index()
    assert len(rows) >= 7
    for expected in ("per_image.csv", "per_sample.csv", "captions_<model>.csv", "perturb_<model>_<mode>_<level>.csv"):
        assert any(expected in f for f in rows), expected


@pytest.mark.parametrize("file", list(column_index()))
def test_documented_columns_match_the_written_ones(file, knn_run):
    _, documented = column_index()[file]
    files = written(file, knn_run)
    for path, names in files:
        compare(documented, names, f"{file} ({path.name})")


@pytest.mark.parametrize("file", list(column_index()))
def test_optional_names_are_ones_the_code_writes(file):
    """A ``?`` name is absent from the checked output; its fixed part must still occur in src/."""
    sources = "\n".join(p.read_text() for p in (REPO / "src").rglob("*.py"))
    for name in column_index()[file][1]:
        if name.endswith("?"):
            fixed = re.split(r"<[a-z]+>", name.rstrip("?"))[0].rstrip("_")  # f"..._{x}" in the code
            assert fixed in sources, f"{file}: {name} is documented but nothing in src/ writes {fixed!r}"


def test_the_perturbation_scores_are_the_ones_score_perturb_writes():
    """The drift that prompted this test: ``bertscore_f1_gt_*`` documented, ``_original_gt`` written."""
    text = FORMATS.read_text()
    assert "bertscore_f1_gt_" not in text
    assert "bertscore_f1_original_gt" in text.split("## Column index")[0]
