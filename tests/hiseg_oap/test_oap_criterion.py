"""Tests of OAP's training losses: DINO head, Dice matcher and the criterion (OAP Sec. 4.3, 5.1).

All on CPU with tiny hand-made tensors.
"""
import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_oap.modeling.criterion import OAPCriterion, dice_loss, sigmoid_ce_loss, uncertain_point_coords
from hiseg_oap.modeling.dino_head import DINOHead
from hiseg_oap.modeling.matcher import DiceMatcher, point_sample


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def logits_of(masks, scale=30.0):
    """Confident logits that reproduce bool ``masks``."""
    return scale * (2.0 * masks.float() - 1.0)


def rand_masks(n, h, w, p=0.5):
    return torch.rand(n, h, w) < p


def level(masks, codes):
    return {"masks": masks, "codes": codes}


def view(sem_masks, sem_codes, ins_masks, ins_codes):
    return {"semantic": level(sem_masks, sem_codes), "instance": level(ins_masks, ins_codes)}


def empty_level(h, w, k):
    return level(torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0, k))


def make_criterion(s=2, i=3, k=6, **kw):
    kw.setdefault("num_points", 64)
    return OAPCriterion(num_sem_queries=s, num_ins_queries=i, out_dim=k, **kw)


def exact_dice_cost(logits, tgt):
    """Independent numpy reference of ``1 - (2 sum p t + 1) / (sum p + sum t + 1)``."""
    p = 1.0 / (1.0 + np.exp(-logits.reshape(logits.shape[0], -1).double().numpy()))
    t = tgt.reshape(tgt.shape[0], -1).double().numpy()
    cost = np.zeros((p.shape[0], t.shape[0]))
    for a in range(p.shape[0]):
        for b in range(t.shape[0]):
            cost[a, b] = 1 - (2 * (p[a] * t[b]).sum() + 1) / (p[a].sum() + t[b].sum() + 1)
    return cost


def sd_reference(student, teacher, center, ts=0.1, tt=0.04):
    p_t = torch.softmax((teacher.double() - center.double()) / tt, -1)
    return -(p_t * torch.log_softmax(student.double() / ts, -1)).sum(-1)


