"""The shared training loop: resume, EMA, schedule, NaN guard (on a tiny regression)."""
import math

import pytest
import torch
from torch import nn

from cycle.checkpoint import load_checkpoint
from cycle.errors import ConfigError
from cycle.health import HealthMonitor
from cycle.device import resolve_device
from cycle.training import EMA, NonFiniteLoss, Trainer, warmup_cosine


class NullLogger:
    run_id = None

    def __init__(self):
        self.rows, self.warnings = [], []

    def log(self, row, step):
        self.rows.append((step, dict(row)))

    def warn(self, code, msg, step):
        self.warnings.append(code)


TCFG = {"grad_accum": 1, "grad_clip": 1.0, "amp": "off", "log_every": 1, "ckpt_every": 1, "progress": False}


def make_data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i:i + 2], "y": x[i:i + 2] @ torch.arange(4.0)} for i in range(0, n, 2)]


def make_trainer(tmp_path, epochs=3, tag="main", ema=True, resume=True, tcfg=TCFG):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    tr = Trainer(tcfg=tcfg, run_dir=tmp_path, logger=NullLogger(), device=torch.device("cpu"),
                 modules={"model": model}, optimizer=opt, epochs=epochs, steps_per_epoch=6, tag=tag,
                 ema=EMA(model, 0.9) if ema else None, resume=resume)
    return tr, model


def step_fn_for(model):
    def step(batch):
        loss = (model(batch["x"]).squeeze(1) - batch["y"]).pow(2).mean()
        return loss, {"mse": loss.detach()}
    return step


def test_resume_continues_the_step_counter_and_matches_uninterrupted(tmp_path):
    data = make_data()
    full, fm = make_trainer(tmp_path / "full")
    ref = full.fit(data, step_fn_for(fm), lambda e: {"val/neg": -e}, select="val/neg")
    assert ref.step == 18

    # interrupted: stop after 8 optimizer steps (mid-epoch 2), as a crash would
    part, pm = make_trainer(tmp_path / "part")
    calls = {"n": 0}

    def crashing(batch):
        calls["n"] += 1
        if calls["n"] > 8:
            raise KeyboardInterrupt
        return step_fn_for(pm)(batch)

    with pytest.raises(KeyboardInterrupt):
        part.fit(data, crashing, lambda e: {"val/neg": -e}, select="val/neg")
    assert load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["step"] == 8

    again, am = make_trainer(tmp_path / "part")
    assert again.resumed and again.step == 8 and again.epoch == 1
    res = again.fit(data, step_fn_for(am), lambda e: {"val/neg": -e}, select="val/neg")
    assert res.step == 18
    for a, b in zip(am.state_dict().values(), fm.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    for k in full.ema.shadow:
        assert torch.allclose(again.ema.shadow[k], full.ema.shadow[k], atol=1e-6)
    assert again.scheduler.state_dict()["last_epoch"] == full.scheduler.state_dict()["last_epoch"] == 18


def test_finished_phase_is_skipped_on_rerun(tmp_path):
    data = make_data()
    tr, m = make_trainer(tmp_path, epochs=1)
    tr.fit(data, step_fn_for(m))
    w = m.weight.detach().clone()
    tr2, m2 = make_trainer(tmp_path, epochs=1)
    called = []
    res = tr2.fit(data, lambda b: called.append(1))
    assert not called and res.step == 6 and torch.equal(m2.weight, w)


def test_other_phase_checkpoint_is_not_loaded(tmp_path):
    tr, m = make_trainer(tmp_path, epochs=1, tag="phase1")
    tr.save()
    tr2, _ = make_trainer(tmp_path, epochs=1, tag="phase2")
    assert not tr2.resumed


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = make_data()
    tr, m = make_trainer(tmp_path, epochs=2)
    n = {"i": 0}

    def step(batch):
        n["i"] += 1
        loss, terms = step_fn_for(m)(batch)
        if n["i"] == 4:
            terms["identity"] = torch.tensor(float("nan"))
            loss = loss + terms["identity"]
        return loss, terms

    with pytest.raises(NonFiniteLoss, match="identity"):
        tr.fit(data, step)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["modules"]["model"].values())


