"""Issue 21, the tools' rows: one image reader for every tool, outputs / devices / numbers checked
before any work (one ``error:`` line, exit status 2), pseudo-mask upsampling bounded by pixels,
and an image that fails costing only itself.

Every tool runs in this process through its ``main(argv)`` (``hiseg.cli.run_cli``); inputs are
tiny files made in ``tmp_path``. The read-only location is ``/sys`` (not writable even by root)
and, for other users, a folder made read-only with ``chmod``.
"""
import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiseg.cli import run_cli
from hiseg.image_io import read_image
from helpers import load_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_VIT = ["--arch", "vit_small", "--embed-dim", "48", "--depth", "1", "--heads", "4", "--patch", "16",
            "--input-size", "32", "--threads", "1", "--no-progress", "--device", "cpu"]
TINY_CAST = ["MODEL.CAST.EMBED_DIM", "48", "MODEL.CAST.NUM_HEADS", "4", "MODEL.CAST.DEPTHS", "[1,1,1,1]"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def tools():
    return {p: load_file(p) for p in ("tools/generate_pseudo_masks.py", "tools/demo.py", "tools/main_job.py",
                                  "tools/benchmark.py", "tools/benchmark_oap.py", "tools/gpu_check.py",
                                  "tools/convert_cast_checkpoint.py", "datasets/prepare_cls_agnostic_coco.py")}


def _run(main, argv):
    """(exit status, stdout, stderr) of ``run_cli(main, argv)``; a ``SystemExit`` (argparse) is
    its status (a message instead of a number counts as 1, as Python exits with it)."""
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            rc = run_cli(main, [str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, so.getvalue(), se.getvalue()


def _one_error_line(se):
    lines = [line for line in se.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in se, se
    return lines[0]


# ------------------------------------------------------------------------------------------------
# files
def _camera():
    import skimage.data

    return skimage.data.camera()[::4, ::4].copy()  # 128x128 uint8 grey


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_errors")
    g = _camera()
    Image.fromarray(g.astype(np.uint16) * 257).save(d / "grey16.tif")  # mode I;16
    rgb = np.dstack([g, g[::-1], g[:, ::-1]])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 128 wide x 64 high, shown rotated by 90 degrees: 64 wide x 128 high
    Image.fromarray(rgb[:64]).save(d / "rot6.jpg", exif=exif.tobytes(), quality=95)
    (d / "folder").mkdir()
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}], "annotations": [],
            "categories": [{"id": 3, "name": "x"}]}
    (d / "coco.json").write_text(json.dumps(coco))
    from hiseg.modeling.vit import make_timm_vit

    torch.save(make_timm_vit(embed_dim=48, depth=1, num_heads=4, patch_size=16, img_size=32).state_dict(),
               d / "vit.pth")
    (d / "notes.txt").write_text("not a checkpoint\n")
    return d


def _read_only_places(tmp_path):
    """Paths in which no file can be created: /sys, and a chmod-555 folder unless we are root."""
    places = []
    if os.path.isdir("/sys"):
        try:
            open("/sys/.hiseg_probe", "w").close()
        except OSError:
            places.append(Path("/sys"))
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        open(ro / ".probe", "w").close()
        os.unlink(ro / ".probe")  # root: permission bits do not stop it
    except OSError:
        places.append(ro)
    if not places:
        pytest.skip("no read-only location on this machine")
    return places


# ------------------------------------------------------------------------------------------------
# 1. one image reader
MODES = [  # (name, PIL image, expected RGB pixels)
    ("L", lambda g: Image.fromarray(g), lambda g: np.dstack([g] * 3)),
    ("LA", lambda g: Image.fromarray(np.dstack([g, 255 - g])), lambda g: np.dstack([g] * 3)),
    ("P", lambda g: Image.fromarray(g).convert("P"), None),  # palette: compared with PIL's RGB
    ("RGBA", lambda g: Image.fromarray(np.dstack([g, g, g, g // 2])), lambda g: np.dstack([g] * 3)),
    ("CMYK", lambda g: Image.fromarray(np.dstack([g] * 3)).convert("CMYK"), lambda g: np.dstack([g] * 3)),
    ("I;16", lambda g: Image.fromarray(g.astype(np.uint16) * 257), lambda g: np.dstack([g] * 3)),
    ("I", lambda g: Image.fromarray(g.astype(np.int32) * 257), lambda g: np.dstack([g] * 3)),
    ("F", lambda g: Image.fromarray(g.astype(np.float32) / 255), lambda g: np.dstack([g] * 3)),
]


@pytest.mark.parametrize("mode,make,want", MODES, ids=[m[0] for m in MODES])
def test_read_image_modes(tmp_path, mode, make, want):
    """Every PIL mode as HxWx3 uint8; 16-bit / 32-bit / float grey scaled by what the mode means
    (today I;16, I and F come out clipped: almost all white)."""
    g = _camera()
    im = make(g)
    assert im.mode == mode
    path = tmp_path / ("x.tif" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    im.save(path)
    got = read_image(path, "RGB")
    assert got.dtype == np.uint8 and got.shape == g.shape + (3,)
    expected = np.asarray(Image.open(path).convert("RGB")) if want is None else want(g)
    assert np.abs(got.astype(int) - expected).max() <= 1, mode
    assert np.array_equal(read_image(path, "BGR"), got[:, :, ::-1])


def test_demo_and_pseudo_masks_read_the_same_pixels(tools, files, tmp_path):
    """An EXIF-rotated JPEG and a 16-bit TIFF: demo.py and generate_pseudo_masks.py see the same
    pixels, those of hiseg.image_io.read_image (today the demo draws the JPEG in stored
    orientation and generate_pseudo_masks sees the TIFF 99.99% white)."""
    from hiseg_oap.pseudo_labels.preprocess import read_rgb  # generate_pseudo_masks.py's reader

    demo = tools["tools/demo.py"]
    for name in ("rot6.jpg", "grey16.tif"):
        ours = read_image(files / name, "RGB")
        assert np.array_equal(read_rgb(str(files / name)), ours), name
    assert read_image(files / "rot6.jpg").shape[:2] == (128, 64)  # rotated as the EXIF tag says
    assert (read_image(files / "grey16.tif") == 255).mean() < 0.05
    out = tmp_path / "demo"
    rc, so, se = _run(demo.main, ["--input", files / "rot6.jpg", files / "grey16.tif", "--output", out,
                                  "--save-labels", "--max-size", "0", "--opts", *TINY_CAST])
    assert rc == 0, se
    for stem, name in (("rot6", "rot6.jpg"), ("grey16", "grey16.tif")):
        with np.load(out / f"{stem}_levels.npz") as z:
            assert np.array_equal(z["image"], read_image(files / name)), name


def test_dataset_sizes_follow_exif(files):
    """The height / width that dataset records carry (``hiseg.image_io.image_size``) are those of
    the pixels the mappers read: an EXIF-rotated JPEG is 64 wide x 128 high, not 128 x 64."""
    from hiseg.image_io import image_size

    assert image_size(files / "rot6.jpg") == read_image(files / "rot6.jpg").shape[:2] == (128, 64)
    assert image_size(files / "grey16.tif") == (128, 128)


# ------------------------------------------------------------------------------------------------
# 2, 5, 7. outputs checked before any work
OUTPUT_ROWS = [  # (id, tool, argv); {bad} is a path inside a read-only place
    ("pseudo-masks folder", "tools/generate_pseudo_masks.py",
     ["--images", "{files}/rot6.jpg", *TINY_VIT, "--output", "{files}/folder"]),
    ("pseudo-masks read-only", "tools/generate_pseudo_masks.py",
     ["--images", "{files}/rot6.jpg", *TINY_VIT, "--output", "{bad}"]),
    ("pseudo-masks annotations folder", "tools/generate_pseudo_masks.py",
     ["--images", "{files}/rot6.jpg", *TINY_VIT, "--output", "{files}/o.json", "--annotations-out", "{files}/folder"]),
    ("demo file", "tools/demo.py", ["--input", "{files}/rot6.jpg", "--output", "{files}/notes.txt", "--opts", *TINY_CAST]),
    ("demo read-only", "tools/demo.py", ["--input", "{files}/rot6.jpg", "--output", "{bad}", "--opts", *TINY_CAST]),
    ("cls-agnostic folder", "datasets/prepare_cls_agnostic_coco.py",
     ["--input", "{files}/coco.json", "--output", "{files}/folder"]),
    ("cls-agnostic read-only", "datasets/prepare_cls_agnostic_coco.py", ["--input", "{files}/coco.json", "--output", "{bad}"]),
    ("converter folder", "tools/convert_cast_checkpoint.py", ["--input", "{files}/vit.pth", "--output", "{files}/folder"]),
    ("converter read-only", "tools/convert_cast_checkpoint.py", ["--input", "{files}/vit.pth", "--output", "{bad}"]),
    ("gpu_check read-only", "tools/gpu_check.py", ["--device", "cpu", "--quick", "--only", "slic", "--out", "{bad}"]),
]


@pytest.mark.parametrize("row", OUTPUT_ROWS, ids=[r[0] for r in OUTPUT_ROWS])
def test_unwritable_output_is_one_line_before_work(tools, files, tmp_path, row):
    """A folder, a file or a read-only place as the output: one ``error:`` naming the flag and
    the path, exit status 2, before any image or checkpoint is processed (today: a traceback at
    the final write, after all the work)."""
    _, tool, argv = row
    for ro in _read_only_places(tmp_path) if "{bad}" in argv else [None]:
        args = [a.format(files=files, bad=f"{ro}/x/out.json") for a in argv]
        rc, so, se = _run(tools[tool].main, args)
        line = _one_error_line(se)
        assert rc == 2 and any(f in line for f in ("--output ", "--out ", "--annotations-out ")), (tool, se)
        assert "wrote" not in so and "image(s)" not in so and "MODEL." not in so, (tool, so)


def test_gpu_check_writes_its_report_inside_a_folder(tools, tmp_path, monkeypatch):
    """``--out <folder>``: the report is ``<folder>/gpu_check.md`` (today IsADirectoryError)."""
    tools["tools/gpu_check.py"].load_gpucheck()  # dev/gpucheck, the package the tool runs
    from gpucheck import correctness

    monkeypatch.setattr(correctness, "check_slic", lambda table, device, prof: None)  # the part itself: its own test
    rc, so, se = _run(tools["tools/gpu_check.py"].main, ["--device", "cpu", "--quick", "--only", "slic",
                                                         "--out", tmp_path])
    assert rc == 0, se
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")


def test_converter_bad_input_is_a_usage_error(tools, files):
    """A missing or non-checkpoint ``--input``: one line, exit status 2 (today 1)."""
    for name in ("absent.pth", "notes.txt"):
        rc, so, se = _run(tools["tools/convert_cast_checkpoint.py"].main,
                          ["--input", files / name, "--output", files / "out.pth"])
        assert rc == 2 and name in _one_error_line(se), se


# ------------------------------------------------------------------------------------------------
# 4, 6. devices and numbers checked by the parser / before work
ARGUMENT_ROWS = [  # (id, tool, argv, what the error line names)
    ("main_job budget", "tools/main_job.py", ["--budget-minutes", "-1", "--out", "{tmp}/mj"], "--budget-minutes"),
    ("benchmark batch", "tools/benchmark.py", ["--batch", "0"], "--batch"),
    ("benchmark_oap threads", "tools/benchmark_oap.py", ["--threads", "-3"], "--threads"),
    ("pseudo-masks threshold", "tools/generate_pseudo_masks.py",
     ["--images", "{files}/rot6.jpg", *TINY_VIT, "--thresholds", "0.8", "1.5", "--output", "{tmp}/t.json"],
     "--thresholds"),
    ("pseudo-masks threshold vs weights", "tools/generate_pseudo_masks.py",
     ["--images", "{files}/rot6.jpg", *TINY_VIT, "--thresholds", "0.7", "--w-f", "0.3", "--w-s", "0.3",
      "--output", "{tmp}/t.json"], "thresholds"),
]
CUDA_ROWS = [
    ("pseudo-masks cuda", "tools/generate_pseudo_masks.py",
     ["--images", "{files}/rot6.jpg", *TINY_VIT, "--device", "cuda", "--output", "{tmp}/c.json"], "--device cuda"),
    ("demo cuda", "tools/demo.py", ["--input", "{files}/rot6.jpg", "--device", "cuda", "--output", "{tmp}/d",
                                    "--opts", *TINY_CAST], "--device cuda"),
    ("benchmark cuda", "tools/benchmark.py", ["--devices", "cuda", "--quick"], "--devices cuda"),
]


@pytest.mark.parametrize("row", ARGUMENT_ROWS + [pytest.param(r, marks=NO_CUDA) for r in CUDA_ROWS],
                         ids=[r[0] for r in ARGUMENT_ROWS + CUDA_ROWS])
def test_bad_argument_is_one_line(tools, files, tmp_path, row):
    """Out-of-range numbers and absent devices: one ``error:`` line naming the flag, exit
    status 2, nothing computed (today: tracebacks, or 0 masks with exit status 0)."""
    _, tool, argv, names = row
    argv = [a.format(files=files, tmp=tmp_path) for a in argv]
    rc, so, se = _run(tools[tool].main, argv)
    assert rc == 2 and names in _one_error_line(se), se
    assert not list(tmp_path.iterdir()), "nothing may be written"


# ------------------------------------------------------------------------------------------------
# 3. upsampling memory bounded by pixels; a failing image skipped
def _many_masks(k=40, side=10):
    from hiseg_oap.pooling.types import MaskLevel, OAPLayer, PseudoMasks

    labels = torch.arange(side * side).reshape(side, side) % k
    masks = torch.stack([labels == i for i in range(k)])
    level = MaskLevel(masks=masks, features=torch.nn.functional.normalize(torch.randn(k, 8), dim=1),
                      parents=torch.full((k,), -1), nested=torch.zeros(k, dtype=torch.bool))
    layer = OAPLayer(threshold=0.5, instance=level, semantic=MaskLevel.empty(side, side, 8),
                     instance_to_semantic=torch.zeros(k, dtype=torch.long))
    return PseudoMasks(feature_size=(side, side), layers=[layer])


def test_upsampling_memory_is_bounded_by_pixels(monkeypatch):
    """36 masks at 1000x1100: no upsampling call holds more than 2^25 mask pixels (today 32
    masks at once whatever the image size: 12.8 GB of floats at 10000x10000); the entries do not
    depend on how the masks are grouped (compared with the old grouping, 32 at a time)."""
    from hiseg_oap.pooling.types import MaskLevel
    from hiseg_oap.pseudo_labels import pseudo_masks_to_results

    pseudo = _many_masks(k=36)
    largest = []
    original = MaskLevel.upsample

    def spy(self, sz, mode="nearest"):
        largest.append(len(self) * int(sz[0]) * int(sz[1]))
        return original(self, sz, mode)

    monkeypatch.setattr(MaskLevel, "upsample", spy)
    got = pseudo_masks_to_results(pseudo, 1, (1000, 1100), [("instance", 0)], score="one")
    assert len(got) == 36 and max(largest) <= 1 << 25, max(largest)
    for mode in ("bilinear", "nearest"):
        old = pseudo_masks_to_results(pseudo, 1, (30, 20), [("instance", 0)], score="one",
                                      upsample=mode, chunk=32, max_pixels=10 ** 9)
        new = pseudo_masks_to_results(pseudo, 1, (30, 20), [("instance", 0)], score="one",
                                      upsample=mode, max_pixels=1500)  # 2 masks at a time
        assert new == old and len(new) == 36


def test_a_failing_image_is_skipped_not_fatal(tools, files, tmp_path, monkeypatch):
    """The middle image runs out of memory: a warning naming it, the others written, a summary,
    exit status 1 (the error used to end the run, losing every result)."""
    from hiseg_oap.pseudo_labels import generate

    real = generate.pseudo_masks_to_results

    def fails_on_two(pseudo, image_id, *a, **k):
        if image_id == 2:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 12800000000 bytes.")
        return real(pseudo, image_id, *a, **k)

    monkeypatch.setattr(generate, "pseudo_masks_to_results", fails_on_two)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        Image.fromarray(np.roll(_camera(), 17 * i, axis=1)).save(imgs / name)
    out = tmp_path / "res.json"
    rc, so, se = _run(tools["tools/generate_pseudo_masks.py"].main,
                      ["--images", imgs, *TINY_VIT, "--input-size", "128", "--max-area-fraction", "1",
                       "--output", out])
    assert rc == 1, se
    assert "b.png" in se and "12800000000" in se and "skipped" in se
    # the images before and after the failing one are written
    assert {r["image_id"] for r in json.loads(out.read_text())} == {1, 3}
    assert "1 image(s) could not be read or processed" in se
