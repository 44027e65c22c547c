"""Losses: hand-computed batches, and MONAI as an independent reference where it computes the same thing."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.draw import disk

from histoflow.errors import ParameterError
from histoflow.ml.losses import (CWCELoss, DiceCELoss, DiceLoss, DistillationLoss, HoVerNetLoss, cwce_loss,
                                 dice_ce_loss, dice_loss, distillation_loss, hovernet_loss, hv_targets,
                                 sobel_kernel_5x5)


def _ce_by_hand(row, label):
    """-log softmax(row)[label], with math only."""
    m = max(row)
    z = sum(math.exp(v - m) for v in row)
    return -((row[label] - m) - math.log(z))


# ---------------------------------------------------------------------------------------------- CWCE
LOGITS = [[2.0, -1.0, 0.5], [0.1, 0.3, -0.2], [-1.5, 2.5, 0.0], [1.0, 1.0, 3.0]]
LABELS = [0, 2, 1, 0]


def test_cwce_two_clusters_of_sizes_3_and_1_by_hand():
    clusters = [4, 4, 4, 9]  # cluster 4 has three samples, cluster 9 one
    ce = [_ce_by_hand(r, y) for r, y in zip(LOGITS, LABELS)]
    expected = (sum(ce[:3]) / 3 + ce[3]) / 2
    got = cwce_loss(torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(LABELS), torch.tensor(clusters))
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # and it is not the plain mean: the lone sample of cluster 9 weighs as much as the other three
    assert abs(expected - sum(ce) / 4) > 0.1
    module = CWCELoss()(torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(LABELS), torch.tensor(clusters))
    assert float(module) == pytest.approx(expected, rel=1e-12)


def test_cwce_with_class_weights_by_hand():
    w = [0.5, 2.0, 1.0]
    clusters = [0, 1, 0, 1]
    ce = [_ce_by_hand(r, y) for r, y in zip(LOGITS, LABELS)]
    c0 = (w[0] * ce[0] + w[1] * ce[2]) / (w[0] + w[1])
    c1 = (w[2] * ce[1] + w[0] * ce[3]) / (w[2] + w[0])
    got = CWCELoss(class_weights=w)(torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(LABELS),
                                    torch.tensor(clusters))
    assert float(got) == pytest.approx((c0 + c1) / 2, rel=1e-6)


def test_cwce_equals_cross_entropy_with_one_cluster():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(17, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (17,), generator=g)
    one = torch.full((17,), 3)
    assert float(cwce_loss(logits, labels, one)) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-12)
    w = torch.tensor([0.2, 1.0, 3.0, 0.7, 1.5], dtype=torch.float64)
    assert float(cwce_loss(logits, labels, one, class_weights=w)) == pytest.approx(
        float(F.cross_entropy(logits, labels, weight=w)), rel=1e-12)


def test_cwce_per_cluster_and_gradients():
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    loss, (ids, per) = cwce_loss(logits, torch.tensor(LABELS), torch.tensor([7, -3, 7, 7]), return_per_cluster=True)
    assert ids.tolist() == [-3, 7]
    assert float(per[0]) == pytest.approx(_ce_by_hand(LOGITS[1], LABELS[1]), rel=1e-12)
    loss.backward()
    # the lone sample of cluster -3 gets gradient 1/2 * (softmax - onehot); the others 1/2 * 1/3
    p = torch.softmax(torch.tensor(LOGITS[1], dtype=torch.float64), 0)
    p[LABELS[1]] -= 1
    assert torch.allclose(logits.grad[1], p / 2)


def test_cwce_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4, 3\)"):
        cwce_loss(torch.tensor(LOGITS), torch.tensor(LABELS[:3]), torch.tensor([0, 0, 0, 0]))
    with pytest.raises(ValueError, match="clusters shape"):
        cwce_loss(torch.tensor(LOGITS), torch.tensor(LABELS), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="class weights"):
        cwce_loss(torch.tensor(LOGITS), torch.tensor(LABELS), torch.zeros(4, dtype=torch.long),
                  class_weights=[1.0, 2.0])


# ---------------------------------------------------------------------------------------------- Dice
def _confident_logits(target, n_classes, scale=40.0):
    """Logits whose softmax is (numerically) the one-hot of target."""
    return (F.one_hot(target, n_classes).movedim(-1, 1).double() * 2 - 1) * scale


def test_dice_perfect_and_disjoint_multiclass():
    target = torch.zeros(2, 6, 6, dtype=torch.long)
    target[:, :3] = 1
    target[:, 4:, 4:] = 2
    perfect = _confident_logits(target, 3)
    assert float(dice_loss(perfect, target)) == pytest.approx(0.0, abs=1e-9)
    # every pixel predicted as a wrong class: each class with pixels scores Dice 0
    wrong = _confident_logits((target + 1) % 3, 3)
    assert float(dice_loss(wrong, target)) == pytest.approx(1.0, abs=1e-6)
    assert float(dice_loss(wrong, target, include_background=False)) == pytest.approx(1.0, abs=1e-6)


def test_dice_binary_sigmoid_by_hand():
    # probabilities given directly (activation="none"): 2 * 1.5 / (2.0 + 2) with smooth 0
    probs = torch.tensor([[[[0.9, 0.6], [0.4, 0.1]]]], dtype=torch.float64)
    target = torch.tensor([[[1, 1], [0, 0]]])
    got = dice_loss(probs, target, activation="none", smooth=0.0)
    assert float(got) == pytest.approx(1 - 2 * 1.5 / (2.0 + 2.0), rel=1e-12)
    logits = torch.logit(probs)
    assert float(dice_loss(logits, target, smooth=0.0)) == pytest.approx(float(got), rel=1e-9)
    # disjoint binary prediction
    assert float(dice_loss(torch.full((1, 1, 2, 2), -40.0, dtype=torch.float64) * (target[:, None] * 2 - 1),
                           target)) == pytest.approx(1.0, abs=1e-4)


def test_dice_include_background_drops_channel_zero_by_hand():
    probs = torch.tensor([[[[0.8, 0.3]], [[0.2, 0.7]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    d0 = 1 - 2 * 0.8 / (1.1 + 1)
    d1 = 1 - 2 * 0.7 / (0.9 + 1)
    assert float(dice_loss(probs, target, activation="none", smooth=0)) == pytest.approx((d0 + d1) / 2)
    assert float(dice_loss(probs, target, activation="none", smooth=0, include_background=False)) == pytest.approx(d1)
    assert float(dice_loss(probs, target, activation="none", smooth=0, class_weights=[1.0, 3.0])) == \
        pytest.approx((d0 + 3 * d1) / 4)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [True, False])
def test_dice_matches_monai(include_background, batch):
    from monai.losses import DiceLoss as MonaiDice
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 9, 11, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 9, 11), generator=g)
    ours = DiceLoss(include_background=include_background, batch=batch)(logits, target)
    ref = MonaiDice(softmax=True, to_onehot_y=True, include_background=include_background, batch=batch)(
        logits, target[:, None])
    assert float(ours) == pytest.approx(float(ref), rel=1e-10)


def test_dice_ce_matches_monai_and_weighted_ce():
    from monai.losses import DiceCELoss as MonaiDiceCE
    from monai.losses import DiceLoss as MonaiDice
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    ref = MonaiDiceCE(softmax=True, to_onehot_y=True, lambda_dice=0.7, lambda_ce=1.3)(logits, target[:, None])
    assert float(DiceCELoss(lambda_dice=0.7, lambda_ce=1.3)(logits, target)) == pytest.approx(float(ref), rel=1e-10)
    w = torch.tensor([0.2, 1.0, 2.0], dtype=torch.float64)
    expected = MonaiDice(softmax=True, to_onehot_y=True)(logits, target[:, None]) + F.cross_entropy(logits, target, weight=w)
    assert float(dice_ce_loss(logits, target, ce_weight=w)) == pytest.approx(float(expected), rel=1e-10)


def test_ignore_index_pixels_do_not_count():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (1, 6, 6), generator=g)
    target[0, :2] = 255
    loss = DiceCELoss(ignore_index=255)
    before = float(loss(logits, target))
    changed = logits.clone()
    changed[0, :, :2] = torch.randn(3, 2, 6, generator=g, dtype=torch.float64) * 10
    assert float(loss(changed, target)) == pytest.approx(before, rel=1e-12)
    assert float(loss(logits, torch.where(target == 255, 0, target))) != pytest.approx(before)


def test_dice_shape_errors():
    with pytest.raises(ValueError, match=r"\(2, 5, 5\).*\(2, 3, 4, 4\)"):
        dice_loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        dice_loss(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 3))


# ------------------------------------------------------------------------------------- distillation
def test_distillation_alpha_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    got = DistillationLoss(temperature=3.0, alpha=0.0)(s, t, y)
    assert float(got) == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_alpha_one_is_kl_by_hand(temperature):
    student = [[1.0, 0.0, -1.0], [0.2, 0.4, 0.1]]
    teacher = [[2.0, 0.5, -0.5], [-1.0, 1.0, 0.0]]
    total = 0.0
    for srow, trow in zip(student, teacher):
        ps = [math.exp(v / temperature) for v in srow]
        pt = [math.exp(v / temperature) for v in trow]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expected = temperature ** 2 * total / 2
    got = distillation_loss(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64),
                            temperature=temperature, alpha=1.0)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_distillation_mixture_dense_and_teacher_frozen():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 4), generator=g)
    a, temp = 0.3, 2.0
    got = distillation_loss(s, t, y, temperature=temp, alpha=a)
    kl = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="sum") / (2 * 4 * 4)
    expected = a * temp ** 2 * kl + (1 - a) * F.cross_entropy(s, y)
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    got.backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(s, t, None, alpha=0.5)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 4, 4\)"):
        distillation_loss(s, t, torch.zeros(2, 3, 4, dtype=torch.long), alpha=0.5)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        distillation_loss(s, t[:, :2], y, alpha=0.5)


# ---------------------------------------------------------------------------------------- HoVer-Net
def _instances():
    inst = np.zeros((2, 32, 32), np.int32)
    rr, cc = disk((8, 9), 5, shape=(32, 32))
    inst[0, rr, cc] = 3
    rr, cc = disk((20, 22), 7, shape=(32, 32))
    inst[0, rr, cc] = 11
    rr, cc = disk((15, 15), 9, shape=(32, 32))
    inst[1, rr, cc] = 1
    return inst


def test_hv_targets_single_disc_range_and_antisymmetry():
    m = np.zeros((41, 41), np.int32)
    rr, cc = disk((20, 20), 9, shape=m.shape)
    m[rr, cc] = 5
    hv = hv_targets(m)
    assert hv.shape == (2, 41, 41) and hv.dtype == np.float32
    inside = m > 0
    assert np.all(hv[:, ~inside] == 0)
    assert hv.min() == -1.0 and hv.max() == 1.0
    h, v = hv
    # antisymmetric about the centroid (20, 20): h(y, 20 + d) = -h(y, 20 - d), v likewise in y
    assert np.allclose(h, -h[:, ::-1], atol=1e-6)
    assert np.allclose(v, -v[::-1, :], atol=1e-6)
    # h grows from left to right along the centre row; v from top to bottom along the centre column
    row = h[20, inside[20]]
    col = v[inside[:, 20], 20]
    assert np.all(np.diff(row) > 0) and np.all(np.diff(col) > 0)
    assert row[0] == -1 and row[-1] == 1


def test_hv_targets_match_monai_on_several_nuclei():
    from monai.transforms import ComputeHoVerMaps
    inst = _instances()[0]
    inst[0:3, 28:31] = 1000  # a small nucleus in a corner, label far from the others
    ours = hv_targets(inst)
    ref = ComputeHoVerMaps()(inst[None]).numpy()
    assert np.allclose(ours, ref, atol=1e-6)
    for label in (3, 11, 1000):  # every nucleus is normalised on its own
        sel = inst == label
        assert ours[0][sel].min() == -1 and ours[0][sel].max() == 1
    with pytest.raises(ValueError, match=r"\(2, 32, 32\)"):
        hv_targets(_instances())


def test_sobel_kernel_differentiates_a_ramp():
    kx, ky = sobel_kernel_5x5(torch.float64)
    ramp = torch.arange(12, dtype=torch.float64).repeat(12, 1)  # f(y, x) = x
    gx = F.conv2d(ramp[None, None], kx[None, None])
    gy = F.conv2d(ramp[None, None], ky[None, None])
    assert torch.allclose(gx, torch.full_like(gx, 12.0))
    assert torch.allclose(gy, torch.zeros_like(gy))


def _perfect(inst, n_types=3, scale=40.0):
    fg = torch.from_numpy(inst > 0).long()
    types = torch.from_numpy(np.where(inst > 0, inst % (n_types - 1) + 1, 0)).long()
    hv = torch.from_numpy(np.stack([hv_targets(m) for m in inst])).double()
    target = {"nucleus_prediction": torch.from_numpy(inst), "horizontal_vertical": hv, "type_prediction": types}
    pred = {"nucleus_prediction": _confident_logits(fg, 2, scale), "horizontal_vertical": hv.clone(),
            "type_prediction": _confident_logits(types, n_types, scale)}
    return pred, target


def test_hovernet_loss_is_zero_for_perfect_predictions():
    pred, target = _perfect(_instances())
    loss, terms = HoVerNetLoss()(pred, target, return_terms=True)
    assert float(loss) == pytest.approx(0.0, abs=1e-9)
    assert set(terms) == {"np_ce", "np_dice", "hv_mse", "hv_msge", "tp_ce", "tp_dice"}
    # without the type branch too
    del pred["type_prediction"], target["type_prediction"]
    assert float(hovernet_loss(pred, target)) == pytest.approx(0.0, abs=1e-9)


def test_hovernet_terms_and_weights():
    pred, target = _perfect(_instances())
    g = torch.Generator().manual_seed(6)
    for k in pred:  # the logits are +-40: perturb them enough to flip some pixels
        pred[k] = pred[k] + (1 if k == "horizontal_vertical" else 40) * torch.randn(pred[k].shape, generator=g,
                                                                                   dtype=torch.float64)
    weights = dict(lambda_np_ce=0.5, lambda_np_dice=2.0, lambda_hv_mse=3.0, lambda_hv_msge=0.25,
                   lambda_tp_ce=1.5, lambda_tp_dice=0.1)
    loss, terms = HoVerNetLoss(**weights)(pred, target, return_terms=True)
    expected = sum(weights["lambda_" + k] * float(v) for k, v in terms.items())
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert all(float(v) > 0 for v in terms.values())
    assert float(terms["hv_mse"]) == pytest.approx(
        float(F.mse_loss(pred["horizontal_vertical"], target["horizontal_vertical"])), rel=1e-12)


def test_hovernet_msge_only_inside_nuclei():
    pred, target = _perfect(_instances())
    # a perturbation of the HV prediction farther than 2 px (the kernel radius) from every nucleus
    far = np.ones((2, 32, 32), bool)
    from scipy.ndimage import binary_dilation
    for i in range(2):
        far[i] = ~binary_dilation(_instances()[i] > 0, np.ones((3, 3), bool), iterations=3)
    bump = torch.zeros_like(pred["horizontal_vertical"])
    bump[:, 0][torch.from_numpy(far)] = torch.linspace(0, 5, int(far.sum()), dtype=torch.float64)
    pred["horizontal_vertical"] = pred["horizontal_vertical"] + bump
    _, terms = hovernet_loss(pred, target, return_terms=True)
    assert float(terms["hv_msge"]) == pytest.approx(0.0, abs=1e-12)
    assert float(terms["hv_mse"]) > 0.1
    # the same perturbation inside the nuclei is seen by the gradient term
    pred2, _ = _perfect(_instances())
    inside = torch.from_numpy(_instances() > 0)
    bump2 = torch.zeros_like(bump)
    bump2[:, 0][inside] = torch.linspace(0, 5, int(inside.sum()), dtype=torch.float64)
    pred2["horizontal_vertical"] = pred2["horizontal_vertical"] + bump2
    _, terms2 = hovernet_loss(pred2, target, return_terms=True)
    assert float(terms2["hv_msge"]) > 0.1


def test_hovernet_matches_monai_without_the_gradient_term():
    from monai.apps.pathology.losses import HoVerNetLoss as MonaiHoVerNetLoss
    pred, target = _perfect(_instances())
    g = torch.Generator().manual_seed(7)
    pred = {k: v + (1 if k == "horizontal_vertical" else 40) * torch.randn(v.shape, generator=g, dtype=torch.float64)
            for k, v in pred.items()}
    ours = HoVerNetLoss(lambda_hv_msge=0.0)(pred, target)  # default weights as MONAI's: 2 on the HV MSE
    fg = torch.from_numpy(_instances() > 0).long()
    monai_target = {"nucleus_prediction": F.one_hot(fg, 2).movedim(-1, 1).double(),
                    "horizontal_vertical": target["horizontal_vertical"],
                    "type_prediction": F.one_hot(target["type_prediction"], 3).movedim(-1, 1).double()}
    ref = MonaiHoVerNetLoss(lambda_hv_mse_grad=0.0)(pred, monai_target)
    assert float(ref) > 1.0  # every term takes part
    assert float(ours) == pytest.approx(float(ref), rel=1e-10)
    # one-hot targets are accepted by ours as well
    assert float(HoVerNetLoss(lambda_hv_msge=0.0)(pred, monai_target)) == pytest.approx(float(ref), rel=1e-10)
    ref1 = MonaiHoVerNetLoss(lambda_hv_mse=1.0, lambda_hv_mse_grad=0.0)(pred, monai_target)
    assert float(HoVerNetLoss(lambda_hv_mse=1.0, lambda_hv_msge=0.0)(pred, target)) == pytest.approx(float(ref1), rel=1e-10)


def test_hovernet_input_errors():
    pred, target = _perfect(_instances())
    t2 = dict(target)
    del t2["type_prediction"]
    with pytest.raises(ValueError, match="type_prediction"):
        hovernet_loss(pred, t2)
    p2 = dict(pred)
    p2["horizontal_vertical"] = pred["horizontal_vertical"][:, :, :16]
    with pytest.raises(ValueError, match=r"\(2, 2, 16, 32\)"):
        hovernet_loss(p2, target)
    with pytest.raises(ValueError, match="nucleus_prediction"):
        hovernet_loss({"horizontal_vertical": pred["horizontal_vertical"]}, target)


def test_distillation_with_every_label_ignored_is_the_soft_term():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    labels = torch.full((4,), -100)
    both = distillation_loss(s, t, labels, temperature=2.0, alpha=0.5)
    soft = distillation_loss(s, t, None, temperature=2.0, alpha=1.0)
    assert torch.isfinite(both) and torch.allclose(both, 0.5 * soft)
    both.backward()
    assert torch.isfinite(s.grad).all()
    # with labels, the hard term is still the mean over the labelled ones
    labels[:2] = torch.tensor([0, 2])
    hard = distillation_loss(s, t, labels, alpha=0.0)
    assert torch.allclose(hard, torch.nn.functional.cross_entropy(s, labels, ignore_index=-100))


def test_hovernet_float_mask_target_with_a_channel_axis():
    """A float (N, 1, H, W) nucleus mask is a binary mask: the same terms as the integer (N, H, W) one (it
    was argmax-ed over its one channel into all background, the gradient term 0 with no nucleus in focus)."""
    pred, target = _perfect(_instances())
    g = torch.Generator().manual_seed(3)
    pred = {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in pred.items()}
    del pred["type_prediction"], target["type_prediction"]
    fg = (target["nucleus_prediction"] > 0)
    as_long = dict(target, nucleus_prediction=fg.long())
    as_float = dict(target, nucleus_prediction=fg[:, None].double())
    _, t_long = hovernet_loss(pred, as_long, return_terms=True)
    _, t_float = hovernet_loss(pred, as_float, return_terms=True)
    assert float(t_long["hv_msge"]) > 0
    for k in t_long:
        assert float(t_float[k]) == pytest.approx(float(t_long[k]), rel=1e-12), k


def test_cwce_leaves_out_unlabelled_samples_and_distillation_checks_labels():
    """TileDataset gives tiles without a label -100 (torch's ignore_index): CWCE leaves them out (it refused
    the whole batch), a cluster left without labelled samples is not present, and their logits get no
    gradient. Distillation's hard labels must be integer class ids (0.5 was truncated to class 0; 3 of 3
    classes was torch's IndexError)."""
    from histoflow.errors import ParameterError

    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, -100, 1, 0])
    clusters = torch.tensor([0, 0, 1, 1, 2, 3])
    loss, (ids, per) = cwce_loss(logits, labels, clusters, return_per_cluster=True)
    keep = labels != -100
    assert torch.allclose(loss, cwce_loss(logits[keep], labels[keep], clusters[keep]))
    ce = F.cross_entropy(logits.detach(), labels.clamp_min(0), reduction="none")
    assert ids.tolist() == [0, 1, 2, 3] and torch.allclose(per[1], ce[2])  # cluster 1: its labelled sample only
    loss.backward()
    assert torch.all(logits.grad[3] == 0) and torch.all(logits.grad[2] != 0)
    assert cwce_loss(logits, labels.where(clusters != 1, -100), clusters, return_per_cluster=True)[1][0].tolist() \
        == [0, 2, 3]
    assert cwce_loss(logits, torch.full((6,), -100), clusters).item() == 0.0
    assert torch.allclose(CWCELoss(ignore_index=-1)(logits, labels.clamp_min(-1), clusters), loss)
    with pytest.raises(ParameterError, match=r"labels must lie in \[0, 2\]"):
        cwce_loss(logits, torch.tensor([0, 1, 2, 3, 1, 0]), clusters)
    teacher = torch.randn(6, 3)
    with pytest.raises(ParameterError, match="integer tensor of class ids"):
        distillation_loss(logits, teacher, torch.tensor([0.5, 1, 1, 0, 1, 0]), alpha=0.5)
    with pytest.raises(ParameterError, match=r"labels must lie in \[0, 2\].*got \[3\]"):
        distillation_loss(logits, teacher, torch.tensor([0, 3, 1, 0, 1, 0]), alpha=0.5)
    assert torch.isfinite(distillation_loss(logits, teacher, labels, alpha=0.5))  # -100 is ignored there too


