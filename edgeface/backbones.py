"""EdgeFace backbones: timm EdgeNeXt variants laid out exactly like the official release.

The official checkpoints (github.com/otroshi/edgeface) are state_dicts of a wrapper whose
only child is `model` (a timm EdgeNeXt with a 512-d classifier), so every key starts with
"model.". The `gamma` variants swap every nn.Linear for a rank-r factorisation (LoRaLin);
the `_q` variants are torch.ao dynamically quantized (qint8) full-rank models.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EMBEDDING_SIZE = 512
INPUT_SIZE = 112


@dataclass(frozen=True)
class _Arch:
    timm_name: str
    gamma: float | None  # low-rank ratio of LoRaLin; None = full-rank nn.Linear
    quantized: bool  # official file is a dynamically quantized state_dict


_ARCHS: dict[str, _Arch] = {
    "edgeface_base": _Arch("edgenext_base", None, False),
    "edgeface_s_gamma_05": _Arch("edgenext_small", 0.5, False),
    "edgeface_xs_gamma_06": _Arch("edgenext_x_small", 0.6, False),
    "edgeface_xxs": _Arch("edgenext_xx_small", None, False),
    "edgeface_xs_q": _Arch("edgenext_x_small", None, True),  # full-rank x_small, not gamma 0.6
    "edgeface_xxs_q": _Arch("edgenext_xx_small", None, True),
}
VARIANTS: tuple[str, ...] = tuple(_ARCHS)


def _arch(variant: str) -> _Arch:
    if variant not in _ARCHS:
        raise ValueError(f"unknown EdgeFace variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    return _ARCHS[variant]


class LoRaLin(nn.Module):
    """Low-rank linear of the gamma variants: in -> r (no bias) -> out (bias). Names as in the release."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, **factory):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.linear1 = nn.Linear(in_features, rank, bias=False, **factory)
        self.linear2 = nn.Linear(rank, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(x))


def lowrank_rank(in_features: int, out_features: int, gamma: float) -> int:
    return max(2, int(min(in_features, out_features) * gamma))


def _replace_linear_with_lowrank(module: nn.Module, gamma: float) -> None:
    # Every nn.Linear, head.fc included (the release's `'head' not in name` test is on the child
    # name "fc", so the classifier is factorised too; the key specs confirm it).
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            factory = {"device": child.weight.device, "dtype": child.weight.dtype}
            rank = lowrank_rank(child.in_features, child.out_features, gamma)
            setattr(module, name, LoRaLin(child.in_features, child.out_features, rank,
                                          bias=child.bias is not None, **factory))
        else:
            _replace_linear_with_lowrank(child, gamma)


class EdgeFace(nn.Module):
    """(B,3,112,112) RGB in [0,1] -> raw (B,512) embedding. The timm EdgeNeXt lives in `self.model`."""

    def __init__(self, variant: str):
        import timm  # noqa: PLC0415 (lazy: importing timm costs ~1.5 s; `import edgeface` stays cheap)

        super().__init__()
        arch = _arch(variant)
        self.variant = variant
        self.model = timm.create_model(arch.timm_name, pretrained=False, num_classes=EMBEDDING_SIZE)
        if arch.gamma is not None:
            _replace_linear_with_lowrank(self.model, arch.gamma)
        self.feature_channels: list[int] = [int(f["num_chs"]) for f in self.model.feature_info]

    @property
    def quantized(self) -> bool:
        qlinear = _dynamic_linear_type()
        return any(isinstance(m, qlinear) for m in self.modules())

    @staticmethod
    def normalize_input(x: torch.Tensor) -> torch.Tensor:
        """[0,1] -> [-1,1], the official (x - 0.5) / 0.5. The only place this conversion happens."""
        return (x - 0.5) / 0.5

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"EdgeFace expects (B,3,{INPUT_SIZE},{INPUT_SIZE}) RGB in [0,1], got "
                             f"{tuple(x.shape)}; resize/super-resolve low-resolution faces to 112x112 first")
        x = self.normalize_input(x)
        m = self.model
        if not return_features:
            return m(x)
        # Plain module calls (no hooks), so the feature path traces under torch.compile and autograd.
        x = m.stem(x)
        feats = []
        for stage in m.stages:
            x = stage(x)
            feats.append(x)
        return m.forward_head(m.norm_pre(x)), feats

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embedding, ready for cosine similarity."""
        return F.normalize(self(x).float(), dim=-1)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, quantized={self.quantized}"


def _dynamic_linear_type():
    from torch.ao.nn.quantized.dynamic import Linear  # noqa: PLC0415 (lazy: torch.ao is deprecated)

    return Linear


def quantize(model: EdgeFace) -> EdgeFace:
    """A dynamically quantized (qint8 nn.Linear) copy, as the official `_q` files were made.

    A model that is already quantized is returned as is.
    """
    if model.quantized:
        return model
    src = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, but it is what the official
        # `_q` files were written with, and its packed-params state_dict format is what we must load.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        q = torch.ao.quantization.quantize_dynamic(src, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return q.eval()


def dequantize(model: EdgeFace) -> EdgeFace:
    """A float copy of a quantized EdgeFace (int8 weights dequantized), e.g. for fine-tuning.

    The copy keeps the variant name (an `_q` variant is the full-rank architecture) and has the
    float key layout of that architecture (`...fc1.weight` instead of `...fc1._packed_params`).
    """
    if not model.quantized:
        return copy.deepcopy(model)
    qlinear = _dynamic_linear_type()
    out = empty(model.variant)
    qprefixes = {f"{name}.": mod for name, mod in model.named_modules() if isinstance(mod, qlinear)}
    sd = {k: v for k, v in model.state_dict().items()
          if not any(k.startswith(p) for p in qprefixes)}  # float tensors carry over unchanged
    for prefix, mod in qprefixes.items():
        sd[prefix + "weight"] = mod.weight().dequantize()
        if mod.bias() is not None:
            sd[prefix + "bias"] = mod.bias().detach()
    out.load_state_dict(sd, strict=True)
    return out.eval()


def empty(variant: str, *, quantized: bool = False) -> EdgeFace:
    """An eval-mode EdgeFace with all-zero weights, for loading a checkpoint into.

    Built on the meta device and materialised without timm's random init, which costs seconds on
    a small CPU and would be overwritten anyway: strict loading sets every tensor, provided the
    model has no non-persistent buffers (computed constants that to_empty would leave unset).
    """
    _arch(variant)
    with torch.device("meta"):
        model = EdgeFace(variant)
    if len(list(model.parameters())) + len(list(model.buffers())) == len(model.state_dict()):
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for t in model.state_dict().values():
                t.zero_()
    else:  # a timm version with non-persistent buffers: initialise for real
        model = EdgeFace(variant)
    model.eval()
    return quantize(model) if quantized else model


def build(variant: str, *, quantized: bool | None = None) -> EdgeFace:
    """A randomly initialised EdgeFace in eval mode.

    `quantized=None` follows the variant (the `_q` variants are dynamically quantized, CPU-only);
    `quantized=False` gives the float architecture of an `_q` variant, `True` quantizes any variant.
    """
    arch = _arch(variant)
    model = EdgeFace(variant).eval()
    if arch.quantized if quantized is None else quantized:
        model = quantize(model)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