# ---------------------------------------------------------------------------------- DINO head
def test_dino_head_shapes_and_layers():
    head = DINOHead(16, out_dim=10, hidden_dim=32, bottleneck_dim=8, num_layers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    assert head(torch.randn(5, 16)).shape == (5, 10)
    assert head(torch.randn(0, 16)).shape == (0, 10)
    assert head(torch.randn(2, 3, 16)).shape == (2, 3, 10)
    one = DINOHead(16, out_dim=10, hidden_dim=32, bottleneck_dim=8, num_layers=1)
    assert [type(m) for m in one.mlp] == [torch.nn.Linear] and one.mlp[0].out_features == 8
    with pytest.raises(ValueError, match="in_dim"):
        head(torch.randn(5, 15))
    with pytest.raises(ValueError, match="num_layers"):
        DINOHead(16, num_layers=0)


def test_dino_head_logits_are_cosines_and_g_is_frozen():
    head = DINOHead(16, out_dim=10, hidden_dim=32, bottleneck_dim=8)
    assert torch.all(head.weight_g == 1) and not head.weight_g.requires_grad
    # weight-normalised prototypes of unit norm and an L2-normalised input: |logit| <= 1
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    out = head(torch.randn(7, 16))
    assert out.abs().max() <= 1 + 1e-5
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    v0 = head.weight_v.detach().clone()
    head(torch.randn(7, 16)).pow(2).sum().backward()
    opt.step()
    assert torch.all(head.weight_g == 1) and not torch.equal(head.weight_v, v0)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    teacher = copy.deepcopy(head)  # the EMA teacher is a deep copy
    x = torch.randn(3, 16)
    assert torch.equal(teacher(x), head(x))
    free = DINOHead(16, out_dim=10, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    assert free.weight_g.requires_grad and torch.all(free.weight_g == 1)


# ------------------------------------------------------------------------------------ matcher
def test_point_sample_reads_pixel_centres():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    ii, jj = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    coords = torch.stack([(jj.flatten() + 0.5) / 4, (ii.flatten() + 0.5) / 3], -1)[None]
    assert torch.allclose(point_sample(x, coords)[0, 0], torch.arange(12.0), atol=1e-5)
    # border padding: a constant map is that constant everywhere, corners included
    corners = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    assert torch.equal(point_sample(torch.ones(1, 1, 3, 4), corners), torch.ones(1, 1, 3))


def test_matcher_recovers_permutation():
    tgt = rand_masks(5, 8, 8)
    perm = torch.tensor([3, 0, 4, 1, 2])
    pred_idx, tgt_idx = DiceMatcher()(logits_of(tgt[perm]), tgt)
    assert pred_idx.tolist() == [0, 1, 2, 3, 4] and tgt_idx.tolist() == perm.tolist()
    assert pred_idx.dtype == tgt_idx.dtype == torch.int64


def test_matcher_recovers_permutation_with_point_sampling():
    # 64 x 64 = 4096 pixels > 512 points: the cost is computed on random points
    tgt = F.interpolate(rand_masks(4, 8, 8).float()[None], size=(64, 64), mode="nearest")[0] > 0.5
    perm = torch.tensor([2, 3, 1, 0])
    pred_idx, tgt_idx = DiceMatcher(num_points=512)(logits_of(tgt[perm]), tgt)
    assert pred_idx.tolist() == [0, 1, 2, 3] and tgt_idx.tolist() == perm.tolist()


def test_matcher_more_targets_than_queries():
    tgt = rand_masks(4, 8, 8)
    pred_idx, tgt_idx = DiceMatcher()(logits_of(tgt[[3, 1]]), tgt)
    assert pred_idx.tolist() == [0, 1] and tgt_idx.tolist() == [3, 1]


def test_matcher_more_queries_than_targets():
    tgt = rand_masks(2, 8, 8)
    pred = torch.full((5, 8, 8), -30.0)  # empty predictions
    pred[4], pred[1] = logits_of(tgt[0]), logits_of(tgt[1])
    pred_idx, tgt_idx = DiceMatcher()(pred, tgt)
    assert pred_idx.tolist() == [1, 4] and tgt_idx.tolist() == [1, 0]  # sorted by prediction


def test_matcher_no_targets_or_no_queries():
    for q, t in ((4, 0), (0, 3), (0, 0)):
        pred_idx, tgt_idx = DiceMatcher()(torch.randn(q, 5, 5), rand_masks(t, 5, 5))
        assert pred_idx.numel() == tgt_idx.numel() == 0 and pred_idx.dtype == torch.int64


def test_matcher_cost_and_brute_force():
    for trial in range(5):
        q, t = (4, 3) if trial % 2 == 0 else (3, 4)
        pred = 2 * torch.randn(q, 6, 6)
        tgt = rand_masks(t, 6, 6)
        matcher = DiceMatcher()
        cost = exact_dice_cost(pred, tgt)
        assert np.allclose(matcher.cost(pred, tgt).numpy(), cost, atol=1e-5)
        pred_idx, tgt_idx = matcher(pred, tgt)
        assert len(pred_idx) == min(q, t)
        got = cost[pred_idx.numpy(), tgt_idx.numpy()].sum()
        if q >= t:  # each target to a distinct query
            best = min(sum(cost[p, j] for j, p in enumerate(ps)) for ps in itertools.permutations(range(q), t))
        else:  # each query to a distinct target
            best = min(sum(cost[i, p] for i, p in enumerate(ps)) for ps in itertools.permutations(range(t), q))
        assert got == pytest.approx(best, abs=1e-9)


def test_matcher_rejects_bad_input():
    m = DiceMatcher()
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(2, 5, 5), rand_masks(2, 6, 5))
    with pytest.raises(ValueError, match="bool"):
        m(torch.randn(2, 5, 5), torch.rand(2, 5, 5))
    with pytest.raises(ValueError, match="pred_masks"):
        m(torch.randn(5, 5), rand_masks(2, 5, 5))
    with pytest.raises(ValueError, match="non-finite"):
        m(torch.full((2, 5, 5), float("nan")), rand_masks(2, 5, 5))
    with pytest.raises(ValueError, match="num_points"):
        DiceMatcher(num_points=0)


# ------------------------------------------------------------------------------ criterion: matching
def test_matching_is_per_level():
    s, i, h, w, k = 2, 2, 8, 8, 4
    crit = make_criterion(s, i, k)
    sem_t, ins_t = rand_masks(1, h, w), rand_masks(1, h, w)
    pred = torch.full((1, s + i, h, w), -30.0)
    pred[0, 3] = logits_of(sem_t[0])  # an instance query predicts the semantic target perfectly
    pred[0, 0] = logits_of(ins_t[0])  # a semantic query predicts the instance target perfectly
    targets = [view(sem_t, torch.randn(1, k), ins_t, torch.randn(1, k))]
    (q, t), = crit.match(pred, targets)
    # a joint matching would pair (3, sem) and (0, ins) at ~0 cost; per level it cannot
    assert t.tolist() == [0, 1] and q[0].item() in (0, 1) and q[1].item() in (2, 3)
    # random cases: pairs never cross levels; instance indices are offset by S / Ts
    for _ in range(5):
        ts, ti = int(torch.randint(0, 4, ())), int(torch.randint(0, 5, ()))
        targets = [view(rand_masks(ts, h, w), torch.randn(ts, k), rand_masks(ti, h, w), torch.randn(ti, k))]
        (q, t), = crit.match(torch.randn(1, s + i, h, w), targets)
        assert torch.equal(q < s, t < ts)
        assert int((q < s).sum()) == min(s, ts) and int((q >= s).sum()) == min(i, ti)
        assert torch.equal(q, q.sort().values)


# ------------------------------------------------------------------------------ criterion: losses
def test_point_losses_hand_values():
    logits, tgt = torch.zeros(1, 4), torch.ones(1, 4)
    assert sigmoid_ce_loss(logits, tgt, 1.0).item() == pytest.approx(math.log(2))
    # p = 0.5: dice = (2 * 2 + 1) / (2 + 4 + 1) = 5 / 7
    assert dice_loss(logits, tgt, 1.0).item() == pytest.approx(2 / 7)
    assert dice_loss(logits.repeat(3, 1), tgt.repeat(3, 1), 2.0).item() == pytest.approx(3 / 2 * 2 / 7)


def test_uncertain_point_coords():
    x = torch.linspace(-5, 5, 32)
    logits = x.expand(32, 32).reshape(1, 1, 32, 32).repeat(2, 1, 1, 1)  # decision boundary at x = 0.5
    pts = uncertain_point_coords(logits, 100, 3.0, 1.0)
    assert pts.shape == (2, 100, 2) and pts.min() >= 0 and pts.max() <= 1
    rnd = uncertain_point_coords(logits, 100, 3.0, 0.0)
    assert (pts[..., 0] - 0.5).abs().mean() < 0.6 * (rnd[..., 0] - 0.5).abs().mean()
    assert uncertain_point_coords(logits, 100, 3.0, 0.75).shape == (2, 100, 2)


def test_mask_losses_exact_on_constant_case():
    # logits 0 everywhere, full target masks: every point has p = 0.5, t = 1 -> BCE = log 2,
    # Dice = 1 - (P + 1) / (1.5 P + 1); normalised by the MATCHED count (1 per view here, though
    # view 0 has 3 semantic targets for its 1 semantic query).
    p_pts, h, w, k = 50, 6, 6, 4
    crit = make_criterion(1, 1, k, num_points=p_pts, mask_weight=1.0, dice_weight=1.0)
    full = torch.ones(3, h, w, dtype=torch.bool)
    targets = [view(full, torch.randn(3, k), torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0, k)),
               view(full[:1], torch.randn(1, k), torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0, k))]
    outputs = {"pred_masks": torch.zeros(2, 2, h, w), "pred_objectness": torch.zeros(2, 2, 2),
               "pred_codes": torch.zeros(2, 2, k)}
    losses = crit(outputs, targets)
    assert losses["loss_mask"].item() == pytest.approx(math.log(2), rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(1 - (p_pts + 1) / (1.5 * p_pts + 1), rel=1e-5)
    # all objectness logits equal: CE = log 2 whatever the class weights
    assert losses["loss_objectness"].item() == pytest.approx(2 * math.log(2), rel=1e-5)


def test_perfect_predictions_small_mask_losses():
    s, i, h, w, k = 1, 2, 32, 32, 4
    tgt = torch.zeros(1, h, w, dtype=torch.bool)
    tgt[0, 8:24, 4:20] = True
    crit = make_criterion(s, i, k, num_points=2000, importance_sample_ratio=0.0, mask_weight=1.0, dice_weight=1.0)
    targets = [view(torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0, k), tgt, torch.randn(1, k))]
    pred = torch.full((1, s + i, h, w), -30.0)
    pred[0, 2] = logits_of(tgt[0])
    obj = torch.zeros(1, s + i, 2)
    good = crit({"pred_masks": pred, "pred_objectness": obj, "pred_codes": torch.zeros(1, 3, k)}, targets)
    pred_bad = pred.clone()
    pred_bad[0, 2] = -pred_bad[0, 2]
    bad = crit({"pred_masks": pred_bad, "pred_objectness": obj, "pred_codes": torch.zeros(1, 3, k)}, targets)
    # bilinear sampling at the boundary of the 16 x 16 square costs a few hundredths of Dice
    assert good["loss_dice"].item() < 0.05 and bad["loss_dice"].item() > 0.9
    assert good["loss_mask"].item() < 0.1 * bad["loss_mask"].item()


