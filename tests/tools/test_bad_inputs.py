"""Issue 14: every entry point answers a bad file with one line (file, problem, what to do) and a
non-zero exit, and never unpickles beyond an allow-list.

One test per case: not a checkpoint, a checkpoint of another model, unpickling, a truncated image,
a config key / file, a missing dataset folder, an empty dataset, a zero-size image; plus the
converter. Every input is a tiny
file generated in ``tmp_path``. The tools run in this process through their ``main(argv)`` /
``hiseg.cli.run_cli``, except the issue's own train_net command, which runs as a subprocess.
"""
import io
import os
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from expectations import registered_dataset
from hiseg.checkpoint.io import SafeDetectionCheckpointer, read_checkpoint
from hiseg.cli import merge_config, one_line
from hiseg.errors import CheckpointError, ConfigError, DatasetNotFoundError, EmptyDatasetError, InputError
from hiseg.image_io import ImageCheckingMapper, read_image, verify_image
from helpers import REPO, error_line, load_script, load_tool, run_captured

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = "configs/CAST/quick/moco_cast_tiny_skimage_cpu.yaml"
TINY_CAST = ["MODEL.CAST.EMBED_DIM", "48", "MODEL.CAST.NUM_HEADS", "4", "MODEL.CAST.DEPTHS", "[1,1,1,1]"]
TINY_VIT = ["--arch", "vit_small", "--embed-dim", "48", "--depth", "2", "--heads", "4", "--patch", "16",
            "--input-size", "64", "--threads", "1", "--no-progress"]


def _picture(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR))


