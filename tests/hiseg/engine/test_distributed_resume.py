"""A 2-process ``tools/train_net.py`` run loses a worker (SIGKILL) and is resumed.

detectron2 v0.6's ``launch`` cannot start CPU workers, so the test starts the 2 processes the
way ``launch`` does (``distributed_helpers``: ``torch.multiprocessing`` spawn, gloo process
group, detectron2's local group) and each calls ``tools/train_net.py``'s ``main(args)``, as
``launch(main, ..., args=(args,))`` does on GPUs. The model is CASTSemanticSegmentor (the tiny
VOC config, CPU, 6 iterations, a checkpoint every 2).

1. An uninterrupted 2-process run: only rank 0 writes checkpoints (its log has the checkpointer's
   "Saving checkpoint" lines, rank 1's log none).
2. The same run in another folder; once ``last_checkpoint`` names ``model_0000003.pth`` the
   test SIGKILLs rank 1 from outside. Rank 0, waiting in DDP's all-reduce, stops by itself
   (gloo: the peer's connection closes) within the process group's timeout, with
   HisegTrainer's message naming the failure, the iteration and the last complete checkpoint;
   ``torch.multiprocessing`` reports the killed process. ``last_checkpoint`` still names
   ``model_0000003.pth`` and that file loads, at iteration 3, with optimizer and scheduler state.
3. ``--resume`` with 2 processes in that folder continues at iteration 4 and ends with the same
   weights, buffers and optimizer state as run 1 (relative deviation <= 1e-6; measured 0).

Resuming restores model, optimizer, scheduler and iteration, not the position in the data
stream (detectron2 restarts its sampler and the augmentation RNGs): the training set is one VOC
image without random augmentation, so every iteration sees the same data in both runs.
"""
import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

from distributed_helpers import collect_results, start_group
from helpers import REPO, load_tool

CFG = REPO / "configs/CAST/quick/semseg_cast_tiny_voc_cpu.yaml"
DATASET = "hiseg_dist_resume_voc1"
MAX_ITER = 6
KILL_AFTER = "model_0000003.pth"
TOL = 1e-6
PG_TIMEOUT_S = 60.0


def _opts(out):
    return ["OUTPUT_DIR", str(out), "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", "()",
            "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.IMS_PER_BATCH", "2",
            "SEED", "3", "INPUT.CROP.ENABLED", "False", "INPUT.RANDOM_FLIP", "none",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
            "MODEL.CAST.POOL_DROPOUT", "0.0", "MODEL.CAST.NUM_SEGMENTS", "[16, 8, 4, 2]",
            "MODEL.CAST_SEM_SEG.HEAD_DIM", "32"]


def train_net_worker(argv, image, label):
    """One process of the run: register the one-image set, then train_net's main(args)."""
    import torch

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils import comm

    from hiseg.data.datasets.voc import VOC_CLASSES

    DatasetCatalog.register(DATASET, lambda: [{"file_name": image, "sem_seg_file_name": label, "image_id": 0,
                                               "height": 371, "width": 500}])
    MetadataCatalog.get(DATASET).set(stuff_classes=list(VOC_CLASSES), ignore_label=255, evaluator_type="sem_seg")
    train_net = load_tool("train_net")
    train_net.main(train_net.default_argument_parser().parse_args(argv))
    return {"rank": comm.get_rank(), "threads": torch.get_num_threads()}


@pytest.fixture(scope="module")
def sample(shared_data, tmp_path_factory):
    from scipy.io import loadmat

    root = tmp_path_factory.mktemp("dist_resume")
    sbd = shared_data / "voc_samples" / "sbd_bench" / "datadir"
    lab = loadmat(sbd / "cls" / "2008_000051.mat")["GTcls"][0, 0]["Segmentation"].astype(np.uint8)
    assert lab.shape == (371, 500)
    Image.fromarray(lab).save(root / "label.png")
    return root, str(sbd / "img" / "2008_000051.jpg"), str(root / "label.png")


def _run(argv, image, label, result_dir):
    os.makedirs(result_dir, exist_ok=True)
    start_group(train_net_worker, 2, (argv, image, label), result_dir=str(result_dir), timeout_s=PG_TIMEOUT_S)
    return collect_results(result_dir, 2)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _max_rel(a, b):
    worst = 0.0
    for k, v in b.items():
        if isinstance(v, torch.Tensor):
            assert k in a, k
            d = (a[k].double() - v.double()).abs().max() if v.numel() else torch.tensor(0.0)
            worst = max(worst, float(d) / max(1.0, float(v.double().abs().max()) if v.numel() else 1.0))
        elif isinstance(v, dict):
            worst = max(worst, _max_rel(a[k], v))
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                if isinstance(item, (dict, torch.Tensor)):
                    worst = max(worst, _max_rel({0: a[k][i]}, {0: item}))
                else:
                    assert a[k][i] == item, (k, i)
        else:
            assert a[k] == v, k
    return worst