# ------------------------------------------------------------------------------- review fixes (losses)
_NC_CASES = [
    ({}, {}),
    ({"include_background": False}, {"include_background": False}),
    ({"batch": True}, {"batch": True}),
    # ours is the weighted mean over classes, MONAI's the plain mean of w * loss: equal when sum(w) = C'
    ({"class_weights": [0.5, 1.0, 1.5]}, {"weight": [0.5, 1.0, 1.5]}),
    ({"class_weights": [9.0, 0.5, 1.5], "include_background": False},
     {"weight": [0.5, 1.5], "include_background": False}),
]


@pytest.mark.parametrize("kw, monai_kw", [(dict(k, reduction=r), dict(m, reduction=r))
                                          for k, m in _NC_CASES for r in ("mean", "none")]
                         + [({"reduction": "sum"}, {"reduction": "sum"})])
def test_dice_without_spatial_dims_matches_monai(kw, monai_kw):
    """(N, C) logits: one Dice per sample and class, as MONAI on (N, C, 1) (it summed over every axis,
    giving one global Dice: a 0-d 'none', weights ignored, IndexError without the background)."""
    from monai.losses import DiceLoss as MonaiDice
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 1, 1])
    ours = dice_loss(logits, target, **kw)
    ref = MonaiDice(softmax=True, to_onehot_y=True, **monai_kw)(logits[..., None], target[:, None, None])
    if kw["reduction"] == "none":
        c = 2 if kw.get("include_background") is False else 3
        assert ours.shape == ((c,) if kw.get("batch") else (5, c))
        ref = ref.reshape(ours.shape)
    assert torch.allclose(ours, ref.to(ours.dtype), rtol=1e-10, atol=0)


