"""tools/train_net.py end to end on CPU: train, get killed, resume exactly, evaluate.

Uses the real COCO sample through detectron2's built-ins ``coco_2017_train`` / ``coco_2017_val``
(a DETECTRON2_DATASETS folder with 4 images of each linked in) and Mask R-CNN on a tiny CAST + FPN.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO

CONFIG = "configs/CAST/quick/mask_rcnn_cast_tiny_coco_sample_cpu.yaml"
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "128",
         "INPUT.MAX_SIZE_TEST", "160", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0"]


@pytest.fixture(scope="module")
def coco4(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("d2data")
    (root / "coco" / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):  # the quick config trains on train, tests on val
        src = json.loads((shared_data / "coco" / "annotations" / f"instances_{split}.json").read_text())
        images = src["images"][:4]
        ids = {im["id"] for im in images}
        sub = dict(src, images=images, annotations=[a for a in src["annotations"] if a["image_id"] in ids])
        (root / "coco" / "annotations" / f"instances_{split}.json").write_text(json.dumps(sub))
        os.symlink(shared_data / "coco" / split, root / "coco" / split)
    return root


def _has_key(d, key):
    return isinstance(d, dict) and (key in d or any(_has_key(v, key) for v in d.values()))


class _Run:
    """A train_net.py process whose output goes to a file (a pipe that nobody reads would fill
    up and block the process while it dumps its config)."""

    def __init__(self, args, env, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "tools/train_net.py", *args], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def poll(self):
        return self.proc.poll()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        return self.finish()

    def finish(self, timeout=None):
        self.proc.wait(timeout=timeout)
        self._log.close()
        return Path(self.log_path).read_text()

    @property
    def returncode(self):
        return self.proc.returncode


def run(args, env, log_path):
    return _Run(args, env, log_path)


def test_help():
    out = subprocess.run([sys.executable, "tools/train_net.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--eval-only" in out.stdout and "--num-gpus" in out.stdout


def test_multi_gpu_request_on_cpu_is_a_clear_error(coco4):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = dict(os.environ, DETECTRON2_DATASETS=str(coco4))
    out = subprocess.run([sys.executable, "tools/train_net.py", "--config-file", CONFIG, "--num-gpus", "2"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "needs CUDA" in out.stderr


def test_train_kill_resume_evaluate(coco4, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(coco4), OMP_NUM_THREADS="1")
    out_dir = tmp_path / "run"
    cfg = ["--config-file", CONFIG]
    common = cfg + ["OUTPUT_DIR", str(out_dir)] + SMALL
    # 1. a long run, killed (SIGKILL) once the first checkpoint exists
    proc = run(common + ["SOLVER.MAX_ITER", "200"], env, tmp_path / "run1.log")
    last = out_dir / "last_checkpoint"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    log = proc.kill()
    assert last.exists(), log[-3000:]
    name = last.read_text().strip()
    ckpt = torch.load(out_dir / name, map_location="cpu", weights_only=True)
    done = ckpt["iteration"]
    assert {"model", "trainer", "iteration"} <= set(ckpt)
    assert ckpt["trainer"]["_trainer"]["optimizer"]["state"]  # Adam moments saved (v0.6 lost them)
    assert _has_key(ckpt["trainer"], "optimizer")  # layout differs between detectron2 versions
    assert _has_key(ckpt["trainer"], "LRScheduler")
    assert not list(out_dir.glob(".tmp-*")) or all(p.name != name for p in out_dir.glob(".tmp-*"))

    # 2. --resume continues from the iteration after the checkpoint, up to MAX_ITER
    proc = run(cfg + ["--resume"] + common[2:] + ["SOLVER.MAX_ITER", str(done + 3)], env, tmp_path / "run2.log")
    log = proc.finish(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert f"Starting training from iteration {done + 1}" in log
    final = torch.load(out_dir / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == done + 2
    assert not torch.equal(final["model"]["roi_heads.box_predictor.cls_score.weight"],
                           ckpt["model"]["roi_heads.box_predictor.cls_score.weight"])

    # 3. --eval-only with the COCO evaluator (pure-Python path when detectron2._C is absent)
    proc = run(cfg + ["--eval-only"] + common[2:] + ["MODEL.WEIGHTS", str(out_dir / "model_final.pth"),
                                                       "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"], env,
               tmp_path / "run3.log")
    log = proc.finish(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert "Evaluation results for coco_2017_val" in log
    assert "copypaste: Task: bbox" in log and "copypaste: Task: segm" in log
    assert "No predictions from the model" not in log


def test_interrupted_save_keeps_last_checkpoint(tmp_path, monkeypatch):
    from torch import nn

    from hiseg.engine import AtomicDetectionCheckpointer

    model = nn.Linear(2, 2)
    ck = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    ck.save("model_0000001", iteration=1)
    good = (tmp_path / "model_0000001.pth").read_bytes()

    def dying_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000002", iteration=2)
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert not list(tmp_path.glob(".tmp-*"))
    assert AtomicDetectionCheckpointer(nn.Linear(2, 2), save_dir=str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 1
