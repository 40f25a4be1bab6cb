"""Fault injection against stages 1, 3, 4 and 6 (issue #17): every fault is either recovered bit-identically
or refused with one line naming the file; never exit 0 with a different result.

One real tiny-LLaVA stage-1 store (3 chunks) is built once; each test works on a copy of it.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlmc.data.scenes import write_scenes
from vlmc.eval import eval_recon
from vlmc.extract import extract_knn, extract_vectors
from vlmc.train import loop, train_recon
from vlmc.utils import io as vio
from vlmc.utils.io import read_json, sha256_file

try:  # tests/ on sys.path (pytest's default rootdir-less import) or the repo root (python -m pytest)
    from synthetic_store import synthetic_connector, write_synthetic_store
except ImportError:
    from tests.synthetic_store import synthetic_connector, write_synthetic_store

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SHARD = Path("llava") / "00000"
STAGE1 = ["--models", "llava", "--model-path", "tiny", "--batch_size", "2", "--save_every", "4", "--num_workers", "0"]


class Evil:
    """Outside torch's allow-list: a safe load must refuse it (it never runs)."""


# -- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faultimg")
    write_scenes(root / "00000", n=10, seed=4, size=48)
    return root


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """An uninterrupted stage-1 run: 10 images in chunks of 4, 4, 2."""
    out = tmp_path_factory.mktemp("faultref")
    assert extract_vectors.main(["--root", str(images), "--out_dir", str(out), *STAGE1]) == 0
    assert len(read_json(out / SHARD / "manifest.json")["chunks"]) == 3
    return out


