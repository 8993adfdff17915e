"""SGD steps with 2 processes (gloo, DistributedDataParallel as HisegTrainer builds it) against
1 process holding both processes' inputs, for CASTMoCo, CASTSemanticSegmentor and OAPSegmentor,
plus the synchronised BatchNorms against full-batch BatchNorm.

Setup shared by the models: the reference model is built in this process with seed 0; in the
group, rank 0 loads the reference's initial weights and rank 1 is built with another seed and
loads nothing, so equal results also prove that DistributedDataParallel's start-up broadcast
gives rank 1 rank 0's weights, the momentum encoder / teacher (not trained, not in DDP's
buckets) included. The inputs are mapped once here (random augmentation drawn once) and rank r
takes the r-th block of them: the same data order on both sides. Randomness inside the models
is switched off (CAST's pooling dropout) or made the same on both sides (OAP's point sampling).
Each tensor is compared by ``max|a - b| <= TOL * max(1, max|b|)``.

Relations checked (one per model; ``L_r`` is the loss rank r computes, W = 2 processes):

* CASTMoCo (MoCo-v3): keys gathered from all processes, every BatchNorm synchronised (MoCo-v3
  converts its whole model to SyncBN): batch-separable up to the normalisation, so
  ``mean_r L_r`` equals the 1-process loss of the 2b-batch, and gradients (DDP's mean) and
  weights, momentum encoder and BatchNorm running statistics included, equal the 1-process ones.
* CASTSemanticSegmentor (``HEAD_NORM: BN``, detectron2's / mmseg's per-GPU BatchNorm, and the
  loss a mean over each process's labelled pixels): *not* batch-separable. Exact relation: the
  2-process step equals the 1-process step on the 2b-batch cut into W "ghost batches" of b,
  each run through the model on its own (BatchNorm statistics and pixel mean per ghost batch),
  the losses averaged: ``L_r`` = the r-th ghost-batch loss, gradients = gradient of their mean,
  and the BatchNorm running statistics of rank r = those the reference accumulates over ghost
  batch r (kept per ghost batch; ``broadcast_buffers=False`` keeps them per rank).
* OAPSegmentor: teacher EMA of an identical student on every rank, OAP pseudo-masks per image
  on each rank inside the step, the DINO centre from the teacher outputs of all processes
  (all-reduced), and every loss normaliser global (matched masks, objectness weights, views with
  a match; all-reduced / W): ``mean_r`` of each loss equals the 1-process loss of the 2-image
  batch, and gradients, student, teacher and centre are equal. Point sampling of the mask losses
  is random per mask; both sides use one fixed set of points instead.

SyncBN (2 processes x batch 3 vs 1 x 6, by the module): CASTMoCo's ``SyncBatchNorm1d`` (projector,
affine-free last layer) and ``SyncBatchNorm2d`` (the CAST stem), and ``PixelHead``'s SyncBN
(pixel-weighted token statistics, and ``SyncBatchNorm2d`` on a grid) give the full-batch
BatchNorm's outputs, input gradients, parameter gradients and running statistics.
"""
import contextlib

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

import hiseg.data  # noqa: F401  (registers datasets)
from distributed_helpers import run_group
from helpers import add_all_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = 2
STEPS = 3
LR = 0.05
#: measured max relative deviation on this machine: see each test's assertion message
TOL = {"moco": 1e-9, "semantic": 1e-5, "oap": 1e-4, "syncbn": 1e-5}

MOCO_CFG = "configs/CAST/quick/moco_cast_tiny_skimage_cpu.yaml"
SEM_CFG = "configs/CAST/quick/semseg_cast_tiny_voc_cpu.yaml"
OAP_CFG = "configs/OAP/quick/oap_vit_tiny_coco_sample_cpu.yaml"
MOCO_OPTS = ["MODEL.CAST.EMBED_DIM", 48, "MODEL.MOCO.MLP_DIM", 64, "MODEL.MOCO.DIM", 32,
             "INPUT.CROP.SIZE", [64, 64], "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", 49,
             "MODEL.CAST.NUM_SEGMENTS", [16, 8, 4, 2], "MODEL.CAST.POOL_DROPOUT", 0.0, "SOLVER.MAX_ITER", 10]
