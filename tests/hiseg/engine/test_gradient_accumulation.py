"""SOLVER.ACCUMULATION_STEPS: N micro-batches of B images = one batch of N * B where that is the
same computation (tiny ViT + Semantic FPN with GroupNorm, no BatchNorm), counted as one iteration;
refused with one line where it is not (MoCo, OAP, SyncBN)."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from hiseg.errors import ConfigError
from helpers import add_all_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATASET = "accumulation_test_synthetic_sem_seg"


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    """8 random 32x32 images with random 3-class label maps (every pixel labelled)."""
    root = tmp_path_factory.mktemp("accum_data")
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        img, lab = root / f"{i}.png", root / f"{i}_label.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
        Image.fromarray(rng.integers(0, 3, (32, 32), dtype=np.uint8)).save(lab)
        records.append({"file_name": str(img), "sem_seg_file_name": str(lab), "height": 32, "width": 32,
                        "image_id": i})
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    DatasetCatalog.register(DATASET, lambda: [dict(r) for r in records])
    MetadataCatalog.get(DATASET).set(stuff_classes=["a", "b", "c"], ignore_label=255, evaluator_type="sem_seg")
    yield DATASET
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def _cfg(out_dir, *opts):
    cfg = add_all_configs(get_cfg())
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "SemanticSegmentor",
        "MODEL.BACKBONE.NAME", "build_vit_backbone", "MODEL.VIT.EMBED_DIM", 16, "MODEL.VIT.DEPTH", 1,
        "MODEL.VIT.NUM_HEADS", 2, "MODEL.VIT.PATCH_SIZE", 8, "MODEL.VIT.IMG_SIZE", 32,
        "MODEL.VIT.OUT_FEATURES", ["p2", "p3"], "MODEL.VIT.OUT_CHANNELS", 32,
        "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p2", "p3"], "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
        "MODEL.SEM_SEG_HEAD.NORM", "GN", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3,
        "DATASETS.TRAIN", (DATASET,), "DATASETS.TEST", (), "DATALOADER.NUM_WORKERS", 0,
        "INPUT.MIN_SIZE_TRAIN", (32,), "INPUT.MAX_SIZE_TRAIN", 32, "INPUT.RANDOM_FLIP", "none",
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", 0.1, "SOLVER.MOMENTUM", 0.9, "SOLVER.WARMUP_ITERS", 2,
        "SOLVER.WARMUP_FACTOR", 0.5, "SOLVER.IMS_PER_BATCH", 4, "SOLVER.MAX_ITER", 1,
        "SOLVER.CHECKPOINT_PERIOD", 1000, "SEED", 1, "OUTPUT_DIR", str(out_dir), *opts])
    return cfg


def _train(cfg):
    from hiseg.engine import HisegTrainer

    torch.manual_seed(0)
    np.random.seed(0)  # the training sampler's seed (detectron2 draws it from NumPy)
    trainer = HisegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    trainer.train()
    return trainer, seen


def test_accumulated_step_equals_one_large_batch(synthetic_dataset, tmp_path):
    big, seen_big = _train(_cfg(tmp_path / "big"))
    acc, seen_acc = _train(_cfg(tmp_path / "acc", "SOLVER.ACCUMULATION_STEPS", 2))
    assert seen_big == [4] and seen_acc == [2, 2]  # IMS_PER_BATCH stays the total batch of one step
    assert big.iter == acc.iter == 1  # one iteration = one optimizer step
    params_big = dict(big.model.named_parameters())
    n_close = 0
    for name, p in acc.model.named_parameters():
        q = params_big[name]
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name  # the step's gradient
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name  # the weights after the SGD step
        n_close += 1
    assert n_close > 10
    # the weights moved (the comparison is not between two untouched models)
    fresh = _cfg(tmp_path / "fresh")
    from hiseg.engine import HisegTrainer

    torch.manual_seed(0)
    untouched = HisegTrainer.build_model(fresh)
    moved = [n for n, p in untouched.named_parameters() if not torch.allclose(p, params_big[n])]
    assert len(moved) > 10


def test_iterations_and_schedule_count_optimizer_steps(synthetic_dataset, tmp_path):
    cfg = _cfg(tmp_path, "SOLVER.ACCUMULATION_STEPS", 2, "SOLVER.MAX_ITER", 3)
    steps = []
    from hiseg.engine import HisegTrainer

    torch.manual_seed(0)
    np.random.seed(0)  # the training sampler's seed (detectron2 draws it from NumPy)
    trainer = HisegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    seen = []
    trainer.model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: steps.append(opt.param_groups[0]["lr"]))
    trainer.train()
    assert seen == [2] * 6  # 3 iterations x 2 micro-batches of 2
    assert len(steps) == 3 and trainer.iter == 3
    # linear warm-up over 2 optimizer steps from factor 0.5: lr 0.05, 0.075, then 0.1
    assert steps == pytest.approx([0.05, 0.075, 0.1])
    assert trainer.scheduler.last_epoch == 3


def test_refusals_are_one_line_config_errors():
    from hiseg.engine.accumulation import check_accumulation, check_model_accumulation
    from hiseg.modeling.sync_batchnorm import SyncBatchNorm2d

    cfg = add_all_configs(get_cfg())
    cfg.merge_from_file("configs/CAST/moco_cast_s_in1k.yaml")
    cfg.SOLVER.ACCUMULATION_STEPS = 2
    with pytest.raises(ConfigError, match=r"not supported by CASTMoCo: MoCo's InfoNCE takes each query's negatives"):
        check_accumulation(cfg, 1)
    cfg = add_all_configs(get_cfg())
    cfg.merge_from_file("configs/OAP/oap_vit_b8_in1k.yaml")
    cfg.SOLVER.ACCUMULATION_STEPS = 4
    with pytest.raises(ConfigError, match=r"not supported by OAPSegmentor: the teacher EMA"):
        check_accumulation(cfg, 1)
    cfg = add_all_configs(get_cfg())
    cfg.merge_from_file("configs/CAST/mask_rcnn_cast_s_fpn_coco.yaml")  # batch 16: accepted
    cfg.SOLVER.ACCUMULATION_STEPS = 8
    check_accumulation(cfg, 1)
    check_accumulation(cfg, 2)
    with pytest.raises(ConfigError, match=r"IMS_PER_BATCH 16 .* not divisible by SOLVER.ACCUMULATION_STEPS 8 x 4"):
        check_accumulation(cfg, 4)
    cfg.SOLVER.ACCUMULATION_STEPS = 0
    with pytest.raises(ConfigError, match=">= 1"):
        check_accumulation(cfg, 1)
    cfg.SOLVER.ACCUMULATION_STEPS = 2
    with pytest.raises(ConfigError, match="synchronised BatchNorm"):
        check_model_accumulation(cfg, torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), SyncBatchNorm2d(4)))
    check_model_accumulation(cfg, torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)))


class _TinyNet(torch.nn.Module):
    """A loss-dict model on dict inputs ``{"x": (4,), "y": (1,)}`` (mean squared error)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        y = torch.stack([d["y"] for d in batch])
        return {"loss_mse": ((self.net(x) - y) ** 2).mean()}


