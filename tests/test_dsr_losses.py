"""DSR losses: the frozen-but-differentiable identity supervisor, each term, the VGG error."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cycle.models import freeze
from dsr.losses import (
    DSRLoss,
    charbonnier,
    feature_distance,
    same_identity_partner,
    total_variation,
)
from dsr.model import DSR

ALL_ON = dict(pixel=1.0, identity=0.5, cross_identity=0.3, feature_match=0.15, tv=0.01)


class TinyFace(nn.Module):
    """Stand-in with EdgeFace's interface (and a BatchNorm, whose buffers must not move)."""

    def __init__(self):
        super().__init__()
        chans = [3, 8, 16, 24, 32]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=4 if i == 0 else 2, padding=1),
                          nn.BatchNorm2d(b), nn.GELU())
            for i, (a, b) in enumerate(zip(chans, chans[1:])))
        self.head = nn.Linear(32, 512)
        self.calls = []

    def forward(self, x, return_features=False):
        self.calls.append(return_features)
        x = (x - 0.5) / 0.5
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        emb = self.head(x.mean(dim=(2, 3)))
        return (emb, feats) if return_features else emb

    def embed(self, x):
        return F.normalize(self(x), dim=-1)


def _supervisor(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "standin":
        return TinyFace()
    edgeface = pytest.importorskip("edgeface")
    return edgeface.build("edgeface_xxs")


SUPERVISORS = ["standin", "edgeface_xxs"]


def _batch(res=16, b=4):
    torch.manual_seed(0)
    hr = F.interpolate(torch.rand(b, 3, 28, 28), size=(112, 112), mode="bilinear", align_corners=False)
    lr = F.interpolate(hr, size=(res, res), mode="area")
    return lr, hr, torch.tensor([0, 1, 0, 1])[:b]


@pytest.mark.parametrize("kind", SUPERVISORS)
def test_identity_loss_alone_trains_every_dsr_parameter_and_never_the_supervisor(kind):
    sup = _supervisor(kind)
    sup.train()  # freeze() must undo this
    before = {k: v.clone() for k, v in sup.state_dict().items()}
    loss_fn = DSRLoss(sup, pixel=0.0, identity=1.0)
    assert not sup.training and not any(p.requires_grad for p in sup.parameters())
    loss_fn.train()  # a caller switching the wrapper to train mode leaves E in eval mode
    assert not sup.training

    dsr = DSR(16, channels=8, num_blocks=2)
    opt = torch.optim.AdamW(list(dsr.parameters()) + list(sup.parameters()), lr=1e-2)
    lr, hr, _ = _batch()
    total, terms = loss_fn(dsr(lr), hr)
    assert set(terms) == {"loss", "identity"} and total.requires_grad
    opt.zero_grad()
    total.backward()
    no_grad = [n for n, p in dsr.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(p.grad is None for p in sup.parameters())
    snapshot = [p.detach().clone() for p in dsr.parameters()]
    opt.step()
    after = sup.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers
    assert all(not torch.equal(a, p) for a, p in zip(snapshot, dsr.parameters()))


@pytest.mark.parametrize("kind", SUPERVISORS)
def test_every_enabled_term_is_finite_and_reported(kind):
    loss_fn = DSRLoss(_supervisor(kind), **ALL_ON)
    dsr = DSR(16, channels=8, num_blocks=1)
    lr, hr, labels = _batch()
    total, terms = loss_fn(dsr(lr), hr, labels)
    assert set(terms) == {"loss", "pixel", "identity", "cross_identity", "feature_match", "tv"}
    assert all(torch.isfinite(v) and not v.requires_grad and v.dim() == 0 for v in terms.values())
    weighted = sum(ALL_ON[k] * terms[k] for k in ALL_ON)
    assert terms["loss"].item() == pytest.approx(weighted.item(), rel=1e-6)
    assert 0 < terms["identity"].item() < 2 and 0 < terms["feature_match"].item() < 4


def test_zero_weight_terms_are_absent_and_not_computed():
    sup = TinyFace()
    lr, hr, labels = _batch()
    sr = DSR(16, channels=8, num_blocks=1)(lr)

    total, terms = DSRLoss(sup, pixel=1.0, tv=0.1)(sr, hr, labels)
    assert set(terms) == {"loss", "pixel", "tv"} and sup.calls == []  # E never run

    DSRLoss(sup, pixel=0.0, identity=1.0)(sr, hr)
    assert sup.calls == [False, False]  # HR then SR, no intermediate features requested
    sup.calls.clear()
    _, terms = DSRLoss(sup, pixel=0.0, feature_match=1.0)(sr, hr)
    assert set(terms) == {"loss", "feature_match"} and sup.calls == [True, True]


def test_bad_configurations_fail_clearly():
    with pytest.raises(ValueError, match="supervisor"):
        DSRLoss(None, identity=0.5)
    with pytest.raises(ValueError, match="pixel_type"):
        DSRLoss(pixel_type="l2")
    with pytest.raises(ValueError, match=">= 0"):
        DSRLoss(pixel=-1.0)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        DSRLoss(pixel=0.0)
    lr, hr, _ = _batch()
    with pytest.raises(ValueError, match="labels"):
        DSRLoss(TinyFace(), cross_identity=1.0)(hr, hr)
    with pytest.raises(ValueError, match="got 3 labels for a batch of 4"):
        DSRLoss(TinyFace(), cross_identity=1.0)(hr, hr, torch.tensor([0, 0, 1]))


def test_quantized_supervisor_is_rejected_since_it_passes_no_gradient():
    x = torch.rand(1, 3, 112, 112, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation, "no autograd kernel" notices
        q = torch.ao.quantization.quantize_dynamic(TinyFace().eval(), {nn.Linear}, dtype=torch.qint8)
        try:
            q(x).sum().backward()
        except RuntimeError:  # newer torch may refuse instead of silently dropping the gradient
            pass
    assert x.grad is None  # the failure the check guards against
    with pytest.raises(ValueError, match="quantized.*float version"):
        DSRLoss(q, identity=1.0)


def test_quantized_edgeface_is_rejected():
    edgeface = pytest.importorskip("edgeface")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = edgeface.build("edgeface_xxs_q")
    with pytest.raises(ValueError, match="quantized"):
        DSRLoss(q, pixel=1.0, feature_match=0.1)


def test_pixel_losses_on_a_hand_case():
    sr = torch.zeros(1, 1, 1, 4)
    hr = torch.tensor([0.0, 0.3, -0.4, 1.0]).view(1, 1, 1, 4)
    expected = (0.1 + math.sqrt(0.1) + math.sqrt(0.17) + math.sqrt(1.01)) / 4  # eps = 0.1
    assert charbonnier(sr, hr, eps=0.1).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.458382, abs=1e-6)
    _, l1 = DSRLoss(pixel=1.0)(sr, hr)
    _, ch = DSRLoss(pixel=1.0, pixel_type="charbonnier", charbonnier_eps=0.1)(sr, hr)
    assert l1["pixel"].item() == pytest.approx(0.425, rel=1e-6)
    assert ch["pixel"].item() == pytest.approx(0.458382, rel=1e-5)


def test_total_variation_on_a_hand_case():
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).view(1, 1, 2, 2)
    assert total_variation(x).item() == pytest.approx(1.0)  # 0.5 vertical + 0.5 horizontal
    _, terms = DSRLoss(pixel=0.0, tv=2.0)(x, x)
    assert terms["tv"].item() == pytest.approx(1.0) and terms["loss"].item() == pytest.approx(2.0)


def test_cross_identity_pairs_with_another_image_of_the_same_identity():
    labels = torch.tensor([3, 5, 3, 7, 5, 3])
    partner, valid = same_identity_partner(labels)
    assert partner.tolist() == [2, 4, 5, 3, 1, 0]  # next same-identity image, wrapping around
    assert valid.tolist() == [True, True, True, False, True, True]  # identity 7 has one image
    idx = torch.arange(6)
    assert torch.all(labels[partner] == labels) and torch.all((partner != idx) | ~valid)


class _MeanColour(nn.Module):
    """Embedding = mean colour: makes the identity terms computable by hand."""

    def forward(self, x, return_features=False):
        emb = x.mean(dim=(2, 3))
        return (emb, [x]) if return_features else emb


def test_identity_and_cross_identity_values_by_hand():
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0], [0, 0, 1.0]])
    hr = colours.view(4, 3, 1, 1).expand(4, 3, 112, 112).contiguous()
    sr = torch.full_like(hr, 0.5)  # grey: cos with a pure colour = 1/sqrt(3), with yellow sqrt(2/3)
    labels = torch.tensor([0, 0, 1, 2])  # 0 and 1 are a pair, 2 and 3 have no partner
    _, terms = DSRLoss(_MeanColour(), pixel=0.0, identity=1.0, cross_identity=1.0)(sr, hr, labels)
    c1, c2 = 1 / math.sqrt(3), math.sqrt(2 / 3)
    assert terms["identity"].item() == pytest.approx(1 - (3 * c1 + c2) / 4, rel=1e-5)
    # Pairs (0 -> 1) and (1 -> 0), both with pure colours; 2 and 3 are ignored.
    assert terms["cross_identity"].item() == pytest.approx(1 - c1, rel=1e-5)
    # No pairs at all: the term is 0, not NaN.
    _, terms = DSRLoss(_MeanColour(), pixel=0.0, cross_identity=1.0)(sr, hr, torch.arange(4))
    assert terms["cross_identity"].item() == 0.0