SEM_OPTS = ["INPUT.CROP.SIZE", (64, 64), "INPUT.MIN_SIZE_TRAIN", (96,), "MODEL.CAST.POOL_DROPOUT", 0.0,
            "MODEL.CAST.NUM_SEGMENTS", [16, 8, 4, 2], "MODEL.CAST_SEM_SEG.HEAD_DIM", 32]
OAP_OPTS = ["SOLVER.MAX_ITER", 10]


def make_cfg(kind):
    cfg = get_cfg()
    add_all_configs(cfg)
    path, opts = {"moco": (MOCO_CFG, MOCO_OPTS), "semantic": (SEM_CFG, SEM_OPTS), "oap": (OAP_CFG, OAP_OPTS)}[kind]
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def fixed_point_coords(mask_logits, num_points, oversample_ratio, importance_sample_ratio):
    """Stands in for OAP's random point sampling of the mask losses: one fixed set of points."""
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(1, num_points, 2, generator=g).to(mask_logits.device)
    return pts.expand(mask_logits.shape[0], -1, -1).contiguous()


def _bn_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _bn_state(model):
    return {n: [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
            for n, m in _bn_modules(model) if m.track_running_stats}


def _set_bn_state(model, state):
    """New buffer tensors (not in-place copies: an earlier chunk's graph still holds the old)."""
    for n, m in _bn_modules(model):
        if n in state:
            m.running_mean, m.running_var, m.num_batches_tracked = (v.clone() for v in state[n])


def sgd_steps(model, chunks, steps, lr):
    """``steps`` SGD steps; each step runs the model once per chunk of inputs (one chunk: a
    plain step) and averages the chunks' losses, with BatchNorm running statistics kept per chunk.
    Returns per-step loss dicts (a list per chunk), the gradients of the first step, the final
    state dict and the BatchNorm statistics per chunk."""
    module = model.module if hasattr(model, "module") else model
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for _, p in params], lr=lr, momentum=0.9)
    bn = [_bn_state(module) for _ in chunks]
    losses, grads = [], None
    with EventStorage(0) as storage:
        for it in range(steps):
            storage.iter = it
            per_chunk, total = [], 0.0
            for c, chunk in enumerate(chunks):
                _set_bn_state(module, bn[c])
                out = model(chunk)
                bn[c] = _bn_state(module)
                per_chunk.append({k: float(v.detach()) for k, v in out.items()})
                total = total + sum(out.values()) / len(chunks)
            opt.zero_grad()
            total.backward()
            if it == 0:
                missing = [n for n, p in params if p.grad is None]
                assert not missing, f"trainable parameters without a gradient (DDP would stop): {missing[:5]}"
                grads = {n: p.grad.detach().clone() for n, p in params}
            opt.step()
            losses.append(per_chunk)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"losses": losses, "grads": grads, "state": state, "bn": bn}


