"""Test-time adaptation with TENT (Wang et al. 2021) for CAST / ViT classifiers (CAST Appx. B).

Test-time adaptation (Appx. B): :func:`tent_adapt` adapts the affine parameters of the
backbone's normalisation layers with one SGD step (lr 1.0) minimising the prediction entropy of a
single image, then restores them (episodic: every image starts from the trained model). The
classifier can be the model's head or :class:`CosinePrototypeClassifier` (class means of
normalised training embeddings, cosine logits / 0.07), as in the paper.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CosinePrototypeClassifier", "norm_parameters", "prediction_entropy", "tent_adapt"]


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def norm_parameters(module: nn.Module) -> List[nn.Parameter]:
    """Affine weights / biases of the normalisation layers of ``module`` (what TENT adapts)."""
    params, seen = [], set()
    for m in module.modules():
        if isinstance(m, _NORMS):
            for p in (m.weight, m.bias):
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) per row."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class CosinePrototypeClassifier(nn.Module):
    """Logits = cos(embedding, class vector) / temperature; class vector = mean of the
    L2-normalised training embeddings of the class (Appx. B.1)."""

    def __init__(self, prototypes: torch.Tensor, temperature: float = 0.07):
        super().__init__()
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=-1))
        self.temperature = float(temperature)

    @classmethod
    def from_embeddings(cls, embeddings: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None,
                        temperature: float = 0.07) -> "CosinePrototypeClassifier":
        labels = labels.long().to(embeddings.device)
        c = int(num_classes) if num_classes is not None else int(labels.max()) + 1
        z = F.normalize(embeddings.float(), dim=-1)
        sums = torch.zeros(c, z.shape[1], device=z.device).index_add_(0, labels, z)
        counts = torch.bincount(labels, minlength=c).clamp(min=1).to(z.dtype)
        return cls(sums / counts[:, None], temperature)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings.float(), dim=-1) @ self.prototypes.t() / self.temperature


@torch.no_grad()
def _with_superpixels(model: nn.Module, d: dict) -> dict:
    """``d`` with the S_0 the backbone would compute for it, when it reads superpixels and ``d``
    brings none."""
    from ..superpixels import reads_superpixels

    if "superpixels" in d or not reads_superpixels(model.backbone):
        return d
    x = d["image"][None].to(model.device).float()
    return {**d, "superpixels": model.superpixels_of_pixels(x)[0]}


def tent_adapt(model: nn.Module, batched_inputs, classifier: Optional[nn.Module] = None, lr: float = 1.0,
               steps: int = 1, reset: bool = True, modules: Optional[nn.Module] = None) -> List[dict]:
    """TENT (Wang et al. 2021) per image, as CAST's Appx. B: for each input dict on its own
    (``model``: ``CASTClassifier`` or ``CASTLinearProbe``, read through ``embed`` and ``head``),
    ``steps`` SGD steps (lr ``lr``, no momentum) on the affine parameters of the normalisation
    layers of ``modules`` (default: the backbone) minimising the entropy of ``classifier``
    (default: the model's head) on that image; every other parameter is frozen and the model
    runs in eval mode (dropout off; no label or batch information is used). With ``reset``
    the adapted parameters are restored after each image.

    Returns per image ``logits_before`` / ``logits`` (after), ``entropy_before`` / ``entropy``
    and, for CAST, ``hierarchy_before`` / ``hierarchy`` ((L+1, H, W) label maps).
    """
    head = classifier if classifier is not None else model.head
    params = norm_parameters(modules if modules is not None else model.backbone)
    if not params:
        raise ValueError("no normalisation layer with affine parameters to adapt")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    results = []
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for d in batched_inputs:
            d = _with_superpixels(model, d)  # S_0 once: adaptation never changes the image
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                feats, out = model.embed([d])
                before = head(feats)[0]
            opt = torch.optim.SGD(params, lr=lr, momentum=0.0)
            for _ in range(int(steps)):
                feats, _ = model.embed([d])
                loss = prediction_entropy(head(feats)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                feats, out_after = model.embed([d])
                after = head(feats)[0]
            rec = {"logits_before": before, "logits": after,
                   "entropy_before": prediction_entropy(before[None])[0], "entropy": prediction_entropy(after[None])[0]}
            if "hierarchy" in out:
                rec["hierarchy_before"] = out["hierarchy"][0]
                rec["hierarchy"] = out_after["hierarchy"][0]
            results.append(rec)
            if reset:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return results
