"""Bad requests to ``tools/train_net.py`` and faults while it trains: each gets one ``error:`` line
(exit status 2) before anything long starts, and no checkpoint is ever lost.

The command-line rows run ``tools/train_net.py``'s ``cli`` in this process (as ``run_cli`` does
for the script) on the tiny configs of ``configs/CAST/quick``; each is refused before a model is
built. The checkpoint rows use small ``nn.Module`` models with the same checkpointer the trainer
uses (``hiseg.engine.AtomicDetectionCheckpointer``).
"""
import contextlib
import errno
import io
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from hiseg.cli import run_cli
from hiseg.errors import CheckpointError, OutputError, TrainingDivergedError
from helpers import REPO, load_tool

MOCO = "configs/CAST/quick/moco_cast_tiny_skimage_cpu.yaml"
DEIT = "configs/CAST/quick/deit_cast_tiny_skimage_cpu.yaml"
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def train_net():
    return load_tool("train_net")


def _error_line(main, argv):
    se = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(se):
        rc = run_cli(main, [str(a) for a in argv])
    lines = [line for line in se.getvalue().splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in se.getvalue(), (rc, se.getvalue())
    return lines[0]


def _prepare(tmp_path, row):
    """Files a row needs; returns a dict of names to substitute in its argv."""
    (tmp_path / "empty.yaml").write_bytes(b"")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4)
    (tmp_path / "a_file").write_text("x")
    garbage = tmp_path / "garbage_run"
    garbage.mkdir()
    (garbage / "model_0000009.pth").write_bytes(b"")
    (garbage / "last_checkpoint").write_bytes(b"\xff\xfe\x00\x9c garbage")
    return {"{tmp}": str(tmp_path), "{out}": str(tmp_path / "out"), "{garbage}": str(garbage)}


# (id, argv, words the one error line must hold, skip reason or None)
CLI_ROWS = [
    ("eval-only without weights", ["--config-file", DEIT, "--eval-only", "OUTPUT_DIR", "{out}"],
     ["without MODEL.WEIGHTS", "randomly initialised", "MODEL.WEIGHTS path/to/model_final.pth", "--eval-random-weights"],
     None),
    ("empty config file", ["--config-file", "{tmp}/empty.yaml"], ["empty.yaml", "empty config file"], None),
    ("JPEG as config file", ["--config-file", "{tmp}/photo.jpg"], ["photo.jpg", "a JPEG image", ".yaml"], None),
    ("EMBED_DIM 100", ["--config-file", MOCO, "MODEL.CAST.EMBED_DIM", "100", "OUTPUT_DIR", "{out}"],
     ["MODEL.CAST.EMBED_DIM 100", "NUM_HEADS", "multiple of 8", "96"], None),
    ("NUM_HEADS 5", ["--config-file", MOCO, "MODEL.CAST.NUM_HEADS", "5", "OUTPUT_DIR", "{out}"],
     ["MODEL.CAST.EMBED_DIM 96", "MODEL.CAST.NUM_HEADS 5", "NUM_HEADS"], None),
    ("MODEL.DEVICE cuda on a CPU", ["--config-file", MOCO, "MODEL.DEVICE", "cuda", "OUTPUT_DIR", "{out}"],
     ["MODEL.DEVICE cuda", "CUDA is not available", "MODEL.DEVICE cpu"], None if NO_CUDA else "a GPU is present"),
    ("IMS_PER_BATCH 3 over 2 processes", ["--config-file", MOCO, "--num-gpus", "1", "--num-machines", "2",
                                          "--dist-url", "tcp://127.0.0.1:9", "SOLVER.IMS_PER_BATCH", "3",
                                          "OUTPUT_DIR", "{out}"],
     ["SOLVER.IMS_PER_BATCH 3", "2 process", "multiple of 2"], None),
    ("2 machines on a CPU", ["--config-file", MOCO, "--num-gpus", "1", "--num-machines", "2",
                             "--dist-url", "tcp://127.0.0.1:9", "OUTPUT_DIR", "{out}"],
     ["2 processes", "needs CUDA", "--num-gpus 1 --num-machines 1"], None if NO_CUDA else "a GPU is present"),
    ("OUTPUT_DIR not writable", ["--config-file", MOCO, "OUTPUT_DIR", "{tmp}/a_file/run"],
     ["OUTPUT_DIR", "a_file/run", "not a folder"], None),
    ("MODEL.WEIGHTS is a URL", ["--config-file", MOCO, "MODEL.WEIGHTS", "https://example.com/cast.pth",
                                "OUTPUT_DIR", "{out}"],
     ["MODEL.WEIGHTS https://example.com/cast.pth", "local file", "download"], None),
    ("--resume with a damaged last_checkpoint", ["--config-file", MOCO, "--resume", "OUTPUT_DIR", "{garbage}"],
     ["garbage_run/last_checkpoint", "damaged", "model_0000009.pth"], None),
    ("--eval-only with empty DATASETS.TEST", ["--config-file", DEIT, "--eval-only", "--eval-random-weights",
                                              "DATASETS.TEST", "()", "OUTPUT_DIR", "{out}"],
     ["--eval-only", "empty DATASETS.TEST", "nothing to evaluate"], None),
]


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_train_net_refuses_before_building(row, train_net, tmp_path, monkeypatch):
    name, argv, words, skip = row
    if skip:
        pytest.skip(skip)
    built = []
    monkeypatch.setattr(train_net.HisegTrainer, "build_model", classmethod(lambda cls, cfg: built.append(1)))
    subs = _prepare(tmp_path, name)
    argv = [subs.get(a, a).replace("{tmp}", str(tmp_path)) for a in argv]
    line = _error_line(train_net.cli, argv)
    for w in words:
        assert w in line, line
    assert not built