def test_dice_without_spatial_dims_value_and_dice_ce():
    from monai.losses import DiceCELoss as MonaiDiceCE
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    assert float(DiceLoss()(x, y)) == pytest.approx(0.8548, abs=5e-5)
    p, oh = torch.softmax(x, 1), F.one_hot(y, 3).float()  # by hand: one Dice per (sample, class)
    assert torch.allclose(dice_loss(x, y, reduction="none"), 1 - (2 * p * oh + 1e-5) / (p + oh + 1e-5))
    ref = MonaiDiceCE(softmax=True, to_onehot_y=True)(x[..., None], y[:, None, None])
    assert float(DiceCELoss()(x, y)) == pytest.approx(float(ref), rel=1e-6)


def test_dice_class_weights_all_zero_is_an_error():
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    with pytest.raises(ParameterError, match="all zero after dropping the background"):
        dice_loss(logits, target, class_weights=[1.0, 0.0, 0.0], include_background=False)
    with pytest.raises(ParameterError, match="all zero"):
        DiceLoss(class_weights=[0.0, 0.0, 0.0])(logits, target)
    # one positive weight left is fine: the Dice of that class alone
    one = dice_loss(logits, target, class_weights=[0.0, 0.0, 2.0], include_background=False)
    assert float(one) == pytest.approx(float(dice_loss(logits, target, reduction="none")[:, 2].mean()), rel=1e-6)