@contextlib.contextmanager
def model_dtype(kind):
    """float64 for CASTMoCo: at initialisation the class tokens of different images are nearly
    equal, so the projector's BatchNorm over a batch of 4 divides by a tiny standard deviation and
    amplifies float32 rounding (1e-7) to 1e-4 in the gradients and far more after a few steps;
    in float64 the comparison is about the algorithm, not the rounding. float32 for the others."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if kind == "moco" else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _build(kind, init_state, seed):
    torch.manual_seed(seed)
    model = build_model(make_cfg(kind))
    if init_state is not None:
        model.load_state_dict(init_state)
    return model.train()


def train_worker(spec_file, steps=STEPS, lr=LR):
    """One rank: every model of the spec, wrapped as HisegTrainer wraps it, its block of inputs."""
    import hiseg_oap.modeling.criterion as criterion
    from hiseg.engine.trainer import create_ddp_model

    criterion.uncertain_point_coords = fixed_point_coords
    spec = torch.load(spec_file, weights_only=False)
    rank, world = comm.get_rank(), comm.get_world_size()
    out = {}
    for kind, (init_state, inputs) in spec.items():
        b = len(inputs) // world
        with model_dtype(kind):
            model = _build(kind, init_state if rank == 0 else None, seed=100 + rank)
            ddp = create_ddp_model(model, broadcast_buffers=False)
            assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
            out[kind] = sgd_steps(ddp, [inputs[rank * b:(rank + 1) * b]], steps, lr)
    out["syncbn"] = syncbn_worker()
    return out


# --------------------------------------------------------------------------------------------
# inputs, reference and the group (one group for the three models)
# --------------------------------------------------------------------------------------------
def _moco_inputs():
    from hiseg_cast.data.dataset_mappers import MoCoTwoViewMapper

    np.random.seed(0)
    torch.manual_seed(0)
    mapper = MoCoTwoViewMapper(make_cfg("moco"), True)
    return [mapper(d) for d in DatasetCatalog.get("skimage_natural_images")[:4]]


def _semantic_inputs(shared_data, root):
    """Four 64 x 64 crops (two per real VOC sample image), with their label maps."""
    from scipy.io import loadmat
    from PIL import Image

    from hiseg_cast.data.dataset_mappers import CASTDatasetMapper

    sbd = shared_data / "voc_samples" / "sbd_bench" / "datadir"
    dicts = []
    for image_id in ("2008_000051", "2008_000195"):
        lab = loadmat(sbd / "cls" / f"{image_id}.mat")["GTcls"][0, 0]["Segmentation"].astype(np.uint8)
        lab[:3] = 255
        png = root / f"{image_id}.png"
        Image.fromarray(lab).save(png)
        w, h = Image.open(sbd / "img" / f"{image_id}.jpg").size
        dicts.append({"file_name": str(sbd / "img" / f"{image_id}.jpg"), "sem_seg_file_name": str(png),
                      "height": h, "width": w, "image_id": image_id})
    np.random.seed(0)
    mapper = CASTDatasetMapper(make_cfg("semantic"), True)
    return [mapper(dict(d)) for d in dicts for _ in range(2)]


def _oap_inputs(root):
    from train_check import oap_skimage_batch

    return oap_skimage_batch(make_cfg("oap"), root)


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    """The inputs and initial weights, the 2-process group's results and the references."""
    import hiseg_oap.modeling.criterion as criterion

    root = tmp_path_factory.mktemp("dist_train")
    inputs = {"moco": _moco_inputs(), "semantic": _semantic_inputs(shared_data, root), "oap": _oap_inputs(root)}
    init = {}
    for kind in inputs:
        with model_dtype(kind):
            init[kind] = {k: v.clone() for k, v in _build(kind, None, seed=0).state_dict().items()}
    spec_file = str(root / "spec.pt")
    torch.save({kind: (init[kind], inputs[kind]) for kind in inputs}, spec_file)
    group = run_group(train_worker, WORLD, (spec_file,))
    saved, criterion.uncertain_point_coords = criterion.uncertain_point_coords, fixed_point_coords
    try:
        ref = {}
        for kind, batch in inputs.items():
            b = len(batch) // WORLD
            chunks = [batch[r * b:(r + 1) * b] for r in range(WORLD)] if kind == "semantic" else [batch]
            with model_dtype(kind):
                ref[kind] = sgd_steps(_build(kind, init[kind], seed=0), chunks, STEPS, LR)
    finally:
        criterion.uncertain_point_coords = saved
    return {"group": group, "ref": ref, "init": init}