def test_eval_random_weights_is_an_explicit_choice(tmp_path):
    from detectron2.config import get_cfg

    from hiseg.engine.preflight import check_run
    from hiseg.errors import ConfigError
    from helpers import add_all_configs

    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(str(REPO / DEIT))
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    with pytest.raises(ConfigError):
        check_run(cfg, eval_only=True)
    check_run(cfg, eval_only=True, eval_random_weights=True)  # asked for: no error


# ------------------------------------------------------------------------------------------------
# weights that do not fill the part a run uses
class _Net(nn.Module):
    """A backbone whose width is ``width`` and a predictor that does not depend on it (as
    CASTMoCo's), big enough to pass a whole-model share rule on its own."""

    def __init__(self, width=8, classes=3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, width), nn.Linear(width, width))
        self.predictor = nn.Linear(64, 64)
        self.head = nn.Linear(width, classes)


def _save(model, folder, name="model_0000004"):
    from hiseg.engine import AtomicDetectionCheckpointer

    AtomicDetectionCheckpointer(model, save_dir=str(folder)).save(name, iteration=4)
    return str(Path(folder) / f"{name}.pth")


def test_fine_tuning_needs_the_backbone(tmp_path):
    from hiseg.engine import AtomicDetectionCheckpointer

    path = _save(_Net(width=8), tmp_path)
    with pytest.raises(CheckpointError) as e:  # another width: the backbone would stay random
        AtomicDetectionCheckpointer(_Net(width=16), save_dir=str(tmp_path / "ft")).resume_or_load(path, resume=False)
    msg = str(e.value)
    assert "'backbone.0.weight'" in msg and "(8, 4)" in msg and "(16, 4)" in msg and "backbone" in msg
    with pytest.raises(CheckpointError):  # evaluating it: the whole model
        AtomicDetectionCheckpointer(_Net(width=16), evaluating=True).load(path)
    # the same backbone with another head (e.g. another class count) is a normal fine-tuning
    model = _Net(width=8, classes=5)
    AtomicDetectionCheckpointer(model, save_dir=str(tmp_path / "ft2")).resume_or_load(path, resume=False)
    assert torch.equal(model.backbone[0].weight, torch.load(path, weights_only=True)["model"]["backbone.0.weight"])