def test_feature_distance_is_scale_free_and_zero_on_equal_features():
    torch.manual_seed(0)
    a, b = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    assert feature_distance(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_distance(10 * a, 0.1 * b).item() == pytest.approx(feature_distance(a, b).item(), rel=1e-5)
    cos = F.cosine_similarity(a, b, dim=1)
    assert feature_distance(a, b).item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    assert feature_distance(a, -a).item() == pytest.approx(4.0, rel=1e-5)


def test_perceptual_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        DSRLoss(pixel=1.0, perceptual=0.1)
    msg = str(err.value)
    assert "vgg19-dcbb9e9d.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "loss.vgg_weights" in msg and "loss.perceptual=0" in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pth does not exist"):
        DSRLoss(pixel=1.0, perceptual=0.1, vgg_weights=str(tmp_path / "nowhere.pth"))


def test_perceptual_with_a_local_vgg_file(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    path = tmp_path / "vgg19.pth"
    # torchvision's key names, random weights (this checks the plumbing, not ImageNet features);
    # a classifier entry stands for the rest of the real file, which is ignored.
    state = {f"features.{k}": v for k, v in make_layers(cfgs["E"]).state_dict().items()}
    torch.save({**state, "classifier.0.bias": torch.zeros(4)}, path)
    loss_fn = DSRLoss(pixel=0.0, perceptual=1.0, perceptual_layers=["relu1_2", "relu2_2"],
                      vgg_weights=str(path))
    assert len(loss_fn.vgg.features) == 9 and not any(p.requires_grad for p in loss_fn.vgg.parameters())
    hr = torch.rand(2, 3, 112, 112)
    sr = hr.clone().requires_grad_(True)
    _, same = loss_fn(sr, hr)
    assert same["perceptual"].item() == 0.0
    total, terms = loss_fn(sr * 0.5, hr)
    total.backward()
    assert terms["perceptual"].item() > 0 and sr.grad.abs().sum() > 0

    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="not a torchvision VGG19 state_dict"):
        DSRLoss(pixel=0.0, perceptual=1.0, vgg_weights=str(path))
    with pytest.raises(ValueError, match="unknown VGG19 layers"):
        DSRLoss(pixel=0.0, perceptual=1.0, perceptual_layers=["conv9_9"], vgg_weights=str(path))


def test_freeze_returns_module_in_eval_with_no_trainable_params():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    assert freeze(m) is m and not m.training and not any(p.requires_grad for p in m.parameters())
    x = torch.ones(1, 2, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # frozen, still differentiable