def store_copy(reference: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "vec"
    shutil.copytree(reference, dst)
    return dst


def tree(d: Path) -> dict[str, bytes]:
    """Every chunk file and manifest, byte for byte (the lock file is not part of the store)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".vlmc.lock"}


def chunk(vec: Path, kind: str, index: int) -> Path:
    return vec / SHARD / f"{kind}_vectors_{index:05d}.pt"


def tamper(vec: Path, kind: str, index: int, edit, consistent: bool = True) -> Path:
    """Rewrite a chunk through ``edit(dict)``; ``consistent``: also record its new size and sha256 in the manifest
    (a tamper only the content checks can see)."""
    path = chunk(vec, kind, index)
    data = torch.load(path, weights_only=True)
    edit(data)
    torch.save(data, path)
    if consistent:
        m = read_json(vec / SHARD / "manifest.json")
        m["chunks"][index]["files"][kind].update(bytes=path.stat().st_size, sha256=sha256_file(path))
        (vec / SHARD / "manifest.json").write_text(json.dumps(m))
    return path


def edit_manifest(vec: Path, edit) -> Path:
    path = vec / SHARD / "manifest.json"
    m = read_json(path)
    edit(m)
    path.write_text(json.dumps(m))
    return path


def one_error_line(capsys, *names: str) -> str:
    """The single ``error:`` line of stderr; it must name each of ``names`` and hold no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "Traceback" not in err and "weights_only" not in err, err[-3000:]
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def flip_bytes(path: Path, n: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + n] = bytes(b ^ 0xFF for b in raw[mid : mid + n])
    path.write_bytes(bytes(raw))


RAW_FAULTS = {
    "bitflip": lambda p: flip_bytes(p),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zero_byte": lambda p: p.write_bytes(b""),
    "deleted": lambda p: p.unlink(),
}


# -- stage 1: resume redoes whatever is not verifiably committed ---------------------------------------


@pytest.mark.parametrize("fault", [*RAW_FAULTS, "reversed_keys", "malicious", "sign_flip"])
def test_stage1_resume_redoes_a_bad_chunk_bit_identically(fault, images, reference, tmp_path):
    vec = store_copy(reference, tmp_path)
    if fault in RAW_FAULTS:
        RAW_FAULTS[fault](chunk(vec, "post", 1))
    elif fault == "reversed_keys":
        tamper(vec, "post", 1, lambda d: d["keys"].reverse())
    elif fault == "malicious":
        tamper(vec, "pre", 1, lambda d: d.update(obj=Evil()))
    else:  # 2000 sign-flipped values, manifest untouched
        tamper(vec, "pre", 1, lambda d: d["vecs"].view(-1)[:2000].neg_(), consistent=False)
    leftover = vec / SHARD / ".pre_vectors_00002.pt.k1ll3d.tmp"  # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"x" * 1000)
    assert extract_vectors.main(["--root", str(images), "--out_dir", str(vec), *STAGE1, "--skip_existing"]) == 0
    assert tree(vec) == tree(reference)  # the bad chunk was redone, the temp file removed, nothing else differs


def test_stage1_resume_with_other_settings_names_them(images, reference, tmp_path, capsys):
    vec = store_copy(reference, tmp_path)
    args = ["--root", str(images), "--out_dir", str(vec), *STAGE1, "--skip_existing", "--store_dtype", "fp32",
            "--save_every", "3"]
    assert extract_vectors.main(args) == 2
    one_error_line(capsys, str(vec / SHARD), "store_dtype='fp16' (this run 'fp32')", "save_every=4 (this run 3)")
    assert tree(vec) == tree(reference)


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from vlmc.store.lock import FolderLock\n"
            "with FolderLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_stage1_second_writer_refused_then_stale_lock_taken_over(images, reference, tmp_path, capsys):
    vec = store_copy(reference, tmp_path)
    holder = _hold_lock(vec / SHARD)
    try:
        args = ["--root", str(images), "--out_dir", str(vec), *STAGE1, "--store_dtype", "fp32", "--save_every", "3"]
        assert extract_vectors.main(args) == 2
        one_error_line(capsys, str(vec / SHARD), f"pid {holder.pid}", "another run is writing here")
        assert tree(vec) == tree(reference)  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    (vec / SHARD / ".manifest.json.dead.tmp").write_text("{")  # the killed holder's leftover
    assert extract_vectors.main(["--root", str(images), "--out_dir", str(vec), *STAGE1, "--skip_existing"]) == 0
    assert tree(vec) == tree(reference)
    assert f"pid {os.getpid()}" in (vec / SHARD / ".vlmc.lock").read_text()


def test_stage1_full_disk_one_line_then_resume_is_identical(images, reference, tmp_path, capsys, monkeypatch):
    """A fake ENOSPC at the second file commit (no tmpfs can be mounted in an unprivileged test)."""
    vec = tmp_path / "vec"
    real_fsync, calls = os.fsync, []

    def full(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(vio.os, "fsync", full)
    assert extract_vectors.main(["--root", str(images), "--out_dir", str(vec), *STAGE1]) == 2
    line = one_error_line(capsys, str(vec / SHARD), "No space left on device")
    assert "rerun to resume" in line
    monkeypatch.setattr(vio.os, "fsync", real_fsync)
    assert not list((vec / SHARD).glob(".*.tmp"))
    assert extract_vectors.main(["--root", str(images), "--out_dir", str(vec), *STAGE1, "--skip_existing"]) == 0
    assert tree(vec) == tree(reference)


def test_stage1_unreadable_entries_are_recorded_as_skipped(images, tmp_path):
    root = tmp_path / "img"
    shutil.copytree(images, root)
    s = root / "00000"
    (s / "zz_dangling.png").symlink_to(s / "nowhere.png")
    (s / "zz_loop.png").symlink_to(s / "zz_loop.png")
    os.mkfifo(s / "zz_fifo.png")
    assert extract_vectors.main(["--root", str(root), "--out_dir", str(tmp_path / "vec"), *STAGE1]) == 0
    m = read_json(tmp_path / "vec" / SHARD / "manifest.json")
    reasons = {r["key"]: r["reason"] for c in m["chunks"] for r in c["skipped"]}
    assert reasons == {"zz_dangling": "missing: dangling symbolic link", "zz_loop": "unreadable: symbolic link loop",
                       "zz_fifo": "unreadable: not a regular file (FIFO)"}
    assert m["n_skipped"] == 3 and m["n_images"] == 10


def test_stage1_signal_while_the_model_loads_exits_75(images, tmp_path, monkeypatch):
    real = extract_vectors.load_vlm

    def slow_load(*a, **kw):
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning arrives mid-load
        time.sleep(0.05)
        return real(*a, **kw)

    monkeypatch.setattr(extract_vectors, "load_vlm", slow_load)
    assert extract_vectors.main(["--root", str(images), "--out_dir", str(tmp_path / "v"), *STAGE1]) == 75
    assert not (tmp_path / "v" / SHARD / "manifest.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--img_size", "-3"], "--img_size: must be >= 1, got -3"),
        (["--img_size", "0"], "--img_size: must be >= 1, got 0"),
        (["--device", "tpu"], "--device: 'tpu': choose auto"),
        (["--caption", "--max_new_tokens", "0"], "--max_new_tokens: must be >= 1"),
        (["--save_every", "x"], "--save_every: 'x' is not an integer"),
    ],
)
def test_stage1_bad_numbers_refused_at_parse_time(args, message, images, tmp_path, capsys):
    assert extract_vectors.main(["--root", str(images), "--out_dir", str(tmp_path), *STAGE1, *args]) == 2
    one_error_line(capsys, message)


