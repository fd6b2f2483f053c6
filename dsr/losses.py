"""DSR training losses: pixel, perceptual (VGG19), identity, cross-identity, feature match, TV.

The identity supervisor E (EdgeFace) is FROZEN but DIFFERENTIABLE: its weights never
change (requires_grad False, eval mode), yet the SR branch runs with autograd on, so the
identity terms train the DSR. Only the HR branch, which has no parameters to train, runs
under no_grad. (The prototype wrapped the whole supervisor in no_grad; its identity loss
carried no gradient at all.)

Supervisor interface: `E(x, return_features=False)`, x (B, 3, 112, 112) RGB in [0, 1] ->
raw (B, 512); with `return_features=True` -> (emb, [f0, f1, f2, f3]) stage outputs.

`DSRLoss.forward(sr, hr, labels=None) -> (total, terms)`. `terms` holds the UNWEIGHTED
value of each enabled term (so thresholds such as "identity loss above 0.25" read the same
whatever the weights) plus 'loss', the weighted total; all detached. A weight of 0 removes
the term: it is neither computed nor reported.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cycle.models import freeze

TERMS = ("pixel", "perceptual", "identity", "cross_identity", "feature_match", "tv")
SUPERVISED_TERMS = ("identity", "cross_identity", "feature_match")  # the terms that go through the supervisor
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's vgg19 layout: name -> index in `features`.
_VGG19_NAMES = [
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4", "pool5",
]
VGG19_LAYERS = {name: i for i, name in enumerate(_VGG19_NAMES)}


def _is_quantized(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())


def charbonnier(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean(sqrt((x - y)^2 + eps^2)): L1 with a smooth minimum (stable gradient at 0)."""
    return torch.sqrt((x - y).pow(2) + eps * eps).mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean |vertical difference| + mean |horizontal difference|."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def same_identity_partner(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each i, the index j != i of the next image (cyclically, in batch order) with the same label.

    Returns (partner, valid): identities with a single image in the batch get valid False
    (and partner = themselves). In a P x K batch every image has K - 1 candidates; taking
    the next one pairs each image with a different photo, deterministically.
    """
    labels = labels.reshape(-1)
    b = labels.numel()
    idx = torch.arange(b, device=labels.device)
    same = (labels[:, None] == labels[None, :]) & (idx[:, None] != idx[None, :])
    dist = (idx[None, :] - idx[:, None]) % b  # 1 = next image, wrapping around
    dist = torch.where(same, dist, torch.full_like(dist, b))
    partner = dist.argmin(dim=1)
    valid = same.any(dim=1)
    return torch.where(valid, partner, idx), valid


def feature_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ||a/|a| - b/|b|||^2, the channel vector L2-normalised at each position.

    Per-position normalisation (as in LPIPS) makes the term scale-free: EdgeFace stages have
    very different activation magnitudes, and each one should weigh the same. The value is
    2 * (1 - cos) of the local feature vectors, in [0, 4]; 0 iff directions agree everywhere.
    """
    a = F.normalize(a.float(), dim=1, eps=1e-6)
    b = F.normalize(b.float(), dim=1, eps=1e-6)
    return (a - b).pow(2).sum(dim=1).mean()


def vgg_weights_help(vgg_weights: str | None) -> str:
    from torchvision.models import VGG19_Weights

    url = VGG19_Weights.IMAGENET1K_V1.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    given = f"loss.vgg_weights={vgg_weights} does not exist. " if vgg_weights else ""
    return (f"{given}The perceptual loss needs torchvision's ImageNet VGG19 weights, which are never "
            f"downloaded at run time. Download {url} and either put it at {cache} (torchvision's "
            f"cache) or pass loss.vgg_weights=/path/to/{Path(url).name}; or set loss.perceptual=0.")