def _tiny_batches(n_images, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, generator=g), "y": torch.randn(1, generator=g)} for _ in range(n_images)]


def _ddp_accumulation_worker(per_rank_micro_batches):
    """One accumulated step of the tiny net under DDP (gloo); the gradients, weights and the
    number of gradient all-reduce calls."""
    import torch.distributed as dist
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from hiseg.engine.accumulation import AccumulatingTrainer
    from hiseg.engine.trainer import create_ddp_model

    torch.manual_seed(0)
    model = _TinyNet()
    ddp = create_ddp_model(model)
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return allreduce_hook(dist.group.WORLD, bucket)

    ddp.register_comm_hook(None, counting_hook)
    mine = per_rank_micro_batches[comm.get_rank()]
    trainer = AccumulatingTrainer(ddp, mine, torch.optim.SGD(model.parameters(), lr=0.1), len(mine))
    with EventStorage(0):
        trainer.iter = 0
        trainer.run_step()
    return ({n: p.grad.clone() for n, p in model.named_parameters()},
            {n: p.detach().clone() for n, p in model.named_parameters()}, len(calls))


def test_ddp_accumulation_equals_one_process_full_batch():
    """2 processes x 2 micro-batches of 2 = one process with the batch of 8; the gradients are
    all-reduced once per optimizer step (no_sync before the last micro-batch)."""
    from distributed_helpers import run_group

    data = _tiny_batches(8)
    per_rank = [[data[0:2], data[2:4]], [data[4:6], data[6:8]]]
    results = run_group(_ddp_accumulation_worker, 2, (per_rank,))
    torch.manual_seed(0)
    ref = _TinyNet()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref(data)["loss_mse"].backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    opt.step()
    for grads, weights, n_allreduce in results:
        assert n_allreduce == 1  # one bucket, reduced once
        for n, p in ref.named_parameters():
            assert torch.allclose(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7), n
            assert torch.allclose(weights[n], p.detach(), rtol=1e-5, atol=1e-7), n
