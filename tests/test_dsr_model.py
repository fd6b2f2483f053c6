"""DSR model, its config entry and FLOP counting (vs the prototype's DSR in bench/)."""
import importlib.util
import math
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from cycle.flops import count_flops, gflops_per_image
from dsr.model import DSR, build_dsr, clamp_st, describe, upsample_bicubic

ROOT = Path(__file__).resolve().parents[1]
DSR_YAML = ROOT / "conf" / "dsr" / "default.yaml"
RES = (16, 24, 32)


def _load_prototype():
    spec = importlib.util.spec_from_file_location("prototype_dsr", ROOT / "bench" / "prototype_dsr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _from_yaml(res) -> nn.Module:
    cfg = OmegaConf.create({"res": res, "dsr": OmegaConf.load(DSR_YAML)})
    return hydra.utils.instantiate(cfg.dsr)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a, b).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.mark.parametrize("res", RES)
def test_yaml_builds_dsr_for_each_res(res):
    model = _from_yaml(str(res))
    assert isinstance(model, DSR) and model.res == res
    assert model.config == _from_yaml(res).config  # int res too
    x = torch.rand(2, 3, res, res)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 112, 112) and y.is_contiguous()
    assert y.min() >= 0.0 and y.max() <= 1.0


def test_yaml_with_typed_res_enum():
    # The real train config carries `res` as an Enum member whose str() is '16'.
    from cycle.config import Res

    cfg = OmegaConf.create({"res": Res["24"], "dsr": OmegaConf.load(DSR_YAML)})
    assert hydra.utils.instantiate(cfg.dsr).res == 24


def test_yaml_arch_table_differs_per_res_and_overrides_apply():
    arch = OmegaConf.load(DSR_YAML).arch
    assert set(arch) == {"16", "24", "32"}
    assert build_dsr(16, arch).config["channels"] == arch["16"]["channels"]
    assert build_dsr("32", arch).config["num_blocks"] == arch["32"]["num_blocks"]
    small = build_dsr(24, arch, channels=8, num_blocks=1)
    assert (small.config["channels"], small.config["num_blocks"]) == (8, 1)


@pytest.mark.parametrize("bad", [20, "20", "abc", None])
def test_unknown_res_is_rejected_listing_valid_ones(bad):
    with pytest.raises(ValueError, match="16, 24, 32"):
        build_dsr(bad, {"16": {}, "24": {}, "32": {}})


@pytest.mark.parametrize("res", RES)
def test_untrained_model_is_close_to_bicubic(res):
    torch.manual_seed(0)
    model = _from_yaml(res).eval()
    lr = torch.rand(4, 3, res, res)
    bicubic = upsample_bicubic(lr)
    assert torch.equal(bicubic, F.interpolate(lr, size=(112, 112), mode="bicubic").clamp(0, 1))
    with torch.no_grad():
        sr = model(lr)
    assert psnr(sr, bicubic) > 40.0
    assert not torch.equal(sr, bicubic)  # small init, not zero: the residual branch is live


def test_input_never_downsampled_before_the_trunk():
    # 32 px goes to a 56 px grid + pixel-unshuffle, 16/24 px straight to 28 px.
    assert [DSR(r, 8, 1).unshuffle for r in RES] == [1, 1, 2]
    assert DSR(32, 8, 1).head.in_channels == 12


def test_channels_last_is_a_layout_choice_only():
    torch.manual_seed(0)
    a = DSR(24, 8, 2, out_init_scale=1.0)
    b = DSR(24, 8, 2, out_init_scale=1.0, channels_last=False)
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=0)


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"built for \(B, 3, 16, 16\).*got \(1, 3, 24, 24\)"):
        DSR(16, 8, 1)(torch.rand(1, 3, 24, 24))
    with pytest.raises(ValueError, match="RGB"):
        DSR(16, 8, 1)(torch.rand(1, 1, 16, 16))


def test_clamp_st_bounds_forward_and_passes_gradient():
    x = torch.tensor([-0.5, 0.25, 1.5], requires_grad=True)
    y = clamp_st(x)
    assert y.tolist() == [0.0, 0.25, 1.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]  # a hard clamp would give [0, 2, 0]


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    # Sharp-edged blocks: bicubic blurs the edges, so there is residual detail to learn.
    hr = F.interpolate(torch.rand(2, 3, 14, 14), size=(112, 112), mode="nearest")
    lr = F.interpolate(hr, size=(16, 16), mode="area")
    model = DSR(16, channels=8, num_blocks=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = F.l1_loss(model(lr), hr).item()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~100 tiny ops per step: thread sync costs more than it saves on a busy CPU
    try:
        for _ in range(20):
            loss = F.l1_loss(model(lr), hr)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.92 * start  # measured 0.878


def test_count_flops_known_layers():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.rand(1, 3, 10, 10)
    assert count_flops(conv, x, backward=False) == 2 * 9 * 3 * 8 * 100
    # Backward of the first layer: weight gradient only (the input needs no gradient).
    assert count_flops(conv, x) == 2 * (2 * 9 * 3 * 8 * 100)
    assert conv.weight.grad is None  # counting leaves .grad alone
    lin = nn.Linear(16, 4)
    assert count_flops(lin, torch.rand(5, 16), backward=False) == 2 * 5 * 16 * 4


def test_gflops_per_image_divides_by_batch():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    one = gflops_per_image(conv, (3, 8, 8), backward=False)
    assert one * 1e9 == 2 * 9 * 3 * 4 * 64
    assert gflops_per_image(conv, (5, 3, 8, 8), backward=False) == pytest.approx(one)


def test_cpu_attention_flops_are_counted():
    # torch's counter misses the CPU flash-attention kernel; cycle.flops registers it.
    attn = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.rand(2, 64, 32)
    fwd = count_flops(_SelfAttention(attn), x, backward=False)
    projections = 2 * 2 * 64 * (32 * 96 + 32 * 32)  # in_proj + out_proj, batch 2
    scores = 2 * 2 * 2 * 64 * 64 * 32  # QK^T and AV, batch 2
    assert fwd == projections + scores


class _SelfAttention(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_describe_reports_params_and_gflops():
    model = DSR(16, channels=8, num_blocks=1)
    text = describe(model, 16)
    n = sum(p.numel() for p in model.parameters())
    assert f"{n / 1e6:.3f}M parameters" in text and "GFLOP/image forward+backward" in text


def test_prototype_reference_matches_published_size():
    proto = _load_prototype()
    for res, (params, gflops, _) in proto.PROTOTYPE_QUOTED.items():
        n = sum(p.numel() for p in proto.build_prototype(res).parameters())
        assert n == pytest.approx(params, rel=0.005), res
    g16 = gflops_per_image(proto.build_prototype(16).train(), (2, 3, 16, 16))
    assert g16 == pytest.approx(proto.PROTOTYPE_QUOTED[16][1], rel=0.05)


@pytest.mark.parametrize("res", RES)
def test_dsr_needs_at_most_a_quarter_of_the_prototype_training_flops(res):
    proto = _load_prototype()
    ours = gflops_per_image(_from_yaml(res).train(), (2, 3, res, res))
    theirs = gflops_per_image(proto.build_prototype(res).train(), (2, 3, res, res))
    assert theirs == pytest.approx(proto.PROTOTYPE_QUOTED[res][1], rel=0.05)
    assert ours <= theirs / 4