@pytest.mark.parametrize("ce_weight", [None, [0.2, 1.0, 3.0]])
def test_dice_ce_cross_entropy_term_is_torch_s_and_finite_when_no_pixel_counts(ce_weight):
    """The CE term is torch's weighted mean on ordinary batches, and 0 (not 0 / 0 = NaN) when every pixel is
    ignored or has a class of weight 0."""
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 3, 6, 7, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 7), generator=g)
    target[0, :2] = 255
    w = None if ce_weight is None else torch.tensor(ce_weight)
    for ii in (None, 255):
        t = target if ii is not None else torch.where(target == 255, 1, target)
        ce = dice_ce_loss(logits, t, lambda_dice=0.0, ce_weight=ce_weight, ignore_index=ii)
        ref = F.cross_entropy(logits, t, weight=w, ignore_index=-100 if ii is None else ii)
        assert ce.item() == pytest.approx(ref.item(), abs=1e-6)
    empty = [torch.full((2, 6, 7), 255)]
    if ce_weight is not None:  # weight 0 on the only class present
        empty.append(torch.zeros(2, 6, 7, dtype=torch.long))
        ce_weight = [0.0, 1.0, 3.0]
    for t in empty:
        assert torch.isnan(F.cross_entropy(logits, t, weight=None if ce_weight is None else torch.tensor(ce_weight),
                                           ignore_index=255))  # torch's mean: the old value
        logits.grad = None
        ce = dice_ce_loss(logits, t, lambda_dice=0.0, ce_weight=ce_weight, ignore_index=255)
        assert ce.item() == 0.0
        total = DiceCELoss(ce_weight=ce_weight, ignore_index=255)(logits, t)
        assert torch.isfinite(total)
        total.backward()
        assert torch.isfinite(logits.grad).all()