def _jpeg_bytes(h=48, w=64):
    buf = io.BytesIO()
    Image.fromarray(_picture(h, w)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _zero_width_png():
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad (and good) files, written once."""
    d = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(14)
    (d / "garbage.pth").write_bytes(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
    torch.save({"model": {"w": torch.zeros(64, 64)}}, d / "good.pth")
    zipped = (d / "good.pth").read_bytes()
    (d / "truncated.pth").write_bytes(zipped[: len(zipped) // 2])
    (d / "notes.pth").write_text("learning rate 0.1, 100 epochs\n")
    (d / "page.pth").write_text("<!DOCTYPE html><html><body>404</body></html>")
    (d / "lfs.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    (d / "empty.pth").write_bytes(b"")
    np.savez(d / "arrays.npz", a=np.zeros(3))
    jpeg = _jpeg_bytes()
    (d / "good.jpg").write_bytes(jpeg)
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "zero.png").write_bytes(_zero_width_png())
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("not a picture\n")
    return d


# ------------------------------------------------------------------------------------------------
# not a checkpoint
def test_not_a_checkpoint(files):
    # the command, as a new user runs it
    out = subprocess.run(
        [sys.executable, "tools/train_net.py", "--config-file", QUICK, "--eval-only",
         "MODEL.WEIGHTS", str(files / "garbage.pth"), "OUTPUT_DIR", str(files / "out"),
         "DATASETS.TEST", "('skimage_natural_images',)"],  # --eval-only needs a test set
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = error_line(out.stderr)
    assert out.returncode == 2
    assert line.startswith(f"error: {files / 'garbage.pth'}: not a checkpoint")
    assert "weights_only" not in out.stderr and "tools/convert_cast_checkpoint.py" in line

    expected = {
        "garbage.pth": "not a checkpoint: unknown content",
        "truncated.pth": "truncated or damaged checkpoint",
        "notes.pth": "not a checkpoint: a text file starting 'learning rate",
        "page.pth": "not a checkpoint: an HTML/XML page",
        "lfs.pth": "a Git LFS pointer",
        "empty.pth": "empty file (0 bytes)",
        "arrays.npz": "not a checkpoint: a NumPy .npz archive",
        "absent.pth": "no checkpoint file at this path",
    }
    for name, phrase in expected.items():
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(str(files / name))
        assert str(e.value).startswith(str(files / name)) and phrase in str(e.value), str(e.value)
        assert "weights_only" not in str(e.value)
    assert set(read_checkpoint(str(files / "good.pth"))) == {"model"}


# ------------------------------------------------------------------------------------------------
# no unrestricted unpickling
_SIDE_EFFECTS = []


def _side_effect(msg):
    _SIDE_EFFECTS.append(msg)
    return msg


class _Evil:
    def __reduce__(self):
        return (_side_effect, ("arbitrary code ran",))


def test_unpickling_is_allow_listed(tmp_path):
    import argparse

    torch.save({"model": {"w": torch.ones(2)}, "extra": _Evil()}, tmp_path / "evil.pth")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"blobs": {"w": _Evil()}}, f, protocol=2)
    with open(tmp_path / "evil4.pth", "wb") as f:
        pickle.dump({"w": _Evil()}, f, protocol=4)  # a plain pickle, not torch.save's
    for name in ("evil.pth", "evil.pkl", "evil4.pth"):
        with pytest.raises(CheckpointError, match=r"refused to unpickle it: it holds a Python object of type "
                                                  r"[\w.]*_side_effect") as e:
            read_checkpoint(str(tmp_path / name))
        assert "weights_only" not in str(e.value)
    assert _SIDE_EFFECTS == []

    # what needs more than torch's default is read with the allow-list: DeiT's argparse.Namespace,
    # a Detectron / Caffe2 .pkl of NumPy arrays
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "deit.pth")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "deit.pth")
    assert read_checkpoint(str(tmp_path / "deit.pth"))["args"].lr == 0.1
    with open(tmp_path / "c2.pkl", "wb") as f:
        pickle.dump({"blobs": {"conv1_w": np.ones((2, 3), np.float32)}}, f, protocol=2)
    assert read_checkpoint(str(tmp_path / "c2.pkl"))["blobs"]["conv1_w"].shape == (2, 3)


# ------------------------------------------------------------------------------------------------
# a checkpoint of another model
class _Net(torch.nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.BatchNorm1d(width),
                                            torch.nn.Linear(width, width))
        self.head = torch.nn.Linear(width, 3)


def test_checkpoint_of_another_model(tmp_path, files):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as e:
        SafeDetectionCheckpointer(_Net()).load(str(tmp_path / "other.pth"))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'other.pth'}: not a checkpoint of this model (_Net): it fills 0 of")
    assert "needs keys such as 'backbone.0.weight', 'head.weight', 'backbone.0.bias'" in msg
    assert "the file has 4 keys the model lacks, such as '0.weight', '1.weight', '0.bias'" in msg

    torch.save({"model": _Net(width=32).state_dict()}, tmp_path / "wider.pth")  # same names, other shapes
    with pytest.raises(CheckpointError, match=r"tensors have another shape, e.g. 'backbone.0.weight' \(32, 8\) "
                                              r"in the file but \(16, 8\) in the model"):
        SafeDetectionCheckpointer(_Net()).load(str(tmp_path / "wider.pth"))

    # expected partial loads still work: a backbone without its head
    src = _Net()
    torch.save({"model": {k: v for k, v in src.state_dict().items() if k.startswith("backbone.")}},
               tmp_path / "backbone.pth")
    net = _Net()
    SafeDetectionCheckpointer(net).load(str(tmp_path / "backbone.pth"))
    assert torch.equal(net.backbone[0].weight, src.backbone[0].weight)

    # an entry point: the demo with weights of another model
    rc, _, err = run_captured(load_tool("demo").main, ["--input", files / "good.jpg", "--output", tmp_path / "demo",
                                           "--opts", *TINY_CAST, "MODEL.WEIGHTS", tmp_path / "other.pth"])
    assert rc == 2 and "not a checkpoint of this model (CASTEncoder)" in error_line(err)


# ------------------------------------------------------------------------------------------------
# truncated or unreadable images
@pytest.fixture(scope="module")
def demo_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    names = ["good.jpg", "truncated.jpg", "zero.png", "empty.jpg", "text.jpg"]
    rc, so, se = run_captured(load_tool("demo").main, ["--input", *[files / n for n in names], "--output", out,
                                           "--max-size", 64, "--opts", *TINY_CAST])
    return rc, so, se, out


def test_truncated_image(files, demo_run, tmp_path, capfd):
    with pytest.raises(InputError, match=r"truncated.jpg: not a readable image: truncated image file \(its data "
                                         r"ends early"):
        verify_image(files / "truncated.jpg")
    with pytest.raises(InputError, match=r"text.jpg: not a readable image: a text file starting 'not a picture'"):
        read_image(files / "text.jpg")

    # demo: a warning per bad file, the good one written, all counted, status 1
    rc, so, se, out = demo_run
    assert rc == 1
    assert f"warning: {files / 'truncated.jpg'}: not a readable image: truncated image file" in se
    assert f"warning: {files / 'text.jpg'}: not a readable image" in se
    assert "1 image(s) written" in so and "4 skipped (unreadable)" in so
    assert (out / "good_hierarchy.png").is_file() and not (out / "truncated_hierarchy.png").exists()
    assert "Premature end of JPEG" not in capfd.readouterr().err  # libjpeg never saw the file

    # generate_pseudo_masks: skipped with a warning, counted, status 1
    rc, _, se = run_captured(load_tool("generate_pseudo_masks").main,
                     ["--images", files / "good.jpg", files / "truncated.jpg", *TINY_VIT,
                      "--output", tmp_path / "masks.json"])
    assert rc == 1 and f"warning: {files / 'truncated.jpg'}: not a readable image: truncated image file" in se
    assert "1 image(s) could not be read or processed and were skipped (1 of 2 written)" in se

    # a prepare script: the unreadable label map is skipped and counted, the other one written
    ann = tmp_path / "ADE" / "annotations" / "validation"
    ann.mkdir(parents=True)
    labels = np.random.default_rng(0).integers(0, 150, (32, 32), dtype=np.uint8)  # noise: a long IDAT
    Image.fromarray(labels).save(ann / "a.png")
    png = (ann / "a.png").read_bytes()
    (ann / "b.png").write_bytes(png[: 2 * len(png) // 3])
    (ann / "c.png").write_bytes(png[:40])  # the header alone
    prepare = load_script("prepare_ade20k_sem_seg")
    rc, _, se = run_captured(prepare.main, ["--ade-root", tmp_path / "ADE", "--split", "validation"])
    assert rc == 1 and f"warning: {ann / 'b.png'}: not a readable image: truncated image file" in se
    assert f"warning: {ann / 'c.png'}: not a readable image: a truncated or damaged PNG file (40 bytes" in se
    assert "error: 2 of 3 label map(s) skipped (unreadable, see the warnings above: b.png, c.png)" in error_line(se)
    assert (tmp_path / "ADE" / "annotations_detectron2" / "validation" / "a.png").is_file()

    # training / evaluation: the data loader's mapper names the image, in one line
    from detectron2.data.detection_utils import read_image as d2_read_image

    mapper = ImageCheckingMapper(lambda d: {"image": d2_read_image(d["file_name"], "RGB")})
    with pytest.raises(InputError, match="truncated.jpg: not a readable image: truncated image file.*leave it "
                                         "out of the dataset"):
        mapper({"file_name": str(files / "truncated.jpg")})
    failing = ImageCheckingMapper(lambda d: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a good image: the mapper's own error stays
        failing({"file_name": str(files / "good.jpg")})

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return mapper({"file_name": str(files / "truncated.jpg")})

    with pytest.raises(InputError) as e:  # re-raised from a worker with its whole traceback as text
        next(iter(torch.utils.data.DataLoader(Bad(), num_workers=1)))
    assert one_line(e.value).startswith(f"{files / 'truncated.jpg'}: not a readable image: truncated image file")


# ------------------------------------------------------------------------------------------------
# config files and keys
def test_config_key_and_file(tmp_path):
    from detectron2.config import get_cfg

    from helpers import add_all_configs

    train_net = load_tool("train_net")
    rc, _, err = run_captured(train_net.cli, ["--config-file", QUICK, "--eval-only", "MODEL.CAST.NUM_SEGMENT", "[8,4]"])
    assert rc == 2
    line = error_line(err)
    assert line.startswith("error: command-line override: unknown config key MODEL.CAST.NUM_SEGMENT; "
                           "nearest valid keys: MODEL.CAST.NUM_SEGMENTS, "), line
    assert line.endswith("(fix the spelling or remove it)")
    rc, _, err = run_captured(train_net.cli, ["--config-file", QUICK[:-5] + ".yml", "--eval-only"])
    assert rc == 2 and error_line(err).startswith(f"error: {QUICK[:-5]}.yml: config file not found; did you "
                                                   f"mean {QUICK}")

    (tmp_path / "typo.yaml").write_text(f'_BASE_: "{REPO / QUICK}"\nSOLVER:\n  BASE_LRR: 0.1\n')
    (tmp_path / "nobase.yaml").write_text('_BASE_: "gone.yaml"\n')
    (tmp_path / "type.yaml").write_text(f'_BASE_: "{REPO / QUICK}"\nSOLVER:\n  MAX_ITER: many\n')
    cases = {
        "typo.yaml": "typo.yaml: unknown config key SOLVER.BASE_LRR; nearest valid keys: SOLVER.BASE_LR",
        "nobase.yaml": f"nobase.yaml: its _BASE_ config {tmp_path / 'gone.yaml'} does not exist",
        "type.yaml": "type.yaml: SOLVER.MAX_ITER takes an int (its default is ",
    }
    for name, phrase in cases.items():
        with pytest.raises(ConfigError, match="^" + str(tmp_path / phrase).replace("(", r"\(").replace(".", r"\.")):
            merge_config(add_all_configs(get_cfg()), str(tmp_path / name))
    with pytest.raises(ConfigError, match="KEY VALUE pairs, got 1 word"):
        merge_config(add_all_configs(get_cfg()), None, ["MODEL.WEIGHTS"])

    # the other entry points merge configs the same way
    for tool, argv in (("demo", ["--skimage", "coins", "--config-file", tmp_path / "typo.yaml"]),
                       ("benchmark_oap_step", ["--config-file", tmp_path / "typo.yaml"]),
                       ("main_job", ["--config-file", tmp_path / "typo.yaml"])):
        rc, _, err = run_captured(load_tool(tool).main, argv)
        assert rc == 2 and "unknown config key SOLVER.BASE_LRR; nearest valid keys: SOLVER.BASE_LR" in \
            error_line(err), tool


# ------------------------------------------------------------------------------------------------
# missing dataset folders
def test_missing_dataset_folder(tmp_path):
    from hiseg.data.datasets import voc

    with pytest.raises(DatasetNotFoundError) as e:
        voc.load_voc_sem_seg("voc_2012_sem_seg_val", str(tmp_path / "VOC2012"),
                             "ImageSets/Segmentation/val.txt", "SegmentationClass", "prepare_voc_sbd.py")
    assert isinstance(e.value, FileNotFoundError)
    assert str(e.value).startswith(f"Dataset 'voc_2012_sem_seg_val': expected "
                                   f"{tmp_path / 'VOC2012' / 'ImageSets/Segmentation/val.txt'} (image-id list), "
                                   f"which does not exist; run `python datasets/prepare_voc_sbd.py`")

    # a dataset registered like detectron2's built-ins (paths in its metadata): train_net checks them
    missing_json = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    with registered_dataset("hiseg_test_missing_folder", lambda: [], json_file=str(missing_json),
                            image_root=str(tmp_path / "coco" / "val2017")):
        rc, _, err = run_captured(load_tool("train_net").cli, ["--config-file", QUICK, "--eval-only",
                                                   "DATASETS.TEST", "('hiseg_test_missing_folder',)"])
    assert rc == 2 and error_line(err).startswith(
        f"error: Dataset 'hiseg_test_missing_folder': expected {missing_json} (json_file), which does not "
        f"exist; download it as datasets/README.md describes")
    rc, _, err = run_captured(load_tool("train_net").cli, ["--config-file", QUICK, "--eval-only",
                                               "DATASETS.TEST", "('bsds500_vall',)"])
    assert rc == 2 and "dataset 'bsds500_vall' is not registered; nearest registered names: bsds500_val" in \
        error_line(err)

    # a prepare script: the download folder it reads, with its layout
    rc, _, err = run_captured(load_script("prepare_ade20k_sem_seg").main, ["--ade-root", tmp_path / "nowhere"])
    assert rc == 2 and error_line(err) == (
        f"error: {tmp_path / 'nowhere' / 'annotations' / 'training'}: input folder not found; expected layout: "
        f"<ade-root>/annotations/{{training,validation}}/*.png; download ADEChallengeData2016.zip "
        f"(http://sceneparsing.csail.mit.edu), unzip it under $DETECTRON2_DATASETS, or pass --ade-root")


# ------------------------------------------------------------------------------------------------
# empty datasets
def test_empty_dataset(tmp_path):
    from detectron2.config import get_cfg

    from hiseg.data.datasets.bsds500 import load_bsds500_dicts
    from hiseg.engine import HisegTrainer
    from helpers import add_all_configs

    (tmp_path / "images").mkdir()
    (tmp_path / "gt").mkdir()
    with pytest.raises(EmptyDatasetError, match=r"^Dataset 'bsds500_val' is empty: nothing found at .*gt/\*\.mat"):
        load_bsds500_dicts("bsds500_val", tmp_path / "images", tmp_path / "gt")

    # detectron2's bare "Dataset 'x' is empty!" assertion, as the trainer builds a loader
    cfg = merge_config(add_all_configs(get_cfg()), QUICK, ["MODEL.DEVICE", "cpu"])
    with registered_dataset("hiseg_test_empty", lambda: [], image_root=str(tmp_path / "images")):
        with pytest.raises(EmptyDatasetError, match=r"^Dataset 'hiseg_test_empty' is empty: it lists no images "
                                                    r"\(image_root=.*images\)"):
            HisegTrainer.build_test_loader(cfg, "hiseg_test_empty")

    # a prepare script on an empty download folder
    (tmp_path / "ADE" / "annotations" / "validation").mkdir(parents=True)
    rc, _, err = run_captured(load_script("prepare_ade20k_sem_seg").main,
                      ["--ade-root", tmp_path / "ADE", "--split", "validation"])
    assert rc == 2 and error_line(err).startswith(
        f"error: {tmp_path / 'ADE' / 'annotations' / 'validation'}: no input files (*.png) in it, nothing to convert")


# ------------------------------------------------------------------------------------------------
# images of zero size
def test_zero_size_image(files, demo_run):
    with pytest.raises(InputError, match=r"zero.png: image of zero size \(0x4 pixels\), nothing to process"):
        verify_image(files / "zero.png")
    with pytest.raises(InputError, match=r"empty.jpg: empty file \(0 bytes\), not an image"):
        read_image(files / "empty.jpg")
    rc, so, se, _ = demo_run
    assert f"warning: {files / 'zero.png'}: image of zero size (0x4 pixels)" in se
    assert f"warning: {files / 'empty.jpg'}: empty file (0 bytes)" in se
    assert "skipped (unreadable): " in so and "zero.png" in so.split("skipped (unreadable): ")[1]


# ------------------------------------------------------------------------------------------------
# the converter (tools/convert_cast_checkpoint.py, hiseg_cast/released_weights/)
def test_converter_answers_bad_files(files, tmp_path):
    convert = load_tool("convert_cast_checkpoint")
    out = tmp_path / "out.pth"
    rc, _, err = run_captured(convert.main, ["--input", files / "garbage.pth", "--output", out])
    assert rc != 0 and "not a checkpoint" in error_line(err) and "weights_only" not in err
    rc, _, err = run_captured(convert.main, ["--input", files / "truncated.pth", "--output", out])
    assert rc != 0 and "truncated" in error_line(err)
    torch.save({"state_dict": {"conv1.weight": torch.zeros(4, 3, 3, 3)}}, tmp_path / "resnet.pth")
    rc, _, err = run_captured(convert.main, ["--input", tmp_path / "resnet.pth", "--output", out])
    assert rc != 0 and "'conv1.weight'" in error_line(err) and "blocks.0.attn.qkv.weight" in err

    from hiseg.modeling.vit import make_timm_vit

    vit = make_timm_vit(embed_dim=48, depth=1, num_heads=4, patch_size=16, img_size=32)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    rc, _, err = run_captured(convert.main, ["--input", tmp_path / "vit.pth", "--output", out,
                                     "--config-file", tmp_path / "missing.yaml"])
    assert rc == 2 and f"{tmp_path / 'missing.yaml'}: config file not found" in error_line(err)
    assert not out.exists()