def test_objectness_weighted_cross_entropy():
    s, i, h, w, k = 1, 2, 6, 6, 4
    crit = make_criterion(s, i, k, objectness_weight=1.0, no_object_weight=0.1)
    tgt = rand_masks(1, h, w)
    pred = torch.full((1, 3, h, w), -30.0)
    pred[0, 1] = logits_of(tgt[0])  # query 1 (first instance query) matches
    obj = torch.tensor([[[0.0, 2.0], [1.0, -1.0], [3.0, 0.5]]])
    targets = [view(torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0, k), tgt, torch.randn(1, k))]
    losses = crit({"pred_masks": pred, "pred_objectness": obj, "pred_codes": torch.zeros(1, 3, k)}, targets)
    ce = -torch.log_softmax(obj[0], -1)
    expected = (ce[1, 0] + 0.1 * ce[0, 1] + 0.1 * ce[2, 1]) / (1 + 0.1 + 0.1)
    assert losses["loss_objectness"].item() == pytest.approx(expected.item(), rel=1e-5)


def _sd_setup(k=5, reduction="mean", sd_weight=1.0):
    """Two sem + one ins matched pairs in view 0, no target in view 1, one ins pair in view 2."""
    s, i, h, w = 3, 2, 6, 6
    crit = make_criterion(s, i, k, sd_reduction=reduction, sd_weight=sd_weight)
    sem = torch.zeros(2, h, w, dtype=torch.bool)
    sem[0, :3], sem[1, 3:] = True, True
    ins = torch.zeros(1, h, w, dtype=torch.bool)
    ins[0, 1:4, 1:4] = True
    pred = torch.full((3, s + i, h, w), -30.0)
    pred[0, 2], pred[0, 0], pred[0, 4] = logits_of(sem[0]), logits_of(sem[1]), logits_of(ins[0])
    pred[2, 3] = logits_of(ins[0])
    codes_t = torch.randn(4, k)
    none = torch.zeros(0, h, w, dtype=torch.bool)
    targets = [view(sem, codes_t[:2], ins, codes_t[2:3]), view(none, torch.zeros(0, k), none, torch.zeros(0, k)),
               view(none, torch.zeros(0, k), ins, codes_t[3:])]
    outputs = {"pred_masks": pred, "pred_objectness": torch.zeros(3, s + i, 2),
               "pred_codes": torch.randn(3, s + i, k, requires_grad=True)}
    # (view, query) -> teacher code row
    pairs = {(0, 2): 0, (0, 0): 1, (0, 4): 2, (2, 3): 3}
    return crit, outputs, targets, codes_t, pairs


