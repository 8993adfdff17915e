"""tools/gpu_check.py (dev/gpucheck): the prepared GPU check runs its CPU quick mode end to end (so
it cannot rot before it runs on a GPU), and its report holds every table and row; the pieces that
decide the exit status and the list of CUDA-only tests are checked on their own."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, gpucheck

gpucheck()
from gpucheck import correctness, provenance  # noqa: E402  (dev tooling: loaded by the line above)
from gpucheck.profiles import QUICK  # noqa: E402
from gpucheck.report import Report  # noqa: E402


CORRECTNESS_ROWS = [
    "slic_torch labels, ",
    "slic_torch on the device: same labels run to run",
    "slic_torch on the device: label maps valid",
    "OAP fast on the device, float64 = reference",
    "OAP fast on the device, float32 = reference on structured maps",
    "OAP fast float32, device = CPU (same code) on random maps",
    ": level-0 tokens (stem, segment pooling, first blocks; before any FPS)",
    ": FPS centroids, hierarchy labels, cls, coarser levels, logits",
    "AMP bf16 training step: CASTMoCo",
    "AMP bf16 training step: CASTSemanticSegmentor",
    "AMP bf16 training step: OAPSegmentor",
    "the suite's CUDA-only tests (test_cuda_matches_cpu)",
]


def _tables(text):
    """{title: [rows as cell lists]} of a markdown report."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            tables[title] = []
        elif title and line.startswith("| ") and not line.startswith("|---"):
            tables[title].append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return {t: rows[1:] for t, rows in tables.items() if rows}  # drop the header row


def _table(tables, prefix):
    found = [t for t in tables if t.startswith(prefix)]
    assert len(found) == 1, (prefix, list(tables))
    return tables[found[0]]


def test_quick_cpu_run_writes_every_table_and_row(tmp_path):
    out = tmp_path / "report.md"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    # a generous budget: on a loaded machine no row may be skipped for time
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--quick", "--budget", "900",
                          "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = out.read_text()
    assert text == res.stdout.rstrip("\n") + "\n"  # the report is also printed
    assert "source fingerprint" in text and "torch " in text and "device: CPU" in text
    tables = _tables(text)

    corr = _table(tables, "Correctness on the device")
    assert len(corr) == len(CORRECTNESS_ROWS)
    for row, expected in zip(corr, CORRECTNESS_ROWS):
        assert expected in row[0], (expected, row[0])
        status = row[1]
        if expected.startswith("OAP fast float32, device = CPU"):
            assert status == "info"
        elif expected.startswith("the suite's"):
            assert status == "skipped (no CUDA)"  # found, collected, skipped without CUDA
        else:
            assert status == "pass", row

    n_runs = 2 * len(QUICK.speed_models)  # fp32 and AMP per model
    ratio = _table(tables, "CAST vs ViT: time per batch")
    assert len(ratio) == n_runs
    for row in ratio:
        assert float(row[6]) > 0 and row[7] in ("met", "missed"), row
    for prefix, goal_col in (("Superpixels' share", 5), ("Graph pooling: FPS share", 5)):
        rows = _table(tables, prefix)
        assert len(rows) == n_runs and all(r[goal_col] in ("met", "missed") for r in rows), rows
    parts = _table(tables, "CAST per-part time")
    assert len(parts) == n_runs
    for row in parts:
        assert len(row[5].split(" / ")) == 4 and float(row[-1]) > 0, row  # 4 levels' pools, a total

    oap = _table(tables, "OAP pseudo-masks on")
    assert [r[0].split(" ")[0] for r in oap] == ["ViT/8", "structured", "i.i.d."]
    for row in oap:
        assert row[2] in ("met", "missed") and row[9] in ("met", "missed") and row[8].endswith("x"), row
        assert float(row[4]) < float(row[1]), row  # the affinity product is a part of OAP

    step = _table(tables, "OAP's share of one OAPSegmentor training step")
    assert [r[0] for r in step] == ["AMP bf16", "fp32"]
    for row in step:
        assert 0 < float(row[4]) < float(row[2]) and row[6] in ("met", "missed"), row
    mem = _table(tables, "Peak memory of one training step per config family")
    assert [(r[0], r[1], int(r[3])) for r in mem] == [(m.family, m.command, m.batch) for m in QUICK.memory_rows]
    for row in mem:
        assert row[6] == "not measured (CPU)" and row[8] == "ran" and float(row[7]) > 0, row
    assert "all correctness checks passed" in text