def test_grad_accumulation_equals_large_batch(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(4, 4), torch.randn(4)
    grads = []
    for accum, batches in ((1, [{"x": x, "y": y}]), (2, [{"x": x[:2], "y": y[:2]}, {"x": x[2:], "y": y[2:]}])):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tr = Trainer(tcfg={**TCFG, "grad_accum": accum, "grad_clip": 0}, run_dir=tmp_path / str(accum),
                     logger=NullLogger(), device=torch.device("cpu"), modules={"m": model}, optimizer=opt,
                     epochs=1, steps_per_epoch=len(batches), warmup_steps=0)
        tr.fit(batches, step_fn_for(model))
        grads.append(model.weight.detach().clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = warmup_cosine(opt, total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[0] < lrs[5] < lrs[10] and math.isclose(max(lrs), 1.0, rel_tol=1e-6)
    assert lrs[-1] < 0.02 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_ema_applied_is_temporary():
    m = nn.Linear(2, 2)
    ema = EMA(m, 0.5)
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update()
    before = m.weight.detach().clone()
    with ema.applied():
        assert not torch.equal(m.weight, before)
    assert torch.equal(m.weight, before)


def test_cuda_requested_without_cuda_is_clear():
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("history, code", [
    ([{"train/identity": 0.4}] * 3, "identity_stuck"),
    ([{"val/psnr": 25.0}, {"val/psnr": 24.5}, {"val/psnr": 23.8}], "psnr_drop"),
    ([{"train/loss": 1.0, "val/loss": 1.2}, {"train/loss": 0.8, "val/loss": 1.3},
      {"train/loss": 0.6, "val/loss": 1.4}], "val_divergence"),
    ([{"val/genuine_mean": 0.52, "val/impostor_mean": 0.50}], "embedding_collapse"),
])
def test_health_epoch_warnings_fire(history, code):
    mon = HealthMonitor()
    assert code in [c for c, _ in mon.check_epoch(history)]
    assert code not in [c for c, _ in mon.check_epoch(history)]  # once per stage


def test_health_healthy_history_is_quiet():
    hist = [{"train/identity": 0.3 - 0.05 * i, "val/psnr": 24 + 0.3 * i, "train/loss": 1 - 0.1 * i,
             "val/loss": 1.05 - 0.1 * i, "val/genuine_mean": 0.7, "val/impostor_mean": 0.1} for i in range(4)]
    mon = HealthMonitor()
    assert mon.check_epoch(hist) == [] and mon.check_stage(hist, {"val/auc": 0.9}) == []


def test_health_stage_warnings_fire():
    mon = HealthMonitor()
    hist = [{"train/identity": 0.20, "val/auc": 0.80}, {"train/identity": 0.19, "val/auc": 0.82}]
    codes = [c for c, _ in mon.check_stage(hist, reference={"val/auc": 0.85})]
    assert codes == ["identity_plateau", "cyclic_regression"]


def test_ema_is_timm_model_ema_with_the_warmup_of_before(tmp_path):
    """timm's ModelEmaV3 behind the same schedule, min(decay, (1 + n) / (10 + n)), as the hand-written EMA."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    ema = EMA(m, 0.5)
    assert isinstance(ema._ema, ModelEmaV3)
    expected = {k: v.detach().clone() for k, v in m.state_dict().items()}
    for n in range(1, 6):
        with torch.no_grad():
            m.weight.add_(float(n))
        ema.update()
        d = min(0.5, (1 + n) / (10 + n))
        expected = {k: d * expected[k] + (1 - d) * v for k, v in m.state_dict().items()}
        for k, v in ema.shadow.items():
            assert torch.allclose(v, expected[k], atol=1e-6), (n, k)
    # resume restores it exactly, from a weights_only checkpoint
    from cycle.checkpoint import save_checkpoint
    save_checkpoint({"ema": ema.state_dict()}, tmp_path / "e.pt")
    state = torch.load(tmp_path / "e.pt", weights_only=True)
    again = EMA(nn.Linear(3, 2), 0.9)
    again.load_state_dict(state["ema"])
    assert again.num_updates == 5 and again.decay == 0.5
    assert all(torch.equal(again.shadow[k], ema.shadow[k]) for k in ema.shadow)


def test_one_console_line_per_epoch_with_the_validation_metrics(tmp_path, caplog):
    data = make_data()
    tr, m = make_trainer(tmp_path, epochs=2)
    with caplog.at_level("INFO", logger="cycle.training"):
        tr.fit(data, step_fn_for(m), lambda e: {"val/neg": -e, "val/psnr": 20.0 + e}, select="val/psnr")
    lines = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert len(lines) == 2
    assert lines[1].startswith("main epoch 2/2: train/loss=")
    assert "*val/psnr=21" in lines[1] and "val/neg=-1" in lines[1]


def test_identity_plateau_is_relative_to_the_starting_loss():
    # 0.026 -> 0.020 is a 23% gain: the guide's absolute 0.02 cannot apply to a loss that starts this low
    low = [{"train/identity": 0.026}, {"train/identity": 0.020}]
    assert HealthMonitor().check_stage(low) == []
    flat = [{"train/identity": 0.026}, {"train/identity": 0.0258}]
    assert [c for c, _ in HealthMonitor().check_stage(flat)] == ["identity_plateau"]
    high = [{"train/identity": 0.40}, {"train/identity": 0.39}]  # 2.5%, below the guide's 0.02
    assert [c for c, _ in HealthMonitor().check_stage(high)] == ["identity_plateau"]


def test_cyclic_regression_ignores_differences_within_the_sampling_noise():
    hist = [{"val/auc": 0.8498}]
    assert HealthMonitor().check_stage(hist, reference={"val/auc": 0.85}, noise=0.018) == []
    assert [c for c, _ in HealthMonitor().check_stage([{"val/auc": 0.80}], reference={"val/auc": 0.85},
                                                      noise=0.018)] == ["cyclic_regression"]