class VGGFeatures(nn.Module):
    """Frozen torchvision VGG19 `features` up to the deepest requested layer."""

    def __init__(self, layers: Sequence[str] = ("conv5_4",), vgg_weights: str | None = None):
        super().__init__()
        from torchvision.models import VGG19_Weights
        from torchvision.models.vgg import cfgs, make_layers

        unknown = [name for name in layers if name not in VGG19_LAYERS]
        if unknown or not layers:
            raise ValueError(f"unknown VGG19 layers {unknown or list(layers)}; "
                             f"choose from {list(VGG19_LAYERS)}")
        path = Path(vgg_weights).expanduser() if vgg_weights else \
            Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG19_Weights.IMAGENET1K_V1.url).name
        if not path.is_file():
            raise FileNotFoundError(vgg_weights_help(vgg_weights))
        # Only `features` is needed: build just that (the classifier alone is 120M parameters)
        # and load the file's `features.*` entries strictly, so a wrong file fails loudly.
        features = make_layers(cfgs["E"])
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        try:
            features.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise RuntimeError(f"{path} is not a torchvision VGG19 state_dict: {err}") from None
        self.layers = {VGG19_LAYERS[name]: name for name in layers}
        self.features = features[: max(self.layers) + 1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        freeze(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.layers:
                out.append(x)
        return out


class DSRLoss(nn.Module):
    """Weighted sum of the DSR loss terms; a weight of 0 disables (and skips) a term.

    Args:
        supervisor: identity network E (EdgeFace); frozen here. Needed only when identity,
            cross_identity or feature_match is > 0.
        pixel, perceptual, identity, cross_identity, feature_match, tv: term weights.
        pixel_type: 'l1' or 'charbonnier'; charbonnier_eps its smoothing constant.
        perceptual_layers: VGG19 layers compared with L1 (ESRGAN uses conv5_4, pre-activation).
        vgg_weights: local torchvision VGG19 state_dict; None looks in torchvision's cache.
    """

    def __init__(self, supervisor: nn.Module | None = None, *, pixel: float = 1.0, pixel_type: str = "l1",
                 charbonnier_eps: float = 1e-3, perceptual: float = 0.0,
                 perceptual_layers: Sequence[str] = ("conv5_4",), vgg_weights: str | None = None,
                 identity: float = 0.0, cross_identity: float = 0.0, feature_match: float = 0.0,
                 tv: float = 0.0):
        super().__init__()
        self.weights = {"pixel": float(pixel), "perceptual": float(perceptual), "identity": float(identity),
                        "cross_identity": float(cross_identity), "feature_match": float(feature_match),
                        "tv": float(tv)}
        negative = {k: w for k, w in self.weights.items() if w < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        if pixel_type not in ("l1", "charbonnier"):
            raise ValueError(f"pixel_type must be 'l1' or 'charbonnier', got {pixel_type!r}")
        self.pixel_type, self.charbonnier_eps = pixel_type, float(charbonnier_eps)
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError("every loss weight is 0: nothing to train on")
        needs_e = [k for k in SUPERVISED_TERMS if self.weights[k] > 0]
        if needs_e and supervisor is None:
            raise ValueError(f"loss terms {needs_e} need an identity supervisor (EdgeFace); none was given")
        if supervisor is not None and _is_quantized(supervisor):
            # Quantized linears have no backward: the SR images would silently get no identity
            # gradient (the prototype's failure mode). Supervise with the float model instead.
            raise ValueError("the identity supervisor is a quantized model, which passes no gradient to "
                             "the DSR; use its float version (edgeface.dequantize(model), or "
                             "edgeface.load(path, quantized=False))")
        self.supervisor = freeze(supervisor) if supervisor is not None else None
        self.identity_scale = 1.0  # multiplies the SUPERVISED_TERMS' weights (a warm-up ramps it from 0 to 1)
        self.vgg = VGGFeatures(perceptual_layers, vgg_weights) if self.weights["perceptual"] > 0 else None

    @property
    def enabled(self) -> list[str]:
        return [k for k in TERMS if self.weights[k] > 0]

    def train(self, mode: bool = True):
        # Whatever the caller does (e.g. wrapper.train()), the frozen networks stay in eval mode.
        super().train(mode)
        for frozen in (self.supervisor, self.vgg):
            if frozen is not None:
                frozen.eval()
        return self

    def forward(self, sr: torch.Tensor, hr: torch.Tensor, labels: torch.Tensor | None = None):
        w = self.weights
        if labels is not None and len(labels) != len(sr):
            raise ValueError(f"got {len(labels)} labels for a batch of {len(sr)} images")
        terms: dict[str, torch.Tensor] = {}
        if w["pixel"] > 0:  # in float32 even under autocast: bf16 differences are too coarse
            s, h = sr.float(), hr.float()
            terms["pixel"] = (charbonnier(s, h, self.charbonnier_eps) if self.pixel_type == "charbonnier"
                              else F.l1_loss(s, h))
        if w["perceptual"] > 0:
            with torch.no_grad():
                hr_vgg = self.vgg(hr)
            terms["perceptual"] = sum(F.l1_loss(a, b) for a, b in zip(self.vgg(sr), hr_vgg)) / len(hr_vgg)
        if any(w[k] > 0 for k in SUPERVISED_TERMS):
            terms.update(self._identity_terms(sr, hr, labels))
        if w["tv"] > 0:
            terms["tv"] = total_variation(sr.float())
        total = sum(w[k] * (self.identity_scale if k in SUPERVISED_TERMS else 1.0) * v for k, v in terms.items())
        logged = {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}
        return total, logged

    def _identity_terms(self, sr, hr, labels):
        w, e = self.weights, self.supervisor
        want_feats = w["feature_match"] > 0
        with torch.no_grad():  # HR branch: a fixed target
            hr_out = e(hr, return_features=want_feats)
        sr_out = e(sr, return_features=want_feats)  # SR branch: gradients flow to the DSR
        hr_emb, hr_feats = hr_out if want_feats else (hr_out, None)
        sr_emb, sr_feats = sr_out if want_feats else (sr_out, None)
        sr_emb, hr_emb = F.normalize(sr_emb.float(), dim=1), F.normalize(hr_emb.float(), dim=1)
        out = {}
        if w["identity"] > 0:
            out["identity"] = (1.0 - (sr_emb * hr_emb).sum(dim=1)).mean()
        if w["cross_identity"] > 0:
            if labels is None:
                raise ValueError("cross_identity > 0 needs identity labels: call loss(sr, hr, labels)")
            partner, valid = same_identity_partner(torch.as_tensor(labels, device=sr.device))
            cos = (sr_emb * hr_emb[partner]).sum(dim=1)
            # Identities with one image in the batch have no partner; with none at all the
            # term is 0 (kept in the graph so the total stays differentiable).
            out["cross_identity"] = ((1.0 - cos) * valid).sum() / valid.sum().clamp(min=1)
        if want_feats:
            if len(sr_feats) != len(hr_feats) or not sr_feats:
                raise ValueError("the supervisor returned no (or mismatched) intermediate features")
            dists = [feature_distance(a, b) for a, b in zip(sr_feats, hr_feats)]
            out["feature_match"] = sum(dists) / len(dists)
        return out