def test_memory_row_out_of_memory_is_a_row_not_a_failure(tmp_path, monkeypatch):
    from gpucheck import memory

    def no_room(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(memory, "_two_steps", no_room)
    report = Report(tmp_path / "r.md", "t")
    prof = type("P", (), {"memory_rows": QUICK.memory_rows[-1:]})()  # the tiny OAP row
    memory.memory_per_config(report, torch.device("cpu"), prof, torch.bfloat16, allot_s=600)
    (row,) = report.tables[0].rows
    assert row[-1] == "out of memory" and not report.failures()


def test_failures_decide_the_exit_status(tmp_path):
    report = Report(tmp_path / "r.md", "t")
    t = correctness.new_table(report)
    t.add("ok", "pass", "-", "-", "-")
    t.add("note", "info", "-", "-", "-")
    t.add("slow", "skipped (time budget)", "-", "-", "-")
    speed = report.table("speed", ("row", "goal"))
    speed.add("missed goal", "missed")
    assert report.failures() == []  # missed goals, skips and info rows never fail the run
    t.add("bad", "FAIL", "-", "-", "-")
    speed.add("crash", "ERROR: RuntimeError: boom")
    assert [f.split(": ", 1)[1].split(" (")[0] for f in report.failures()] == ["bad", "crash"]
    report.write()
    assert "| bad | FAIL |" in (tmp_path / "r.md").read_text()


def test_cuda_only_tests_are_found_by_reading_the_source(tmp_path):
    assert "tests/hiseg_cast/test_superpixels_torch.py::test_cuda_matches_cpu" in correctness.cuda_only_tests()
    (tmp_path / "test_a.py").write_text(
        "import pytest, torch\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='x')\n"
        "def test_gpu():\n    pass\n"
        "def test_cpu():\n    pass\n"
        "@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')\n"
        "def test_without_gpu():\n    pass\n"
        "@pytest.mark.skipif(torch.cuda.device_count() == 0, reason='x')\n"
        "def test_counted():\n    pass\n"
        "class TestKernels:\n"
        "    @pytest.mark.skipif(not torch.cuda.is_available(), reason='x')\n"
        "    def test_one(self):\n        pass\n")
    (tmp_path / "test_b.py").write_text(
        "import pytest, torch\npytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='x')\n"
        "def test_all():\n    pass\n")
    ids = [i.split("/")[-1] for i in correctness.cuda_only_tests(tmp_path, root=tmp_path)]
    assert ids == ["test_a.py::test_gpu", "test_a.py::test_counted", "test_a.py::TestKernels::test_one",
                   "test_b.py::test_all"]


def test_pseudo_mask_comparison_sees_a_changed_partition():
    from hiseg_oap.pooling import OAPConfig, oap_fast

    x = torch.randn(1, 8, 6, 7, generator=torch.Generator().manual_seed(0))
    a = oap_fast(x, OAPConfig(phi=1))[0]
    b = oap_fast(x, OAPConfig(phi=1))[0]
    assert correctness.compare_pseudo_masks(a, b, 0.0) is None
    b.layers[0].instance.partition = torch.zeros_like(b.layers[0].instance.partition)
    assert "partitions differ" in correctness.compare_pseudo_masks(a, b, 0.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_requested_without_cuda_is_a_clear_error():
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cuda"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "CUDA is not available" in res.stderr


def test_stamp_gives_the_commit_where_git_is_absent(tmp_path):
    stamp = provenance.write_stamp(tmp_path / "STAMP.json")
    assert stamp["fingerprint"] == provenance.source_fingerprint()
    assert len(stamp["commit"]) == 40 or stamp["commit"] == "unknown"
    line = provenance.provenance(tmp_path / "STAMP.json", root=tmp_path)  # no git checkout there
    assert "from STAMP.json" in line and stamp["commit"] in line