def test_hovernet_type_target_as_float_with_a_channel_axis():
    """A float (N, 1, H, W) type map holds class ids, not a binary mask (it was thresholded at 0.5, so every
    type became 1); non-integer values are refused."""
    pred, target = _perfect(_instances())
    g = torch.Generator().manual_seed(13)
    pred = {k: v + 40 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in pred.items()}
    types = target["type_prediction"]
    assert int(types.max()) == 2
    _, ref = hovernet_loss(pred, target, return_terms=True)
    for as_map in (types[:, None].double(), types[:, None], types.double()):
        _, terms = hovernet_loss(pred, dict(target, type_prediction=as_map), return_terms=True)
        for k in ref:
            assert float(terms[k]) == pytest.approx(float(ref[k]), rel=1e-12), k
    with pytest.raises(ParameterError, match="whole-number"):
        hovernet_loss(pred, dict(target, type_prediction=types[:, None].double() * 0.4))
    with pytest.raises(ParameterError, match="whole-number"):
        hovernet_loss(pred, dict(target, type_prediction=types.double() + 0.5))
    # a float (N, H, W) nucleus map was truncated by .long() (0.7 became background): whole numbers only too
    _, ref_np = hovernet_loss(pred, dict(target, nucleus_prediction=target["nucleus_prediction"].double()),
                              return_terms=True)
    for k in ref:
        assert float(ref_np[k]) == pytest.approx(float(ref[k]), rel=1e-12), k
    with pytest.raises(ParameterError, match="nucleus_prediction.*whole-number"):
        hovernet_loss(pred, dict(target, nucleus_prediction=(target["nucleus_prediction"] > 0).double() * 0.7))


