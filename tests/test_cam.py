"""Our batched, all-layers-at-once CAMs against an independent per-image,
per-layer computation written straight from the papers' formulas, plus a
hand-derived Grad-CAM case; and the CAM target rule."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from topocam.core import cam as cam_module
from topocam.core.backbone import CAM_LAYERS, Backbone, SmallCNN
from topocam.core.cam import (
    CAM_VARIANTS, CAMS, CamChoice, CamVariant, LayerInputs, _Activations, _combine, _score_cam_weights, _scoring_net,
    cam_targets, check_variant, compute_cams, normalise_maps,
)
from topocam.core.errors import TopoCAMError


class TinyNet(nn.Module):
    """Layout of our backbones (layer1..layer4, pooled linear head) in a few weights."""

    def __init__(self, ndim=2, stride=2):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.layer1 = nn.Sequential(conv(3, 4, 3, 1, 1), nn.ReLU())
        self.layer2 = nn.Sequential(conv(4, 5, 3, stride, 1), nn.ReLU())
        self.layer3 = nn.Sequential(conv(5, 6, 3, stride, 1), nn.ReLU())
        self.layer4 = nn.Sequential(conv(6, 7, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(7, 3)

    def forward(self, x):
        a = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(a.flatten(2).mean(-1))


def _norm(cam):
    cam = np.maximum(cam, 0)
    span = cam.max() - cam.min()
    return (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)


def reference_cam(model, x1, layer_name, variant, target):
    """One image, one layer, straight from the definitions."""
    store = {}
    layer = getattr(model.net, layer_name)
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    logits = model(x1)
    a = store["a"]
    h.remove()
    a0 = a[0].detach()
    if variant == "eigencam":  # pytorch-grad-cam's get_2d_projection, in numpy, plus our sign rule
        acts = a0.double().numpy()
        flat = acts.reshape(acts.shape[0], -1).T  # positions x channels
        centred = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=True)
        proj = centred @ vt[0]
        if np.dot(proj, flat.sum(axis=1)) < 0:
            proj = -proj
        return _norm(proj.reshape(acts.shape[1:]))
    if variant == "layercam":
        g = torch.autograd.grad(logits[0, target], a)[0][0]
        return _norm((F.relu(g) * a0).sum(0).detach().numpy())
    if variant in ("gradcam", "gradcampp"):
        g = torch.autograd.grad(logits[0, target], a)[0][0]
        dims = tuple(range(1, g.ndim))
        if variant == "gradcam":
            w = g.mean(dim=dims)
        else:
            num = g**2
            den = 2 * g**2 + a0.sum(dim=dims, keepdim=True) * g**3
            alpha = torch.where(g != 0, num / (den + 1e-7), torch.zeros_like(g))
            w = (alpha * F.relu(g)).sum(dim=dims)
    elif variant == "scorecam":
        scores = []
        mode = "bilinear" if x1.ndim == 4 else "trilinear"
        with torch.no_grad():
            for k in range(a0.shape[0]):
                m = F.interpolate(a0[k][None, None], size=x1.shape[2:], mode=mode, align_corners=False)[0, 0]
                m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else torch.zeros_like(m)
                scores.append(model(x1 * m)[0, target])
        w = torch.softmax(torch.stack(scores), dim=0)
    else:
        raise AssertionError(f"no reference computation for CAM variant {variant!r}: write one here")
    cam = (w.reshape(-1, *([1] * (a0.ndim - 1))) * a0).sum(0)
    return _norm(cam.detach().numpy())


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("variant", CAM_VARIANTS)
def test_batched_cams_match_independent_computation(ndim, variant):
    torch.manual_seed(0)
    model = Backbone(TinyNet(ndim), "tiny").eval()
    x = torch.rand((5, 1) + (12,) * ndim).numpy()
    out = compute_cams(model, x, variant, batch_size=2, score_chunk=3)
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    assert np.array_equal(out.targets, pred)
    for layer in CAM_LAYERS:
        assert out.maps[layer].min() >= 0 and out.maps[layer].max() <= 1
        for i in range(len(x)):
            ref = reference_cam(model, torch.from_numpy(x[i : i + 1]), layer, variant, int(pred[i]))
            np.testing.assert_allclose(out.maps[layer][i], ref, atol=2e-5, err_msg=f"{variant} {layer} image {i}")


def _score_cam_weights_loop(model, x, acts, targets, chunk):
    """Score-CAM weights as computed before issue 11: image by image, a chunk of
    channels per forward pass of the model itself (BatchNorm unfused)."""
    n, c = acts.shape[:2]
    up = F.interpolate(acts, size=x.shape[2:], mode="bilinear" if x.ndim == 4 else "trilinear", align_corners=False)
    up = normalise_maps(up.reshape(n * c, *up.shape[2:]).unsqueeze(1)).reshape(n, c, *up.shape[2:])
    scores = torch.empty(n, c)
    for i in range(n):
        for j in range(0, c, chunk):
            scores[i, j : j + chunk] = model(x[i : i + 1] * up[i, j : j + chunk].unsqueeze(1))[:, targets[i]]
    return torch.softmax(scores, dim=1)


def _bn_model(ndim, size, seed=0):
    """The ``small`` layout, 4 channels wide, its BatchNorm statistics taken from
    random inputs (so the output depends on the input) and its affine parameters
    random (so that folding them into the convolutions is exercised)."""
    torch.manual_seed(seed)
    model = Backbone(SmallCNN(ndim, 3, width=4), "small")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                m.momentum = None  # running statistics = those of the one batch below
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.3, 0.3)
        model.train()(torch.rand((8, 1) + (size,) * ndim))
        model.net.fc.weight.mul_(4)  # scores far apart: Score-CAM weights far from uniform
    return model.eval()


@pytest.mark.parametrize("ndim, size", [(2, 16), (3, 12)])
def test_batched_score_cam_equals_per_image_loop(ndim, size):
    """The batched, BatchNorm-folded, channels-last Score-CAM against the
    per-image loop it replaced: the same weights and maps to float32 rounding,
    for a chunk that splits images and does not divide the channel count."""
    model = _bn_model(ndim, size)
    x = torch.rand((5, 1) + (size,) * ndim)
    before = model(x)
    out = compute_cams(model, x.numpy(), "scorecam", batch_size=3, score_chunk=24)
    hooks = _Activations(model)
    with torch.no_grad():
        targets = cam_targets(model(x))
        acts = dict(hooks.out)
        hooks.close()
        scorer = _scoring_net(model)
        for layer in CAM_LAYERS:
            a = acts[layer]
            w_ref = _score_cam_weights_loop(model, x, a, targets, 16)
            w = _score_cam_weights(LayerInputs(acts=a, grads=None, x=x, targets=targets, scorer=scorer, chunk=12))
            assert (w_ref.max(dim=1).values / w_ref.min(dim=1).values).min() > 1.5, "near-uniform weights test nothing"
            np.testing.assert_allclose(w.numpy(), w_ref.numpy(), rtol=2e-5, atol=1e-7, err_msg=f"{layer} weights")
            ref_map = _combine(a, w_ref).numpy()
            np.testing.assert_allclose(out.maps[layer], ref_map, rtol=0, atol=1e-5, err_msg=f"{layer} maps")
    assert np.array_equal(out.targets, targets.numpy())
    assert torch.equal(model(x), before), "the model itself must not be changed (BatchNorm folded into a copy)"


def test_gradcam_layer4_hand_derived():
    """With logits = W . mean(A) + b, dS/dA_k = W[c, k] / |A|, so Grad-CAM at
    layer4 is ReLU(sum_k W[c, k] A_k), normalised."""
    torch.manual_seed(1)
    net = TinyNet(2)
    model = Backbone(net, "tiny").eval()
    x = torch.rand(4, 1, 10, 10)
    out = compute_cams(model, x.numpy(), "gradcam")
    with torch.no_grad():
        a = net.layer4(net.layer3(net.layer2(net.layer1(x.expand(-1, 3, -1, -1)))))
        c = model(x).argmax(1)
        for i in range(4):
            expected = _norm(torch.einsum("k,khw->hw", net.fc.weight[c[i]], a[i]).numpy())
            np.testing.assert_allclose(out.maps["layer4"][i], expected, atol=1e-5)


def test_target_rule_is_predicted_class_and_label_only_on_request():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    labels = torch.tensor([1, 1, 1])
    assert cam_targets(logits).tolist() == [0, 1, 0]
    assert cam_targets(logits, labels).tolist() == [0, 1, 0]  # labels are ignored by the default rule
    assert cam_targets(logits, labels, rule="label").tolist() == [1, 1, 1]


def test_label_rule_changes_maps_where_prediction_is_wrong():
    torch.manual_seed(2)
    model = Backbone(TinyNet(2), "tiny").eval()
    x = torch.rand(8, 1, 12, 12).numpy()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    labels = (pred + 1) % 3  # every label disagrees with the prediction
    a = compute_cams(model, x, "gradcam", labels=labels)
    b = compute_cams(model, x, "gradcam", labels=labels, rule="label")
    assert np.array_equal(a.targets, pred) and np.array_equal(b.targets, labels)
    assert not np.allclose(a.maps["layer4"], b.maps["layer4"])


def test_variant_names_are_the_table_keys():
    assert CAM_VARIANTS == tuple(CAMS) == ("gradcam", "gradcampp", "scorecam", "layercam", "eigencam")
    assert [c.value for c in CamChoice] == list(CAMS)
    assert [n for n, row in CAMS.items() if row.uses_gradients] == ["gradcam", "gradcampp", "layercam"]
    assert [n for n, row in CAMS.items() if row.needs_scorer] == ["scorecam"]
    with pytest.raises(TopoCAMError, match="unknown CAM variant 'xgradcam'; choose one of gradcam, gradcampp, scorecam, "
                                           "layercam, eigencam"):
        check_variant("xgradcam")


def test_only_the_papers_variants_are_searched_by_default():
    """LayerCAM and EigenCAM are allowed in a study's [space.cam] but not in its default
    space: adding them must not change the definition (and so the stored trials) of every
    existing study that searches ``cam`` at its default."""
    from topocam.search.space import CHOICES, DEFAULT_SPACE, build_space

    assert DEFAULT_SPACE["cam"].choices == ("gradcam", "gradcampp", "scorecam")
    assert CHOICES["cam"] == CAM_VARIANTS
    wider = build_space({"cam": {"choices": ["gradcam", "eigencam", "layercam"]}}, "study.toml")
    assert wider["cam"].choices == ("gradcam", "eigencam", "layercam")


def test_eigencam_sign_follows_the_activations():
    """An SVD's leading vector has an arbitrary sign; ours is fixed so the map is
    high where the summed activation is: flipping every activation's sign
    relative to its mean must not flip which positions the map keeps."""
    acts = torch.zeros((1, 3, 6, 6))
    acts[0, :, 1:3, 1:3] = torch.tensor([2.0, 1.0, 3.0])[:, None, None]  # one bright blob
    acts += 0.01 * torch.rand(acts.shape, generator=torch.Generator().manual_seed(0))
    inp = LayerInputs(acts=acts, grads=None, x=torch.zeros((1, 1, 12, 12)), targets=torch.zeros(1, dtype=torch.long),
                      scorer=None, chunk=1)
    m = normalise_maps(F.relu(CAMS["eigencam"].projection(inp)))[0]
    assert m[1:3, 1:3].min() > 0.9 and m[4:, 4:].max() < 0.1


def _equal_weights(inp: LayerInputs) -> torch.Tensor:
    """A toy variant ("meancam"): every channel weighs the same; needs no gradients, no scorer."""
    assert inp.grads is None and inp.scorer is None
    n, c = inp.acts.shape[:2]
    return torch.full((n, c), 1.0 / c)


def _no_scorer(model):
    raise AssertionError("a row without needs_scorer must not build the scoring network")


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_new_row_is_a_new_variant(monkeypatch, ndim):
    """Adding a variant touches only the table: compute_cams runs a gradient-free
    row without taking gradients or building the scorer, and its maps are the
    direct computation, normalise(ReLU(mean_k A_k))."""
    monkeypatch.setitem(CAMS, "meancam", CamVariant(_equal_weights, uses_gradients=False, about="toy: equal weights"))
    monkeypatch.setattr(cam_module, "_scoring_net", _no_scorer)
    torch.manual_seed(3)
    model = Backbone(TinyNet(ndim), "tiny").eval()
    x = torch.rand((5, 1) + (12,) * ndim)
    check_variant("meancam")
    out = compute_cams(model, x.numpy(), "meancam", batch_size=2)
    hooks = _Activations(model)
    with torch.no_grad():
        assert np.array_equal(out.targets, model(x).argmax(1).numpy())
        for layer in CAM_LAYERS:
            a = hooks.out[layer]
            expected = normalise_maps(F.relu(a.mean(dim=1))).numpy()
            np.testing.assert_allclose(out.maps[layer], expected, rtol=0, atol=2e-5, err_msg=layer)
            assert out.maps[layer].max() == 1.0
    hooks.close()
    assert all(p.requires_grad for p in model.parameters()), "the parameters' flags are restored"


def test_a_new_gradient_row_gets_the_gradients_of_every_layer(monkeypatch):
    """uses_gradients=True hands a row dS/dA of its own layer: a row whose weights
    are the summed gradients is Grad-CAM times the layer's size, the same maps."""
    seen = []

    def summed(inp: LayerInputs) -> torch.Tensor:
        assert inp.grads is not None and inp.grads.shape == inp.acts.shape and inp.scorer is None
        seen.append(inp.acts.shape)
        return inp.grads.sum(dim=tuple(range(2, inp.grads.ndim)))

    monkeypatch.setitem(CAMS, "sumcam", CamVariant(summed, uses_gradients=True))
    torch.manual_seed(4)
    model = Backbone(TinyNet(2), "tiny").eval()
    x = torch.rand(4, 1, 12, 12).numpy()
    out, ref = compute_cams(model, x, "sumcam"), compute_cams(model, x, "gradcam")
    assert len(seen) == len(CAM_LAYERS)
    for layer in CAM_LAYERS:
        np.testing.assert_allclose(out.maps[layer], ref.maps[layer], rtol=0, atol=1e-5, err_msg=layer)
