"""Pictures of CAST's segmentation hierarchy for any image: what ``tools/demo.py`` and the main job
(``tools/main_job.py``) draw.

* :func:`build_demo_backbone`: the CAST backbone of a config, ``MODEL.WEIGHTS`` loaded into its
  encoder from a full detectron2 model, a CAST backbone or a bare encoder checkpoint
  (:func:`load_encoder_weights`);
* :func:`run_hierarchy` / :func:`hierarchy_pictures`: one image's levels (superpixels first), the
  picture of them (input, superpixels, each level's segments) and, if asked, the label maps;
* :func:`dataset_pictures`: the same pictures of a registered dataset's images with a trained
  CAST meta-architecture (the main job's ``pictures/``).

The drawing itself (panels, palettes, boundaries, label maps) is the shared core's
:mod:`hiseg.visualization`.
"""
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hiseg.errors import CheckpointError
from hiseg.image_io import read_image

__all__ = ["encoder_state_dict", "load_encoder_weights", "build_demo_backbone", "superpixels_for", "run_hierarchy",
           "hierarchy_pictures", "prepare_input", "dataset_pictures"]


def encoder_state_dict(state):
    """Keys of a full model / backbone / MoCo checkpoint mapped to the encoder's names: anything
    up to and including the first ``encoder.`` is dropped (``backbone.encoder.``,
    ``backbone.bottom_up.encoder.``, ``module.base_encoder.``); other keys are kept. A MoCo
    checkpoint holds two encoders: the online one (ours: ``backbone.encoder.``; the authors':
    ``module.base_encoder.``) and its momentum copy (``momentum_backbone.encoder.``,
    ``module.momentum_encoder.``). The online encoder is the one loaded: it is the encoder the
    authors evaluate and fine-tune (twke18/CAST ``moco-v3/main_lincls_suppix.py`` @344d717 keeps
    ``module.base_encoder.*`` only), so keys of the momentum copy are dropped and can never
    overwrite it."""
    out = {}
    for k, v in state.items():
        i = k.find("encoder.")
        if i >= 0 and "momentum" in k[:i]:
            continue
        out[k[i + len("encoder."):] if i >= 0 else k] = v
    return out


def load_encoder_weights(encoder, weights: str, cfg=None) -> Tuple[int, int]:
    """Load ``weights`` into the encoder (hiseg's safe DetectionCheckpointer); returns
    (matched, total). With ``cfg``, the config values a converted checkpoint stores are checked
    as for evaluation (``hiseg.checkpoint.weights_config``): the demo shows the released model."""
    from hiseg.checkpoint.io import SafeDetectionCheckpointer
    from hiseg.checkpoint.weights_config import WEIGHTS_CONFIG_KEY, check_weights_config

    class _EncoderCheckpointer(SafeDetectionCheckpointer):
        matched = 0

        def _load_model(self, checkpoint):
            meta = checkpoint.pop(WEIGHTS_CONFIG_KEY, None)
            if meta and cfg is not None:
                check_weights_config(cfg, meta, weights, evaluating=True, logger=self.logger)
            state = checkpoint["model"]
            if isinstance(state.get("state_dict"), dict):  # e.g. MoCo / DeiT training checkpoints
                state = state["state_dict"]
            checkpoint["model"] = encoder_state_dict(state)
            own = self.model.state_dict()
            _EncoderCheckpointer.matched = sum(
                1 for k, v in checkpoint["model"].items()
                if k in own and tuple(getattr(v, "shape", ())) == tuple(own[k].shape))
            return super()._load_model(checkpoint)

    ckpt = _EncoderCheckpointer(encoder)
    ckpt.load(weights, checkpointables=[])
    total = len(encoder.state_dict())
    if _EncoderCheckpointer.matched == 0:
        raise CheckpointError(f"{weights}: no tensor matches the CAST encoder (expected keys like "
                              f"'blocks.0.attn.qkv.weight', optionally under '...encoder.'); give a CAST "
                              f"checkpoint (tools/convert_cast_checkpoint.py converts released ones)")
    return _EncoderCheckpointer.matched, total


def build_demo_backbone(cfg, device: str, log: Callable[[str], None] = print):
    """The CAST backbone (random init or ``MODEL.WEIGHTS`` in its encoder), eval mode; what was
    loaded, or a warning that nothing was, goes to ``log``."""
    from .modeling.backbone import build_cast_backbone

    backbone = build_cast_backbone(cfg)
    if cfg.MODEL.WEIGHTS:
        matched, total = load_encoder_weights(backbone.encoder, cfg.MODEL.WEIGHTS, cfg)
        log(f"loaded {matched}/{total} encoder tensors from {cfg.MODEL.WEIGHTS}")
        if matched < total:
            log(f"WARNING: {total - matched} encoder tensors were not in the checkpoint and keep their "
                "random initialisation (see the checkpointer's log above for their names)")
    else:
        log("WARNING: MODEL.WEIGHTS is empty: the CAST encoder is randomly initialised, so its "
            "hierarchy only reflects the superpixels' colours and positions, not learned semantics.")
    return backbone.to(torch.device(device)).eval()