def test_resume_with_another_shape_fails_before_training(tmp_path):
    from hiseg.engine import AtomicDetectionCheckpointer

    _save(_Net(width=8), tmp_path)
    with pytest.raises(CheckpointError) as e:
        AtomicDetectionCheckpointer(_Net(width=16), save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert "cannot resume" in str(e.value) and "'backbone.0.weight'" in str(e.value) and "config.yaml" in str(e.value)
    assert AtomicDetectionCheckpointer(_Net(width=8), save_dir=str(tmp_path)).resume_or_load(
        "", resume=True)["iteration"] == 4


def test_demo_loads_the_online_moco_encoder():
    from hiseg_cast.demo import encoder_state_dict

    online, momentum = torch.ones(2), torch.zeros(2)
    for state in ({"backbone.encoder.w": online, "momentum_backbone.encoder.w": momentum},
                  {"momentum_backbone.encoder.w": momentum, "backbone.encoder.w": online},
                  {"module.momentum_encoder.w": momentum, "module.base_encoder.w": online}):
        out = encoder_state_dict(state)
        assert set(out) == {"w"} and out["w"] is online, list(state)


# ------------------------------------------------------------------------------------------------
# saving: a diverged run, a full disk, temporary files, file mode
def test_diverging_loss_is_one_line_and_keeps_the_checkpoint(tmp_path):
    from detectron2.config import get_cfg
    from detectron2.engine import SimpleTrainer, TrainerBase

    from hiseg.engine import AtomicDetectionCheckpointer, HisegTrainer

    class _Diverging(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, batch):
            return {"loss_x": self.w.sum() * float("nan")}

    model = _Diverging()
    good = _save(model, tmp_path)
    trainer = HisegTrainer.__new__(HisegTrainer)  # the trainer's loop without a dataset or a config file
    TrainerBase.__init__(trainer)
    trainer._trainer = SimpleTrainer(model, iter([[{}]] * 10), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.cfg = get_cfg()
    trainer.cfg.SOLVER.BASE_LR = 0.1
    trainer.checkpointer = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    trainer.start_iter, trainer.max_iter = 0, 5
    with pytest.raises(TrainingDivergedError) as e:
        trainer.train()
    msg = str(e.value)
    assert "iteration 0" in msg and "SOLVER.BASE_LR" in msg and "model_0000004.pth" in msg and "\n" not in msg
    # weights that are not finite are never saved over the last complete checkpoint
    with torch.no_grad():
        model.w.fill_(float("inf"))
    with pytest.raises(TrainingDivergedError):
        trainer.checkpointer.save("model_0000005", iteration=5)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth" and os.path.exists(good)
    assert not (tmp_path / "model_0000005.pth").exists()


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from hiseg.engine import AtomicDetectionCheckpointer

    model = _Net()
    ck = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    ck.save("model_0000001", iteration=1)
    good = (tmp_path / "model_0000001.pth").read_bytes()

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError) as e:
        ck.save("model_0000002", iteration=2)
    assert "no space left on device" in str(e.value) and str(tmp_path / "model_0000002.pth") in str(e.value)
    assert "model_0000001.pth" in str(e.value)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == good and not list(tmp_path.glob(".tmp-*"))


def test_stale_temp_files_are_removed_and_mode_follows_umask(tmp_path):
    from hiseg.engine import AtomicDetectionCheckpointer

    stale = [".tmp-model_0000003.pth-ab12cd_9", ".tmp-last_checkpoint-x1y2z3w4"]
    kept = [".tmp-other-keep", "notes.tmp-model_1.pth-abcdefgh"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 10)
    old = os.umask(0o022)
    try:
        ck = AtomicDetectionCheckpointer(_Net(), save_dir=str(tmp_path))
        ck.save("model_0000004", iteration=4)
    finally:
        os.umask(old)
    names = set(os.listdir(tmp_path))
    assert not names & set(stale) and set(kept) <= names
    for name in ("model_0000004.pth", "last_checkpoint"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    # --resume removes them too (a killed save, then a resume without any new save)
    (tmp_path / stale[0]).write_bytes(b"x")
    AtomicDetectionCheckpointer(_Net(), save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert not (tmp_path / stale[0]).exists()
