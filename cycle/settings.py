"""Range checks of every stage's numeric settings and the shared trainer settings, run before any work.

`check_stage(cfg, stage, cycle_index)` is called once per stage by `StageRun.run` and, for `stage=cycle`,
for every planned stage before the first one starts; a value out of range raises `ConfigError` naming
the key and its allowed range (`stages.initial.epochs=-1: must be an integer >= 1`). The rules go by key,
so a stage gets the rules of the keys it has.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from omegaconf import DictConfig

from cycle.config import to_plain
from cycle.errors import ConfigError
from cycle.stages import SECOND_CYCLE_KEY, stage_settings

FLOAT32_MAX = 3.4028234663852886e38  # a loss weight above it overflows to inf in float32
AMP = ("auto", "bf16", "fp16", "off", "false", "none")


def _int(low: int, high: int | None = None) -> tuple[Callable[[Any], Any], str]:
    rule = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")

    def parse(v):
        if isinstance(v, bool):
            raise ValueError
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        v = int(v) if isinstance(v, str) else v
        if not isinstance(v, int) or v < low or (high is not None and v > high):
            raise ValueError
        return v
    return parse, rule


def _float(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
           ) -> tuple[Callable[[Any], Any], str]:
    lo = f"> {low:g}" if low_open else f">= {low:g}"
    hi = "" if high == math.inf else (f" and < {high:g}" if high_open else f" and <= {high:g}")
    rule = f"a number {lo}{hi}"

    def parse(v):
        if isinstance(v, bool):
            raise ValueError
        v = float(v)
        if not math.isfinite(v) or v < low or (low_open and v == low) or v > high or (high_open and v == high):
            raise ValueError
        return v
    return parse, rule


def _optional(check):
    parse, rule = check

    def opt(v):
        return None if v is None else parse(v)
    return opt, f"null or {rule}"


def _choice(options) -> tuple[Callable[[Any], Any], str]:
    def parse(v):
        if str(v).lower() not in options:
            raise ValueError
        return v
    return parse, f"one of {', '.join(options)}"


# stage settings (`stages.<name>.<key>`), by key
STAGE_RULES = {
    "epochs": _int(1),
    "phase1_epochs": _int(0),
    "phase2_epochs": _int(0),
    "lr": _float(0, 1, low_open=True),          # AdamW: above 1 every weight jumps by ~lr per step
    "backbone_lr_mult": _float(0),
    "weight_decay": _float(0),
    "warmup_frac": _float(0, 1, high_open=True),
    "ema_decay": _float(0, 1, high_open=True),
    "scale": _float(0, low_open=True),
    "margin": _float(0),
    "lambda_align": _float(0),
    "identity_warmup": _float(0, 1),
}
# the floors of the supervisor check of the DSR stages (`supervisor.<key>`)
SUPERVISOR_RULES = {"min_auc": _float(0, 1), "min_tar": _float(0, 1)}
LOSS_WEIGHT = _float(0, FLOAT32_MAX)  # every entry of `stages.<name>.loss` but the options below
LOSS_OPTIONS = {"pixel_type", "vgg_weights", "perceptual_layers", "charbonnier_eps"}
# the trainer settings every stage shares (`trainer.<key>`)
TRAINER_RULES = {
    "batch_size": _int(1),
    "grad_accum": _int(1),
    "grad_clip": _float(0),
    "amp": _choice(AMP),
    "num_workers": _int(0),
    "limit_train_batches": _optional(_int(1)),
    "limit_val_batches": _optional(_int(1)),
    "val_every": _int(1),
    "val_pairs": _int(2),
    "log_every": _int(1),
    "ckpt_every": _int(0),
    "sample_every": _int(1),
}


def _check(key: str, value, check) -> Any:
    parse, rule = check
    try:
        return parse(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {rule}") from None


def check_trainer(trainer: DictConfig | dict) -> None:
    t = to_plain(trainer) if isinstance(trainer, DictConfig) else dict(trainer)
    values = {k: _check(f"trainer.{k}", t[k], rule) for k, rule in TRAINER_RULES.items() if k in t}
    pk = t.get("pk")
    if pk is not None:
        if not isinstance(pk, (list, tuple)) or len(pk) != 2:
            raise ConfigError(f"trainer.pk={pk!r} is not allowed: it must be null or [P, K] (P identities x K images)")
        p, k = (_check("trainer.pk", v, _int(1)) for v in pk)
        if p * k != values.get("batch_size", p * k):
            raise ConfigError(f"trainer.pk=[{p}, {k}] needs trainer.batch_size={p * k} (P*K), got "
                              f"{values['batch_size']}")


def check_stage(cfg: DictConfig, name: str, cycle_index: int = 1) -> None:
    """Refuse out-of-range settings of stage `name` (2nd-cycle values merged) and of `trainer`."""
    check_trainer(cfg.trainer)
    for k, rule in SUPERVISOR_RULES.items():
        _check(f"supervisor.{k}", (cfg.get("supervisor") or {}).get(k), rule)
    s = to_plain(stage_settings(cfg, name, cycle_index))
    second = (cfg.stages[name].get(SECOND_CYCLE_KEY) or {}) if cycle_index > 1 else {}

    def key(k: str, sub: str | None = None) -> str:
        inner = second.get(sub) if sub else second
        block = f".{SECOND_CYCLE_KEY}" if inner is not None and k in inner else ""
        return f"stages.{name}{block}." + (f"{sub}.{k}" if sub else k)

    for k, rule in STAGE_RULES.items():
        if k in s:
            _check(key(k), s[k], rule)
    if "phase1_epochs" in s and "phase2_epochs" in s and int(s["phase1_epochs"]) + int(s["phase2_epochs"]) < 1:
        raise ConfigError(f"{key('phase1_epochs')}=0 and {key('phase2_epochs')}=0 train nothing: at least one "
                          "phase needs >= 1 epoch")
    if "betas" in s:
        betas = s["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(f"{key('betas')}={betas!r} is not allowed: it must be [beta1, beta2]")
        for b in betas:
            _check(key("betas"), b, _float(0, 1, high_open=True))
    loss = s.get("loss")
    if isinstance(loss, dict):
        weights = {k: _check(key(k, "loss"), v, LOSS_WEIGHT) for k, v in loss.items() if k not in LOSS_OPTIONS}
        if weights and not any(weights.values()):
            raise ConfigError(f"every loss weight of stages.{name}.loss is 0: nothing would be trained; set one "
                              f"of {', '.join(sorted(weights))} > 0")