def rel_err(a, b):
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def max_rel(d1, d2, keys=None):
    keys = sorted(d2) if keys is None else keys
    worst = max(((rel_err(d1[k], d2[k]), k) for k in keys if d2[k].is_floating_point()), default=(0.0, ""))
    return worst


def _check_common(kind, runs):
    group, ref, init = [r[kind] for r in runs["group"]], runs["ref"][kind], runs["init"][kind]
    tol = TOL[kind]
    # DDP's gradients are the same on every rank, and the training moved the weights
    g = group[0]["grads"]
    assert all(torch.equal(g[k], group[1]["grads"][k]) for k in g)
    moved = [k for k in ref["state"] if ref["state"][k].is_floating_point()
             and not torch.equal(ref["state"][k], init[k])]
    assert len(moved) > 10
    err, key = max_rel(g, ref["grads"])
    print(f"{kind}: first-step gradients max rel. deviation {err:.2e} ({key})")
    assert err <= tol, (kind, "gradients", key, err)
    params = [n for n in ref["grads"]]
    err, key = max_rel(group[0]["state"], ref["state"])
    print(f"{kind}: final state max rel. deviation {err:.2e} ({key})")
    assert err <= tol or kind == "semantic", (kind, "state", key, err)
    for r in range(1, WORLD):  # every rank holds the same trained weights
        assert max_rel(group[r]["state"], group[0]["state"], params)[0] == 0.0
    return group, ref, tol


def test_moco_two_processes_equal_one_process_full_batch(runs):
    group, ref, tol = _check_common("moco", runs)
    for it in range(STEPS):
        mean = np.mean([g["losses"][it][0]["loss_moco"] for g in group])
        assert mean == pytest.approx(ref["losses"][it][0]["loss_moco"], rel=tol), it
    # momentum encoder and SyncBN running statistics (state above) also on rank 1
    for key in ("momentum_projector.1.running_mean", "projector.1.running_var",
                "momentum_backbone.encoder.stem.proj.0.weight", "backbone.encoder.stem.proj.1.running_var"):
        assert key in ref["state"], key
        assert rel_err(group[1]["state"][key], ref["state"][key]) <= tol, key


def test_semantic_two_processes_equal_ghost_batches_of_one_process(runs):
    group, ref, tol = _check_common("semantic", runs)
    for it in range(STEPS):
        for r in range(WORLD):
            assert group[r]["losses"][it][0]["loss_sem_seg"] == pytest.approx(
                ref["losses"][it][r]["loss_sem_seg"], rel=tol), (it, r)
    bn = ref["bn"]
    assert bn[0].keys() and not all(torch.equal(bn[0][k][0], bn[1][k][0]) for k in bn[0])
    params = {k: v for k, v in ref["state"].items() if not any(k.startswith(n + ".running") or
                                                               k.startswith(n + ".num_batches") for n in bn[0])}
    err, key = max_rel(group[0]["state"], ref["state"], sorted(params))
    print(f"semantic: final weights max rel. deviation {err:.2e} ({key})")
    assert err <= tol, key
    for r in range(WORLD):
        state = group[r]["state"]
        for n, (mean, var, count) in bn[r].items():
            assert rel_err(state[n + ".running_mean"], mean) <= tol, (r, n)
            assert rel_err(state[n + ".running_var"], var) <= tol, (r, n)
            assert int(state[n + ".num_batches_tracked"]) == int(count) == STEPS


def test_oap_two_processes_equal_one_process_full_batch(runs):
    group, ref, tol = _check_common("oap", runs)
    for it in range(STEPS):
        for key, value in ref["losses"][it][0].items():
            mean = np.mean([g["losses"][it][0][key] for g in group])
            assert mean == pytest.approx(value, rel=tol, abs=1e-7), (it, key)
    state = ref["state"]
    assert int(state["teacher_synced"]) == 1 and float(state["criterion.center"].abs().sum()) > 0
    teacher = [k for k in state if k.startswith("teacher.")]
    assert teacher and max_rel(group[1]["state"], state, teacher)[0] <= tol
    assert rel_err(group[1]["state"]["criterion.center"], state["criterion.center"]) <= tol