def test_sd_matches_eq7_and_reductions():
    k = 5
    crit, outputs, targets, codes_t, pairs = _sd_setup(k, "mean")
    zc = torch.zeros(1, k)
    sd = {vq: sd_reference(outputs["pred_codes"][vq], codes_t[t], zc) for vq, t in pairs.items()}
    view0 = [sd[(0, 2)], sd[(0, 0)], sd[(0, 4)]]
    mean_expected = (sum(view0) / 3 + sd[(2, 3)]) / 2  # averaged over the 2 views with pairs
    sum_expected = (sum(view0) + sd[(2, 3)]) / 2
    loss_mean = crit(outputs, targets)["loss_sd"]
    assert loss_mean.item() == pytest.approx(mean_expected.item(), rel=1e-5)
    crit_sum, *_ = _sd_setup(k, "sum", sd_weight=2.0)
    loss_sum = crit_sum(outputs, targets)["loss_sd"]
    assert loss_sum.item() == pytest.approx(2 * sum_expected.item(), rel=1e-5)


def test_sd_sum_is_L_times_mean():
    k = 5
    crit_mean, outputs, targets, _, _ = _sd_setup(k, "mean")
    crit_sum, *_ = _sd_setup(k, "sum")
    one_view = {key: val[:1] for key, val in outputs.items()}
    l_mean = crit_mean(one_view, targets[:1])["loss_sd"]
    l_sum = crit_sum(one_view, targets[:1])["loss_sd"]
    assert l_sum.item() == pytest.approx(3 * l_mean.item(), rel=1e-6)