def test_verify_command(reference, tmp_path):
    vec = store_copy(reference, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "vlmc.store", "verify", str(vec)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and f"ok   {vec / SHARD}" in ok.stdout, ok.stderr
    flip_bytes(chunk(vec, "pre", 2))
    tamper(vec, "post", 0, lambda d: d["keys"].reverse())
    bad = subprocess.run([sys.executable, "-m", "vlmc.store", "verify", str(vec)], capture_output=True, text=True, env=env)
    fails = [ln for ln in bad.stderr.splitlines() if ln.startswith("FAIL")]
    assert bad.returncode == 2 and len(fails) == 2, bad.stderr
    assert "pre_vectors_00002.pt: sha256" in fails[1] and "post_vectors_00000.pt: keys" in fails[0]


# -- stage 3: geometry refuses a store that is not what its manifest says ----------------------------


def _knn(vec: Path, out: Path, *extra: str) -> int:
    d = vec / "llava"
    return extract_knn.main(["--pre_pt", str(d), "--post_pt", str(d), "--out_dir", str(out), "--k", "2", "--device", "cpu",
                             *extra])


HASH_ONLY = {"bitflip"}  # faults only the sha256 sees: stages 3 and 6 hash with --verify (> 5 % of their time)


STORE_FAULTS = {
    "bitflip": (lambda v: flip_bytes(chunk(v, "post", 1)), "post_vectors_00001.pt: sha256"),
    "truncated": (lambda v: RAW_FAULTS["truncated"](chunk(v, "post", 1)), "post_vectors_00001.pt: "),
    "zero_byte": (lambda v: RAW_FAULTS["zero_byte"](chunk(v, "pre", 0)), "pre_vectors_00000.pt: 0 bytes"),
    "reversed_keys": (lambda v: tamper(v, "post", 1, lambda d: d["keys"].reverse()), "post_vectors_00001.pt"),
    "swapped_rows": (lambda v: tamper(v, "post", 0, lambda d: d["keys"].__setitem__(slice(1, 3), d["keys"][2:0:-1])),
                     "hold different keys (first difference at row 1)"),
    "malicious": (lambda v: tamper(v, "pre", 1, lambda d: d.update(obj=Evil())), "pre_vectors_00001.pt: refused"),
    "nan": (lambda v: tamper(v, "pre", 2, lambda d: d["pooled"][1].fill_(float("nan"))),
            "pre_vectors_00002.pt: 'pooled' has NaN/inf values in row(s) 1"),
    "chunk_entry_removed": (lambda v: edit_manifest(v, lambda m: (m["chunks"].pop(1), m.update(n_images=6))),
                            "manifest.json: complete manifest lacks chunk(s) [1]"),
    "n_images_edited": (lambda v: edit_manifest(v, lambda m: m.update(n_images=9)), "manifest.json: n_images=9"),
    "rows_edited": (lambda v: edit_manifest(v, lambda m: (m["chunks"][0].update(rows=3), m.update(n_images=9))),
                    "_vectors_00000.pt: 4 rows, the manifest says 3"),
    "bad_json": (lambda v: (v / SHARD / "manifest.json").write_text('{"format": '), "manifest.json: not valid JSON"),
}


def test_stage3_sound_store_runs(reference, tmp_path):
    assert _knn(reference, tmp_path / "knn") == 0


@pytest.mark.parametrize("fault", list(STORE_FAULTS))
def test_stage3_refuses_with_one_line_naming_the_file(fault, reference, tmp_path, capsys):
    vec = store_copy(reference, tmp_path)
    inject, message = STORE_FAULTS[fault]
    inject(vec)
    assert _knn(vec, tmp_path / "knn", *(["--verify"] if fault in HASH_ONLY else [])) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "knn").exists() or not list((tmp_path / "knn").glob("overlap_*.json"))


