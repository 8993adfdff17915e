"""A few SGD steps of a semantic-segmentation meta-architecture on a fixed batch, for the tests."""
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