@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 3, 3)])
def test_distillation_teacher_with_masked_classes(shape):
    """-inf teacher logits (masked classes) have probability 0 and add nothing: KL as F.kl_div, not NaN."""
    g = torch.Generator().manual_seed(14)
    s = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t[:, 0] = -float("inf")
    t[1, 3] = -float("inf")
    temp = 4.0
    got = distillation_loss(s, t, alpha=1.0, temperature=temp)
    n = s.numel() // s.shape[1]
    log_ps, pt = F.log_softmax(s.detach() / temp, 1), F.softmax(t / temp, 1)
    ref = F.kl_div(log_ps, pt, reduction="sum").item() / n * temp * temp
    if len(shape) == 2:  # batchmean is the mean over samples
        assert ref == pytest.approx(F.kl_div(log_ps, pt, reduction="batchmean").item() * temp * temp, rel=1e-12)
    assert torch.isfinite(got) and got.item() == pytest.approx(ref, rel=1e-10)
    got.backward()
    assert torch.isfinite(s.grad).all()


def test_distillation_with_classes_masked_in_both():
    """A class both networks mask with -inf (as the docs invite) adds nothing: finite loss and gradients, equal to
    the KL over the other classes."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.randn(4, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([0.0, 0.0, -float("inf")], dtype=torch.float64)
    sm = (s + mask).requires_grad_()
    got = distillation_loss(sm, t + mask, alpha=1.0, temperature=2.0)
    ref = distillation_loss(s[:, :2], t[:, :2], alpha=1.0, temperature=2.0)
    assert torch.isfinite(got) and got.item() == pytest.approx(ref.item(), rel=1e-12)
    got.backward()
    assert torch.isfinite(sm.grad).all()


def _nuclei_batch(n=4, size=128):
    rng = np.random.default_rng(5)
    inst = np.zeros((n, size, size), np.int32)
    for b in range(n):
        for k in range(1, 25):
            rr, cc = disk((rng.integers(8, size - 8), rng.integers(8, size - 8)), rng.integers(4, 8), shape=(size, size))
            inst[b, rr, cc] = k
    return inst


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_losses_of_16_bit_logits_are_computed_in_float32(half):
    """Autocast gives the losses 16-bit logits: in float16 a count of 65,536 pixels is inf (CE term 0, Dice NaN), in
    bfloat16 sums over a batch are rounded to 1/256. They must equal the float32 losses of the same logits."""
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(4, 2, 128, 128, generator=g).to(half)
    tg = torch.randint(0, 2, (4, 128, 128), generator=g)
    for fn in (lambda x: dice_ce_loss(x, tg), lambda x: dice_loss(x, tg, batch=True),
               lambda x: distillation_loss(x, x.flip(1), tg, alpha=0.5)):
        got, ref = fn(lg), fn(lg.float())
        assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-6)
    inst = _nuclei_batch()
    target = {"nucleus_prediction": torch.from_numpy(inst),
              "horizontal_vertical": torch.from_numpy(np.stack([hv_targets(i) for i in inst]))}
    np_logits = (torch.from_numpy(inst > 0).float() * 4 - 2)[:, None].repeat(1, 2, 1, 1) * torch.tensor([-1.0, 1.0])[:, None, None]
    hv = target["horizontal_vertical"] * 0.8
    pred = {"nucleus_prediction": np_logits.to(half), "horizontal_vertical": hv.to(half)}
    ref_pred = {k: v.float() for k, v in pred.items()}
    got, terms = hovernet_loss(pred, target, return_terms=True)
    ref, ref_terms = hovernet_loss(ref_pred, target, return_terms=True)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for k in ref_terms:
        assert terms[k].item() == pytest.approx(ref_terms[k].item(), rel=1e-5, abs=1e-7), k
    x = torch.randn(6, 3, generator=g).to(half)
    assert cwce_loss(x, torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2])).item() == pytest.approx(
        cwce_loss(x.float(), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2])).item(), rel=1e-6)


def test_hovernet_targets_out_of_range_and_integer_one_hot():
    pred, target = _perfect(_instances())
    with pytest.raises(ParameterError, match=r"type_prediction.*\[0, 2\].*\[3\]"):
        hovernet_loss(pred, dict(target, type_prediction=target["type_prediction"] * 3 // 2))   # type 3 of 3 channels
    with pytest.raises(ParameterError, match=r"type_prediction.*-1"):
        hovernet_loss(pred, dict(target, type_prediction=target["type_prediction"] - 1))
    with pytest.raises(ParameterError, match="nucleus_prediction.*negative"):
        hovernet_loss(pred, dict(target, nucleus_prediction=-target["nucleus_prediction"]))
    ref = hovernet_loss(pred, target)
    onehot = {k: F.one_hot(target[k].long() if k == "type_prediction" else (target[k] > 0).long(),
                           3 if k == "type_prediction" else 2).permute(0, 3, 1, 2)
              for k in ("nucleus_prediction", "type_prediction")}
    for dtype in (torch.int64, torch.uint8, torch.bool):
        got = hovernet_loss(pred, dict(target, **{k: v.to(dtype) for k, v in onehot.items()}))
        assert got.item() == pytest.approx(ref.item(), abs=1e-12)
