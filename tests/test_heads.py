"""ArcFace / CosFace margin heads: exact margins, fallback, fp16/bf16 extremes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgeface import ArcFace, CosFace, build_head


def _planar_head(cls, **kw):
    """2-d head with class directions at 0, 90 and 180 degrees, so cosines are known in closed form."""
    head = cls(embedding_size=2, num_classes=3, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    return head


def _at(theta):
    theta = torch.as_tensor(theta, dtype=torch.float32)
    return torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)


def test_arcface_adds_angular_margin_to_target_only():
    head = _planar_head(ArcFace, scale=10.0, margin=0.5)
    emb = 3.0 * _at([0.3])  # norm must not matter
    out = head(emb, torch.tensor([0]))
    expected = 10.0 * torch.tensor([[math.cos(0.8), math.cos(math.pi / 2 - 0.3), math.cos(math.pi - 0.3)]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert out.dtype == torch.float32


def test_arcface_fallback_past_pi_minus_m_keeps_logit_decreasing():
    head = _planar_head(ArcFace, scale=1.0, margin=0.5)
    out = head(_at([3.0]), torch.tensor([0]))[0, 0]  # theta = 3.0 > pi - 0.5
    assert out.item() == pytest.approx(math.cos(3.0) - 0.5 * math.sin(0.5), abs=1e-5)
    thetas = torch.linspace(0.0, math.pi, 400)
    target = head(_at(thetas), torch.zeros(400, dtype=torch.long))[:, 0]
    assert (target[1:] <= target[:-1] + 1e-6).all()  # never rewards a larger angle


def test_arcface_easy_margin_only_for_positive_cosine():
    head = _planar_head(ArcFace, scale=1.0, margin=0.5, easy_margin=True)
    out = head(_at([0.3, 2.0]), torch.tensor([0, 0]))[:, 0]
    torch.testing.assert_close(out, torch.tensor([math.cos(0.8), math.cos(2.0)]), rtol=0, atol=1e-5)


def test_cosface_subtracts_margin_from_target_only():
    head = _planar_head(CosFace, scale=64.0, margin=0.35)
    out = head(_at([0.3]), torch.tensor([1]))
    c = [math.cos(0.3), math.cos(math.pi / 2 - 0.3), math.cos(math.pi - 0.3)]
    torch.testing.assert_close(out, 64.0 * torch.tensor([[c[0], c[1] - 0.35, c[2]]]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("cls", [ArcFace, CosFace])
def test_validation_logits_have_no_margin(cls):
    head = _planar_head(cls, scale=64.0)
    emb, labels = _at([0.3, 1.0]), torch.tensor([0, 1])
    val, train = head.logits(emb), head(emb, labels)
    torch.testing.assert_close(val, 64.0 * F.linear(F.normalize(emb), head.weight).clamp(-1 + 1e-6, 1 - 1e-6))
    target = F.one_hot(labels, 3).bool()
    torch.testing.assert_close(val[~target], train[~target])
    assert (train[target] < val[target] - 1.0).all()  # the margin lowers each target logit


def _extreme_fp16_embeddings(head):
    """Rows: huge norm (fp16 max-ish), tiny norm, exact zero, exactly a class direction (cos = +1),
    exactly its opposite (cos = -1), and a random row."""
    w = head.weight.detach()
    rows = [torch.full((512,), 6.0e4), torch.full((512,), 1e-7), torch.zeros(512),
            w[0] * 1000.0, -w[0] * 1000.0, torch.randn(512, generator=torch.Generator().manual_seed(0))]
    return torch.stack(rows).half()


@pytest.mark.parametrize("cls,kw", [(ArcFace, {}), (ArcFace, {"easy_margin": True}), (CosFace, {})])
def test_fp16_extremes_give_finite_loss_and_gradients(cls, kw):
    torch.manual_seed(0)
    head = cls(512, 10, **kw)
    emb = _extreme_fp16_embeddings(head).requires_grad_(True)
    assert torch.isinf(emb.float().pow(2).sum(1)).logical_not().all()  # inputs themselves are finite
    assert torch.isinf(emb[:1].pow(2).sum()).item()  # ...but their squared norm overflows in fp16
    labels = torch.tensor([0, 1, 2, 0, 0, 3])
    logits = head(emb, labels)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert emb.grad.dtype == torch.float16 and torch.isfinite(emb.grad).all()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
    cos = head.cosine(emb.detach())
    assert cos.max() < 1.0 and cos.min() > -1.0  # clamped away from the sqrt singularity


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_autocast_bf16_and_half_head_stay_finite(name):
    torch.manual_seed(0)
    head = build_head(name, 512, 10)
    emb = torch.randn(8, 512, requires_grad=True)
    labels = torch.arange(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(emb, labels)
    assert logits.dtype == torch.float32  # autocast disabled inside the head
    F.cross_entropy(logits, labels).backward()
    assert torch.isfinite(emb.grad).all()
    half = build_head(name, 512, 10).half()
    out = half(emb.detach().half() * 1e3, labels)
    F.cross_entropy(out, labels).backward()
    assert torch.isfinite(out).all() and torch.isfinite(half.weight.grad).all()


def test_margin_loss_trains_separable_embeddings():
    torch.manual_seed(0)
    head = ArcFace(16, 4, scale=16.0, margin=0.3)
    centers = F.normalize(torch.randn(4, 16), dim=1)
    labels = torch.arange(4).repeat(16)
    emb = centers[labels] + 0.1 * torch.randn(64, 16)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(60):
        loss = F.cross_entropy(head(emb, labels), labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    assert (head.logits(emb).argmax(1) == labels).float().mean() == 1.0


def test_build_head_and_bad_arguments():
    head = build_head("ArcFace", 128, 7, scale=30.0, margin=0.4)
    assert isinstance(head, ArcFace) and head.weight.shape == (7, 128) and head.scale == 30.0
    assert isinstance(build_head("cosface", num_classes=3), CosFace)
    with pytest.raises(ValueError, match="arcface, cosface"):
        build_head("sphereface", 512, 10)
    with pytest.raises(TypeError, match="num_classes"):
        ArcFace()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        head = ArcFace(512, 10)
        head(torch.randn(2, 512), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"\(B, 512\)"):
        ArcFace(512, 10).logits(torch.randn(2, 128))