# -- stage 4: training refuses bad input and no kill window changes the result ------------------------

LINEAR = ["--model_type", "linear", "--num_workers", "0", "--train_split", "0.7"]


@pytest.mark.parametrize("fault", ["bitflip", "zero_byte", "reversed_keys", "nan", "rows_edited", "chunk_entry_removed",
                                   "malicious"])
def test_stage4_refuses_with_one_line_naming_the_file(fault, reference, tmp_path, capsys):
    vec = store_copy(reference, tmp_path)
    inject, message = STORE_FAULTS[fault]
    inject(vec)
    assert train_recon.main(["--vec_dir", str(vec / "llava"), "--out_dir", str(tmp_path / "r"), *LINEAR]) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "r" / "best_model.pt").exists()


def test_stage4_nan_tokens_named_by_row(reference, tmp_path, capsys):
    vec = store_copy(reference, tmp_path)
    tamper(vec, "post", 1, lambda d: d["vecs"][2, 5, 0].fill_(float("inf")))
    assert train_recon.main(["--vec_dir", str(vec / "llava"), "--out_dir", str(tmp_path / "r"), *LINEAR]) == 2
    key = torch.load(chunk(vec, "post", 1), weights_only=True)["keys"][2]
    one_error_line(capsys, "post_vectors_00001.pt: 'vecs' has NaN/inf values in row(s) 2", repr(key))


class Killed(BaseException):
    """A SIGKILL at a chosen point (BaseException: nothing in the trainer catches it)."""


TRAIN = ["--model_type", "mlp", "--hidden_size", "16", "--epochs", "4", "--batch_size", "4", "--num_workers", "0",
         "--lr", "3e-3", "--warmup_steps", "2", "--patience", "1", "--train_split", "0.75"]


def _train_store(root: Path) -> Path:
    return write_synthetic_store(root / "st", synthetic_connector("gelu", 8, 12), "1:1", (2, 2), 8,
                                 {"00000": [f"{i:09d}" for i in range(24)]}, save_every=8)