def superpixels_for(backbone, rgb: np.ndarray) -> np.ndarray:
    """S_0 of an RGB uint8 image as the backbone's config asks (SEEDS / SLIC, or square patches)."""
    from .superpixels import compute_superpixels, patch_superpixels

    if backbone.tokens == "patch":
        return patch_superpixels(rgb.shape[0], rgb.shape[1], backbone.patch_size)
    return compute_superpixels(rgb, backbone.superpixel_cfg)


def run_hierarchy(backbone, rgb: np.ndarray, device: str):
    """(levels (L+1, H, W) int64 numpy, num_segments per level, asked counts per level 1..L)."""
    sp = superpixels_for(backbone, rgb)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None]
    if backbone.input_format == "BGR":
        x = x.flip(1)
    x = x.to(device)
    x = (x - backbone.pixel_mean) / backbone.pixel_std
    asked = backbone.test_num_segments or backbone.encoder.num_segments
    with torch.no_grad():
        out = backbone.encoder(x, torch.from_numpy(sp)[None].to(device), num_segments=asked)
    levels = out["hierarchy"][0].cpu().numpy()
    return levels, out["num_segments"][0].cpu().tolist(), list(asked)


def hierarchy_pictures(backbone, rgb: np.ndarray, prefix: str, device: str, title: str = "",
                       color: str = "mean", columns: int = 3, save_labels: bool = False):
    """Draw ``<prefix>_hierarchy.png`` (the input, the superpixels and each level's segments) and,
    with ``save_labels``, ``<prefix>_level<l>.png`` and ``<prefix>_levels.npz``
    (:func:`hiseg.visualization.save_label_maps`). Returns (files written, segments present per
    level, segments asked per level 1..L)."""
    from hiseg.visualization import count_segments, hierarchy_panels, save_label_maps, save_panel_grid

    levels, _, asked = run_hierarchy(backbone, rgb, device)
    present = [count_segments(l) for l in levels]
    panels = hierarchy_panels(rgb, list(levels), mode=color, asked=asked)
    written = [save_panel_grid(prefix + "_hierarchy.png", panels, ncols=columns, suptitle=title)]
    if save_labels:
        written += save_label_maps(prefix, list(levels), image=rgb, extra={"asked": np.array(asked, np.int64)})
    return written, present, asked


# ------------------------------------------------------------------------------------------------
# a trained CAST meta-architecture on a dataset's images (the main job)
def prepare_input(model, path: str, max_size: int):
    """(image uint8 RGB at model resolution, input dict for the model); InputError for a bad file.
    The image is scaled (bilinear) to ``max_size`` on its long side when larger; S_0 uses the
    backbone's superpixel settings with the count from its pixels per superpixel."""
    from PIL import Image

    from .superpixels.policy import superpixels_for_image_tensor

    img = read_image(path, format="RGB")
    h, w = img.shape[:2]
    s = min(1.0, max_size / max(h, w))
    if s < 1.0:
        img = np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    sp = superpixels_for_image_tensor(t, "RGB", model.backbone.superpixel_cfg.for_whole_images())
    return img, {"image": t, "superpixels": sp, "height": img.shape[0], "width": img.shape[1]}


def dataset_pictures(model, dataset: str, out_dir: str, max_size: int, limit: int = 0, skipped=None,
                     log: Callable[[str], None] = print) -> List[str]:
    """``<out_dir>/<image name>.png``: CAST's hierarchy of the first ``limit`` (0: all) images of
    the registered ``dataset``, from ``model.inference``. An unreadable image is reported to
    ``skipped`` (a :class:`hiseg.cli.Skipped`) and left out; without ``skipped`` its InputError
    propagates. Returns the files written."""
    from detectron2.data import DatasetCatalog

    from hiseg.visualization import hierarchy_panels, save_panel_grid

    os.makedirs(out_dir, exist_ok=True)
    written = []
    dicts = DatasetCatalog.get(dataset)
    for d in dicts[:limit] if limit > 0 else dicts:
        if skipped is None:
            prepared: Optional[Sequence] = prepare_input(model, d["file_name"], max_size)
        else:
            prepared = skipped.read(d["file_name"], prepare_input, model, d["file_name"], max_size)
        if prepared is None:
            continue
        img, inp = prepared
        with torch.no_grad():
            out = model.inference([inp])[0]
        levels = [lvl.cpu().numpy() for lvl in out["hierarchy"]]
        name = os.path.splitext(os.path.basename(d["file_name"]))[0]
        path = save_panel_grid(os.path.join(out_dir, name + ".png"),
                               hierarchy_panels(img, levels, asked=model.backbone.encoder.num_segments),
                               suptitle=f"CAST hierarchy: {name}")
        written.append(path)
        log(f"picture {path}")
    return written