def test_sd_sharp_identical_vs_uniform():
    s, i, h, w, k = 1, 1, 4, 4, 8
    crit = make_criterion(s, i, k)
    tgt = rand_masks(1, h, w)
    code = torch.zeros(1, k)
    code[0, 3] = 10.0
    targets = [view(tgt, code, torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0, k))]
    pred = torch.full((1, 2, h, w), -30.0)
    pred[0, 0] = logits_of(tgt[0])
    base = {"pred_masks": pred, "pred_objectness": torch.zeros(1, 2, 2)}
    crit.eval()  # keep the centre at 0 between the two calls
    same = crit({**base, "pred_codes": torch.cat([code, torch.zeros(1, k)])[None]}, targets)["loss_sd"]
    uniform = crit({**base, "pred_codes": torch.zeros(1, 2, k)}, targets)["loss_sd"]
    assert same.item() < 1e-6
    assert uniform.item() == pytest.approx(math.log(k), rel=1e-6)


# ------------------------------------------------------------------------------ criterion: centre
def test_center_update_formula_and_order():
    k = 5
    crit, outputs, targets, codes_t, pairs = _sd_setup(k, "mean")
    assert crit.center.shape == (1, k) and "center" in crit.state_dict()
    crit(outputs, targets)
    c1 = 0.1 * codes_t.mean(0, keepdim=True)
    assert torch.allclose(crit.center, c1, atol=1e-6)
    # the second call uses the centre from before its own update
    codes2 = torch.randn(4, k)
    targets[0]["semantic"]["codes"], targets[0]["instance"]["codes"] = codes2[:2], codes2[2:3]
    targets[2]["instance"]["codes"] = codes2[3:]
    sd = {vq: sd_reference(outputs["pred_codes"][vq], codes2[t], c1) for vq, t in pairs.items()}
    expected = ((sd[(0, 2)] + sd[(0, 0)] + sd[(0, 4)]) / 3 + sd[(2, 3)]) / 2
    assert crit(outputs, targets)["loss_sd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(crit.center, 0.9 * c1 + 0.1 * codes2.mean(0, keepdim=True), atol=1e-6)
    # no update in eval mode
    c2 = crit.center.clone()
    crit.eval()
    crit(outputs, targets)
    assert torch.equal(crit.center, c2)


def test_empty_targets_finite_zero_and_differentiable():
    s, i, h, w, k = 2, 3, 8, 8, 4
    crit = make_criterion(s, i, k)
    crit.center.fill_(0.5)
    outputs = {"pred_masks": torch.randn(2, 5, h, w, requires_grad=True),
               "pred_objectness": torch.randn(2, 5, 2, requires_grad=True),
               "pred_codes": torch.randn(2, 5, k, requires_grad=True),
               "aux_outputs": [{"pred_masks": torch.randn(2, 5, h, w, requires_grad=True),
                                "pred_objectness": torch.randn(2, 5, 2, requires_grad=True)}]}
    targets = [{"semantic": empty_level(h, w, k), "instance": empty_level(h, w, k)} for _ in range(2)]
    losses = crit(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    for key in ("loss_mask", "loss_dice", "loss_sd", "loss_mask_0", "loss_dice_0"):
        assert losses[key].item() == 0.0
    assert losses["loss_objectness"].item() > 0  # every query is pushed to "no-object"
    sum(losses.values()).backward()
    assert torch.equal(outputs["pred_masks"].grad, torch.zeros_like(outputs["pred_masks"]))
    assert torch.equal(outputs["pred_codes"].grad, torch.zeros_like(outputs["pred_codes"]))
    assert outputs["pred_objectness"].grad.abs().sum() > 0
    assert torch.all(crit.center == 0.5)  # no target: no centre update


def test_gradients_flow_and_teacher_gets_none():
    s, i, h, w, k = 2, 3, 10, 10, 6
    crit = make_criterion(s, i, k)
    outputs = {"pred_masks": torch.randn(2, 5, h, w, requires_grad=True),
               "pred_objectness": torch.randn(2, 5, 2, requires_grad=True),
               "pred_codes": torch.randn(2, 5, k, requires_grad=True),
               "aux_outputs": [{"pred_masks": torch.randn(2, 5, h, w, requires_grad=True),
                                "pred_objectness": torch.randn(2, 5, 2, requires_grad=True)} for _ in range(2)]}
    teacher_codes = torch.randn(9, k, requires_grad=True)
    targets = [view(rand_masks(2, h, w), teacher_codes[:2], rand_masks(4, h, w), teacher_codes[2:6]),
               view(rand_masks(3, h, w), teacher_codes[6:9], rand_masks(0, h, w), teacher_codes[9:])]
    losses = crit(outputs, targets)
    assert set(losses) == {f"loss_{n}{sfx}" for n in ("mask", "dice", "objectness") for sfx in ("", "_0", "_1")} \
        | {"loss_sd"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    tensors = [outputs["pred_masks"], outputs["pred_objectness"], outputs["pred_codes"]]
    tensors += [a[key] for a in outputs["aux_outputs"] for key in ("pred_masks", "pred_objectness")]
    for tensor in tensors:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    assert teacher_codes.grad is None


def test_deep_supervision_rematches_each_layer():
    s, i, h, w, k = 1, 2, 32, 32, 4
    tgt = torch.zeros(1, h, w, dtype=torch.bool)
    tgt[0, 4:20, 8:28] = True
    targets = [view(torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0, k), tgt, torch.randn(1, k))]
    final = torch.full((1, 3, h, w), -30.0)
    final[0, 1] = logits_of(tgt[0])
    aux = torch.full((1, 3, h, w), -30.0)
    aux[0, 2] = logits_of(tgt[0])  # another query is right in the aux layer
    aux[0, 1] = logits_of(~tgt[0])
    outputs = {"pred_masks": final, "pred_objectness": torch.zeros(1, 3, 2), "pred_codes": torch.zeros(1, 3, k),
               "aux_outputs": [{"pred_masks": aux, "pred_objectness": torch.zeros(1, 3, 2)}]}
    crit = make_criterion(s, i, k, num_points=2000, importance_sample_ratio=0.0, dice_weight=1.0)
    losses = crit(outputs, targets)
    assert losses["loss_dice"].item() < 0.05 and losses["loss_dice_0"].item() < 0.05
    no_ds = make_criterion(s, i, k, deep_supervision=False)
    assert set(no_ds(outputs, targets)) == {"loss_mask", "loss_dice", "loss_objectness", "loss_sd"}


def test_distributed_bookkeeping(monkeypatch):
    """With a fake 2-process all_reduce (the other process holds an identical batch) the
    normalisers and the centre equal the single-process ones."""
    from detectron2.utils import comm
    import hiseg_oap.modeling.criterion as crit_mod

    k = 5
    crit, outputs, targets, codes_t, _ = _sd_setup(k, "mean")
    torch.manual_seed(1)
    single = crit(outputs, targets)
    center_single = crit.center.clone()

    calls = []

    def fake_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.shape)
        tensor.mul_(2)

    crit2, *_ = _sd_setup(k, "mean")
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(crit_mod.dist, "all_reduce", fake_all_reduce)
    torch.manual_seed(1)
    double = crit2(outputs, targets)
    # matched count, objectness weight, views with a match (SD), centre statistics
    assert len(calls) == 4
    for key in single:
        assert double[key].item() == pytest.approx(single[key].item(), rel=1e-6)
    assert torch.allclose(crit2.center, center_single, atol=1e-7)


# ------------------------------------------------------------------------------ criterion: checks
def test_criterion_rejects_bad_input():
    s, i, h, w, k = 2, 3, 8, 8, 4
    crit = make_criterion(s, i, k)

    def outputs(v=1, q=5, hh=h, ww=w, kk=k):
        return {"pred_masks": torch.randn(v, q, hh, ww), "pred_objectness": torch.randn(v, q, 2),
                "pred_codes": torch.randn(v, q, kk)}

    good = [view(rand_masks(1, h, w), torch.randn(1, k), rand_masks(2, h, w), torch.randn(2, k))]
    crit(outputs(), good)  # sanity
    with pytest.raises(ValueError, match="grid"):
        crit(outputs(), [view(rand_masks(1, h, w + 1), torch.randn(1, k), rand_masks(2, h, w), torch.randn(2, k))])
    with pytest.raises(ValueError, match="K=4"):
        crit(outputs(), [view(rand_masks(1, h, w), torch.randn(1, k + 1), rand_masks(2, h, w), torch.randn(2, k))])
    with pytest.raises(ValueError, match="K=4"):
        crit(outputs(kk=k + 1), good)
    with pytest.raises(ValueError, match="S \\+ I"):
        crit(outputs(q=6), good)
    with pytest.raises(ValueError, match="2 codes for 1 masks"):
        crit(outputs(), [view(rand_masks(1, h, w), torch.randn(2, k), rand_masks(2, h, w), torch.randn(2, k))])
    with pytest.raises(ValueError, match="bool"):
        crit(outputs(), [view(torch.rand(1, h, w), torch.randn(1, k), rand_masks(2, h, w), torch.randn(2, k))])
    with pytest.raises(ValueError, match="student views"):
        crit(outputs(v=2), good)
    with pytest.raises(ValueError, match="pred_objectness"):
        crit({**outputs(), "pred_objectness": torch.randn(1, 5, 3)}, good)
    with pytest.raises(ValueError, match="aux_outputs"):
        crit({**outputs(), "aux_outputs": [{"pred_masks": torch.randn(1, 5, 4, 4),
                                            "pred_objectness": torch.randn(1, 5, 2)}]}, good)
    with pytest.raises(ValueError, match="instance"):
        crit(outputs(), [{"semantic": good[0]["semantic"]}])
    with pytest.raises(ValueError, match="sd_reduction"):
        make_criterion(sd_reduction="max")
    with pytest.raises(ValueError, match="teacher_temp"):
        make_criterion(teacher_temp=0.0)


def test_from_config():
    from detectron2.config import get_cfg

    from hiseg_oap.config import add_oap_config

    cfg = add_oap_config(get_cfg())
    crit = OAPCriterion(cfg)
    assert (crit.num_sem_queries, crit.num_ins_queries, crit.out_dim) == (50, 150, 512)
    assert crit.center.shape == (1, 512) and crit.num_points == 112 * 112
    assert (crit.mask_weight, crit.dice_weight, crit.objectness_weight, crit.no_object_weight) == (5, 5, 2, 0.1)
    assert (crit.student_temp, crit.teacher_temp, crit.center_momentum, crit.sd_reduction) == (0.1, 0.04, 0.9, "mean")
    assert OAPCriterion(cfg, out_dim=8).out_dim == 8