def _result(out: Path) -> tuple:
    best = torch.load(out / "best_model.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    with open(out / "history.csv", newline="") as f:
        hist = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    return best["state_dict"], best["meta"]["epoch"], best["meta"]["val_loss"], last["model"], last["state"], hist


def _same(a: tuple, b: tuple) -> bool:
    sa, ea, va, la, sta, ha = a
    sb, eb, vb, lb, stb, hb = b
    drop = ("epoch_seconds",)
    return (ea, va, ha) == (eb, vb, hb) and all(torch.equal(sa[k], sb[k]) for k in sa) and \
        all(torch.equal(la[k], lb[k]) for k in la) and {k: v for k, v in sta.items() if k not in drop} == \
        {k: v for k, v in stb.items() if k not in drop}


def test_stage4_kill_in_every_checkpoint_window_gives_identical_weights_and_history(tmp_path, monkeypatch):
    store = _train_store(tmp_path)
    ref_out = tmp_path / "ref"
    writes: list[str] = []
    real_save, real_hist = loop.atomic_torch_save, loop.write_rows

    def counting_save(obj, path):
        writes.append(Path(path).name)
        real_save(obj, path)

    def counting_hist(path, rows, fields):
        writes.append(Path(path).name)
        real_hist(path, rows, fields)

    monkeypatch.setattr(loop, "atomic_torch_save", counting_save)
    monkeypatch.setattr(loop, "write_rows", counting_hist)
    assert train_recon.main(["--vec_dir", str(store), "--out_dir", str(ref_out), *TRAIN]) == 0
    ref = _result(ref_out)
    assert "best_model.pt" in writes and ref[4]["best_epoch"] >= 2  # improvement after epoch 1: windows matter
    n = len(writes)
    for k in range(n):
        for when in ("before", "after"):
            out = tmp_path / f"k{k}{when}"
            count = [0]

            def killing(real, *a, k=k, when=when, count=count):
                if count[0] == k and when == "before":
                    raise Killed()
                real(*a)
                if count[0] == k and when == "after":
                    raise Killed()
                count[0] += 1

            monkeypatch.setattr(loop, "atomic_torch_save", lambda o, p, f=killing: f(real_save, o, p))
            monkeypatch.setattr(loop, "write_rows", lambda p, r, c, f=killing: f(real_hist, p, r, c))
            with pytest.raises(Killed):
                train_recon.main(["--vec_dir", str(store), "--out_dir", str(out), *TRAIN])
            monkeypatch.setattr(loop, "atomic_torch_save", real_save)
            monkeypatch.setattr(loop, "write_rows", real_hist)
            args = ["--vec_dir", str(store), "--out_dir", str(out), *TRAIN] + (["--resume"] if (out / "last.pt").exists() else [])
            if not (out / "last.pt").exists():
                shutil.rmtree(out)  # killed before the first commit: a fresh start is the rerun
            assert train_recon.main(args) == 0, (k, when, writes[k])
            assert _same(_result(out), ref), (k, when, writes[k])


@pytest.mark.parametrize(("args", "message"), [(["--dropout", "2"], "--dropout: must be in [0, 1), got 2"),
                                               (["--hidden_size", "-5"], "--hidden_size: must be >= 1, got -5"),
                                               (["--hidden_size", "0"], "--hidden_size: must be >= 1, got 0"),
                                               (["--lr", "nan"], "--lr: 'nan' is not a finite number"),
                                               (["--device", "tpu"], "--device: 'tpu'")])
def test_stage4_bad_numbers_refused_at_parse_time(args, message, tmp_path, capsys):
    assert train_recon.main(["--vec_dir", str(tmp_path), "--out_dir", str(tmp_path / "r"), *args]) == 2
    one_error_line(capsys, message)


# -- stage 6: evaluation reads verified chunks too ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(reference, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faultrecon") / "r"
    assert train_recon.main(["--vec_dir", str(reference / "llava"), "--out_dir", str(out), *LINEAR]) == 0
    return out


def _eval(vec: Path, model: Path, out: Path, *extra: str) -> int:
    return eval_recon.main(["--model_dir", str(model), "--vec_dir", str(vec / "llava"), "--out_dir", str(out),
                            "--no_reproj", "--num_workers", "0", "--device", "cpu", *extra])


def test_stage6_sound_store_evaluates(reference, trained, tmp_path):
    assert _eval(reference, trained, tmp_path / "e") == 0


@pytest.mark.parametrize("fault", ["bitflip", "truncated", "reversed_keys", "nan", "malicious", "bad_json"])
def test_stage6_refuses_with_one_line_naming_the_file(fault, reference, trained, tmp_path, capsys):
    vec = store_copy(reference, tmp_path)
    inject, message = STORE_FAULTS[fault]
    inject(vec)
    assert _eval(vec, trained, tmp_path / "e", *(["--verify"] if fault in HASH_ONLY else [])) == 2
    one_error_line(capsys, message)


def test_stage6_malicious_checkpoint_refused(reference, trained, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(trained, model)
    ck = torch.load(model / "best_model.pt", weights_only=True)
    ck["meta"]["evil"] = Evil()
    torch.save(ck, model / "best_model.pt")
    assert _eval(reference, model, tmp_path / "e") == 2
    one_error_line(capsys, f"{model / 'best_model.pt'}: refused")


def test_repair_best_is_what_both_trainers_share(tmp_path):
    """train_connector resumes through the same repair as train_recon (tested end to end above)."""
    from vlmc.train.resume import repair_best
    from vlmc.utils.cli import UsageError

    best = tmp_path / "best_model.pt"
    torch.save({"state_dict": {}, "meta": {"epoch": 1}}, best)
    written = []
    state = {"epoch": 3, "batch": 0, "best_epoch": 3}
    repair_best(best, state, lambda: written.append(3))  # killed between last.pt and best_model.pt of epoch 3
    assert written == [3]
    repair_best(best, {"epoch": 3, "batch": 0, "best_epoch": 1}, lambda: written.append("again"))
    assert written == [3]  # consistent: nothing to do
    with pytest.raises(UsageError, match="holds epoch 1, but .*last.pt records best epoch 2"):
        repair_best(best, {"epoch": 3, "batch": 5, "best_epoch": 2}, lambda: None)