# --------------------------------------------------------------------------------------------
# SyncBN against full-batch BN (run in the same group)
# --------------------------------------------------------------------------------------------


def _syncbn_cases():
    """(name, module factory, inputs of a 6-sample batch, forward(module, *inputs))."""
    from hiseg_cast.modeling.heads import PixelHead
    from hiseg.modeling.sync_batchnorm import SyncBatchNorm1d, SyncBatchNorm2d

    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    # the last input: the gradient of the loss w.r.t. the output, drawn for the full batch
    return [
        ("bn1d_projector", lambda: SyncBatchNorm1d(8), (r(6, 8, scale=2, shift=3), r(6, 8)), lambda m, x: m(x)),
        ("bn1d_affine_free", lambda: SyncBatchNorm1d(8, affine=False), (r(6, 8, shift=-2), r(6, 8)),
         lambda m, x: m(x)),
        ("bn2d_stem", lambda: SyncBatchNorm2d(4), (r(6, 4, 5, 7, shift=1), r(6, 4, 5, 7)), lambda m, x: m(x)),
        ("pixel_head_tokens", lambda: PixelHead(8, 6, 3, "SyncBN"),
         (r(6, 5, 8, scale=3, shift=1), torch.randint(1, 9, (6, 5), generator=g), r(6, 5, 3)),
         lambda m, x, w: m.forward_tokens(x, w)),
        ("pixel_head_grid", lambda: PixelHead(8, 6, 3, "SyncBN"), (r(6, 8, 4, 4), r(6, 3, 4, 4)),
         lambda m, x: m.forward_grid(x)),
    ]


def _syncbn_run(factory, inputs, forward):
    torch.manual_seed(0)
    m = factory().train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    x = inputs[0].clone().requires_grad_(True)
    y = forward(m, x, *inputs[1:-1])
    (y * inputs[-1]).sum().backward()
    bufs = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return {"y": y.detach(), "dx": x.grad, "bufs": bufs, "grads": grads}


def syncbn_worker():
    rank, world = comm.get_rank(), comm.get_world_size()
    out = {}
    for name, factory, inputs, forward in _syncbn_cases():
        b = inputs[0].shape[0] // world
        out[name] = _syncbn_run(factory, [t[rank * b:(rank + 1) * b] for t in inputs], forward)
    return out


def test_syncbn_equals_full_batch_batchnorm(runs):
    """Outputs and input gradients per block, running statistics, and the parameter gradients
    summed over processes (what DDP averages, times W; here the loss is a sum) equal full batch."""
    group = [r["syncbn"] for r in runs["group"]]
    worst = 0.0
    for name, factory, inputs, forward in _syncbn_cases():
        ref = _syncbn_run(factory, inputs, forward)
        y = torch.cat([g[name]["y"] for g in group])
        dx = torch.cat([g[name]["dx"] for g in group])
        errs = [rel_err(y, ref["y"]), rel_err(dx, ref["dx"])]
        for k in ref["bufs"]:
            errs += [rel_err(g[name]["bufs"][k], ref["bufs"][k]) for g in group]
        for k in ref["grads"]:
            errs.append(rel_err(sum(g[name]["grads"][k] for g in group), ref["grads"][k]))
        assert max(errs) <= TOL["syncbn"], (name, errs)
        worst = max(worst, max(errs))
    # per-process statistics would not pass: the blocks' own BatchNorm differs from full batch's
    name, _, inputs, _ = _syncbn_cases()[0]
    x = inputs[0]
    own = torch.cat([torch.nn.functional.batch_norm(x[i:i + 3], None, None, training=True) for i in (0, 3)])
    full = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert rel_err(own, full) > 100 * TOL["syncbn"]
    print(f"syncbn: max rel. deviation {worst:.2e}")