def test_killed_worker_stops_the_run_and_resume_reaches_the_same_weights(sample):
    root, image, label = sample
    tic = time.perf_counter()

    # 1. uninterrupted
    full_dir = root / "full"
    _run(["--config-file", str(CFG), *_opts(full_dir)], image, label, root / "r_full")
    final = _load(full_dir / "model_final.pth")
    assert final["iteration"] == MAX_ITER - 1
    main_log, rank1_log = (full_dir / "log.txt").read_text(), (full_dir / "log.txt.rank1").read_text()
    assert "Saving checkpoint to" in main_log and "Saving checkpoint" not in rank1_log
    assert "World size: 2" in main_log

    # 2. kill rank 1 once the iteration-3 checkpoint is complete
    run_dir = root / "killed"
    ctx = start_group(train_net_worker, 2, (["--config-file", str(CFG), *_opts(run_dir)], image, label),
                      result_dir=str(root / "r_killed"), timeout_s=PG_TIMEOUT_S, join=False)
    tag = run_dir / "last_checkpoint"
    deadline = time.monotonic() + 300
    while not (tag.is_file() and tag.read_text().strip() == KILL_AFTER):
        assert time.monotonic() < deadline and all(p.is_alive() for p in ctx.processes), "no checkpoint 3"
        time.sleep(0.01)
    os.kill(ctx.processes[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while ctx.processes[0].is_alive():  # rank 0 must stop by itself, not hang in the collective
        assert time.monotonic() - killed_at < PG_TIMEOUT_S + 30, "rank 0 still running after the kill"
        time.sleep(0.05)
    stop_s = time.monotonic() - killed_at
    with pytest.raises(Exception) as err:
        while not ctx.join():
            pass
    assert ctx.processes[0].exitcode == 1 and ctx.processes[1].exitcode == -signal.SIGKILL
    assert "process 1 terminated with signal SIGKILL" in str(err.value) or "Process 0" in str(err.value)
    log = (run_dir / "log.txt").read_text()
    assert "training stopped at iteration 4: a collective failed" in log, log[-3000:]
    assert f"Last complete checkpoint: {run_dir / KILL_AFTER}; restart with --resume." in log
    assert not (run_dir / "model_final.pth").exists()
    ckpt = _load(run_dir / KILL_AFTER)
    trainer = ckpt["trainer"]  # HisegTrainer.state_dict(): scheduler (LRScheduler hook), optimizer
    assert ckpt["iteration"] == trainer["iteration"] == 3 and "LRScheduler" in trainer["hooks"]
    assert trainer["_trainer"]["optimizer"]["state"]  # SGD momentum buffers

    # 3. resume with 2 processes
    _run(["--config-file", str(CFG), "--resume", *_opts(run_dir)], image, label, root / "r_resumed")
    log = (run_dir / "log.txt").read_text()
    assert f"Loading trainer from {run_dir / KILL_AFTER}" in log and "Starting training from iteration 4" in log
    resumed = _load(run_dir / "model_final.pth")
    assert resumed["iteration"] == MAX_ITER - 1
    start = _load(run_dir / KILL_AFTER)["model"]
    assert any(not torch.equal(start[k], final["model"][k]) for k in start)  # iterations 4, 5 changed it
    err_model = _max_rel(resumed["model"], final["model"])
    err_opt = _max_rel(resumed["trainer"]["_trainer"], final["trainer"]["_trainer"])
    assert resumed["trainer"]["hooks"] == final["trainer"]["hooks"]
    print(f"resume: rank 0 stopped {stop_s:.1f} s after the kill; final weights max rel. deviation "
          f"{err_model:.1e}, optimizer state {err_opt:.1e}; test {time.perf_counter() - tic:.0f} s")
    assert err_model <= TOL and err_opt <= TOL


def test_hung_worker_fails_the_others_after_the_timeout(sample, monkeypatch):
    """A worker that stops answering (SIGSTOP: its connections stay open) does not hang the run:
    rank 0's collective fails after the process-group timeout, taken from
    ``$HISEG_DIST_TIMEOUT_S`` as ``tools/train_net.py`` passes it to ``launch``, with the same
    message."""
    root, image, label = sample
    timeout = 6.0
    monkeypatch.setenv("HISEG_DIST_TIMEOUT_S", str(timeout))
    run_dir = root / "hung"
    ctx = start_group(train_net_worker, 2, (["--config-file", str(CFG), *_opts(run_dir)], image, label), join=False)
    tag = run_dir / "last_checkpoint"
    deadline = time.monotonic() + 300
    try:
        while not (tag.is_file() and tag.read_text().strip() == "model_0000001.pth"):
            assert time.monotonic() < deadline and all(p.is_alive() for p in ctx.processes), "no checkpoint 1"
            time.sleep(0.01)
        os.kill(ctx.processes[1].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        while ctx.processes[0].is_alive():
            assert time.monotonic() - stopped_at < timeout + 60, "rank 0 still waiting long after the timeout"
            time.sleep(0.05)
        waited = time.monotonic() - stopped_at
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
    with pytest.raises(Exception):
        while not ctx.join():
            pass
    assert ctx.processes[0].exitcode == 1
    log = (run_dir / "log.txt").read_text()
    assert "a collective failed" in log and "another process has probably died or hangs" in log, log[-2000:]
    assert f"Last complete checkpoint: {run_dir / 'model_0000001.pth'}" in log
    print(f"hung worker: rank 0 stopped {waited:.1f} s after its peer froze (timeout {timeout} s)")
    assert waited >= timeout - 1.0
