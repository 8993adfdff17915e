"""Test helpers: a few SGD steps of a meta-architecture on a fixed batch; the OAP training batch of
two scikit-image photographs."""
import torch
from detectron2.utils.events import EventStorage


def sgd_steps(model, batch, steps: int = 4, lr: float = 0.05, loss_key: str = "loss_sem_seg"):
    """Losses of ``steps`` SGD steps; each loss finite, and after the first backward every
    trainable parameter has a gradient (DDP then needs no find_unused_parameters)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    with EventStorage():
        for it in range(steps):
            loss = model(batch)[loss_key]
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            if it == 0:
                missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
                assert not missing, missing
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def oap_skimage_batch(cfg, root, names=("astronaut", "coffee")):
    """scikit-image photographs written to ``root`` as PNG files and mapped by the OAP multi-crop
    mapper of ``cfg`` in training mode, with the NumPy and torch generators seeded first."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from hiseg_oap.data.multicrop_mapper import OAPMultiCropDatasetMapper

    np.random.seed(0)
    torch.manual_seed(0)
    mapper = OAPMultiCropDatasetMapper(cfg, True)
    batch = []
    for k, name in enumerate(names):
        rgb = getattr(skdata, name)()
        path = root / f"{name}.png"
        Image.fromarray(rgb).save(path)
        batch.append(mapper({"image_id": k, "file_name": str(path), "height": rgb.shape[0], "width": rgb.shape[1]}))
    return batch
