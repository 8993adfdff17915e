"""Activation checkpointing (MODEL.CAST / MODEL.VIT .ACTIVATION_CHECKPOINTING) gives the plain
step's loss and gradients, and really recomputes the blocks (tiny models, CPU)."""
import pytest
import torch
from detectron2.config import get_cfg

from helpers import add_all_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(*opts):
    cfg = add_all_configs(get_cfg())
    cfg.merge_from_list(list(opts))
    return cfg


def _cast_encoder(checkpointing):
    from hiseg_cast.modeling.backbone import encoder_from_cfg

    # stochastic depth and pooling dropout on: the recomputation must draw the same masks
    return encoder_from_cfg(_cfg("MODEL.CAST.EMBED_DIM", 32, "MODEL.CAST.NUM_HEADS", 2, "MODEL.CAST.DEPTHS", [2, 1],
                                 "MODEL.CAST.NUM_SEGMENTS", [6, 3], "MODEL.CAST.DROP_PATH_RATE", 0.2,
                                 "MODEL.CAST.POOL_DROPOUT", 0.1, "MODEL.CAST.ACTIVATION_CHECKPOINTING", checkpointing))


def _vit(checkpointing):
    from hiseg.modeling.vit import build_vit_backbone

    return build_vit_backbone(_cfg("MODEL.VIT.EMBED_DIM", 32, "MODEL.VIT.DEPTH", 2, "MODEL.VIT.NUM_HEADS", 2,
                                   "MODEL.VIT.PATCH_SIZE", 8, "MODEL.VIT.IMG_SIZE", 32, "MODEL.VIT.OUT_CHANNELS", 16,
                                   "MODEL.VIT.DROP_PATH_RATE", 0.2, "MODEL.VIT.ACTIVATION_CHECKPOINTING", checkpointing))


def _adapter(checkpointing):
    from hiseg_oap.modeling.vit_adapter import build_vit_adapter_backbone

    return build_vit_adapter_backbone(_cfg(
        "MODEL.VIT.EMBED_DIM", 32, "MODEL.VIT.DEPTH", 4, "MODEL.VIT.NUM_HEADS", 2, "MODEL.VIT.PATCH_SIZE", 8,
        "MODEL.VIT.IMG_SIZE", 32, "MODEL.VIT.DROP_PATH_RATE", 0.2, "MODEL.VIT.ACTIVATION_CHECKPOINTING", checkpointing,
        "MODEL.VIT_ADAPTER.CONV_INPLANES", 8, "MODEL.VIT_ADAPTER.DEFORM_NUM_HEADS", 2,
        "MODEL.VIT_ADAPTER.DROP_PATH_RATE", 0.2,
        # no zero init: every adapter branch (injector gamma, extractors) carries gradient at once
        "MODEL.VIT_ADAPTER.ZERO_INIT", False))


def _images(b=2, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, size, size, generator=g)


def _grid_superpixels(b=2, size=32, cell=8):
    idx = torch.arange(size) // cell
    sp = idx[:, None] * (size // cell) + idx[None, :]
    return sp.expand(b, size, size).contiguous()


def _scalar(out):
    """A loss that reads every tensor output with fixed random weights."""
    tensors = []

    def collect(o):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            tensors.append(o)
        elif isinstance(o, dict):
            for k in sorted(o):
                collect(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)

    collect(out)
    g = torch.Generator().manual_seed(2)
    return sum((t * torch.randn(t.shape, generator=g)).sum() for t in tensors)


FAMILIES = {
    "cast": (_cast_encoder, lambda m: m(_images(), _grid_superpixels()), lambda m: m.blocks[0]),
    "vit": (_vit, lambda m: m(_images()), lambda m: m.vit.blocks[0]),
    "vit_adapter": (_adapter, lambda m: m(_images()), lambda m: m.vit.blocks[0]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpointed_step_equals_plain_step(family):
    build, run, first_block = FAMILIES[family]
    torch.manual_seed(0)
    plain = build(False).train()
    ckpt = build(True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "ckpt": 0}
    first_block(plain).register_forward_pre_hook(lambda *a: calls.__setitem__("plain", calls["plain"] + 1))
    first_block(ckpt).register_forward_pre_hook(lambda *a: calls.__setitem__("ckpt", calls["ckpt"] + 1))

    losses, grads = {}, {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        torch.manual_seed(3)  # same dropout / drop-path draws
        loss = _scalar(run(model))
        loss.backward()
        losses[name] = loss.detach()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # the first block ran once in the plain step; with checkpointing once more in the backward pass
    assert calls == {"plain": 1, "ckpt": 2}
    assert torch.allclose(losses["plain"], losses["ckpt"], rtol=1e-6, atol=1e-6)
    assert grads["plain"].keys() == grads["ckpt"].keys() and len(grads["plain"]) > 10
    for n, g in grads["plain"].items():
        assert torch.allclose(g, grads["ckpt"][n], rtol=1e-5, atol=1e-6), n
    # not a vacuous comparison (a block whose residual branches drop path removed gets none)
    nonzero = [n for n, g in grads["plain"].items() if bool(g.abs().sum() > 0)]
    assert len(nonzero) >= 0.75 * len(grads["plain"])


def test_no_recomputation_without_gradients():
    """Evaluation, the OAP teacher and the MoCo momentum encoder run under no_grad: nothing is
    checkpointed (the blocks run once)."""
    model = _vit(True).eval()
    calls = []
    model.vit.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(_images())
    assert len(calls) == 1
