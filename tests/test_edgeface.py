"""EdgeFace backbones, loader and configs: official key layout, round trips, error reports."""
from __future__ import annotations

import ast
import functools
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

import edgeface

SPECS = Path(__file__).parent / "specs" / "edgeface_keys"
CONF = Path(__file__).resolve().parents[1] / "conf" / "edgeface"
PARAM_COUNTS = {"edgeface_base": 18_225_812, "edgeface_s_gamma_05": 3_652_520,
                "edgeface_xs_gamma_06": 1_770_492, "edgeface_xxs": 1_244_744}


def _faces(n=2, seed=0):
    return torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def _seeded(variant="edgeface_xxs", seed=0, **kw):
    torch.manual_seed(seed)
    return edgeface.build(variant, **kw)


@functools.lru_cache(maxsize=None)
def _shared(variant):
    """One random-init model per variant for the read-only tests (building base takes ~1 s)."""
    return edgeface.build(variant)


def _read_spec(variant):
    rows = [line.split("\t") for line in (SPECS / f"keys_{variant}.txt").read_text().splitlines() if line]
    return [(r[0], r[1], r[2] if len(r) > 2 else "") for r in rows]


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize("variant", edgeface.VARIANTS)
def test_state_dict_matches_official_spec(variant):
    sd = _shared(variant).state_dict()
    spec = _read_spec(variant)
    assert list(sd) == [k for k, _, _ in spec]  # same keys, same order
    for key, shape, dtype in spec:
        value = sd[key]
        if shape == "tuple":  # quantized linear: packed (int8 weight, float bias)
            assert isinstance(value, tuple) and value[0].dtype == torch.qint8
            assert key.endswith("_packed_params._packed_params")
        elif shape == "dtype":
            assert value == torch.qint8
        else:
            assert list(value.shape) == ast.literal_eval(shape), key
            assert str(value.dtype) == dtype, key


@pytest.mark.parametrize("variant", list(PARAM_COUNTS))
def test_parameter_counts(variant):
    assert edgeface.count_parameters(_shared(variant)) == PARAM_COUNTS[variant]


def test_gamma_variants_factorise_every_linear_including_head():
    m = _shared("edgeface_s_gamma_05")
    assert not any(type(mod) is nn.Linear and not name.endswith(("linear1", "linear2"))
                   for name, mod in m.named_modules())
    fc = m.model.head.fc
    assert isinstance(fc, edgeface.LoRaLin) and fc.rank == 152  # max(2, int(min(304, 512) * 0.5))
    assert fc.linear1.bias is None and fc.linear2.bias is not None


def test_build_rejects_unknown_variant_listing_all():
    with pytest.raises(ValueError) as e:
        edgeface.build("edgeface_xl")
    for v in edgeface.VARIANTS:
        assert v in str(e.value)


def test_build_is_eval_mode_and_quantized_only_for_q_variants():
    m = edgeface.build("edgeface_xxs")
    assert not m.training and not m.quantized and m.variant == "edgeface_xxs"
    q = edgeface.build("edgeface_xxs_q")
    assert not q.training and q.quantized and q.variant == "edgeface_xxs_q"
    assert not edgeface.build("edgeface_xxs_q", quantized=False).quantized


# ---------------------------------------------------------------- forward / features


def test_input_normalised_once_to_official_range():
    m = _seeded()
    x = _faces()
    with torch.no_grad():
        assert torch.equal(m(x), m.model((x - 0.5) / 0.5))
        assert m(x).shape == (2, 512)


def test_embed_is_unit_norm_and_parallel_to_raw_embedding():
    m = _seeded()
    x = _faces()
    with torch.no_grad():
        e, raw = m.embed(x), m(x)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(e, raw / raw.norm(dim=1, keepdim=True))


def test_return_features_shapes_and_same_embedding():
    m = _seeded()
    x = _faces()
    with torch.no_grad():
        emb, feats = m(x, return_features=True)
        ref = m(x)
    assert m.feature_channels == [24, 48, 88, 168]
    # 112 / 4 = 28 after the stem, then three stride-2 downsamples: 14, 7, 3
    assert [tuple(f.shape) for f in feats] == [(2, 24, 28, 28), (2, 48, 14, 14), (2, 88, 7, 7),
                                               (2, 168, 3, 3)]
    torch.testing.assert_close(emb, ref, rtol=0, atol=1e-6)


def test_gradient_reaches_input_through_frozen_model():
    m = _seeded().requires_grad_(False)
    x = _faces().requires_grad_(True)
    emb, feats = m(x, return_features=True)
    (emb.pow(2).mean() + sum(f.pow(2).mean() for f in feats)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())


def test_feature_path_compiles_without_graph_breaks():
    m = _seeded()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    x = _faces()
    with torch.no_grad():
        emb, feats = compiled(x, return_features=True)
        ref_emb, ref_feats = m(x, return_features=True)
    torch.testing.assert_close(emb, ref_emb)
    torch.testing.assert_close(feats[2], ref_feats[2])


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 1, 112, 112), (3, 112, 112)])
def test_wrong_input_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="112"):
        edgeface.build("edgeface_xxs")(torch.rand(*shape))


# ---------------------------------------------------------------- loader: round trips


def _save_variants(model, tmp_path):
    """The layouts a user may hold, all from the same weights."""
    sd = model.state_dict()
    layouts = {
        "official": sd,
        "ddp": {"module." + k: v for k, v in sd.items()},
        "wrapped": {"state_dict": sd, "epoch": 3},
        "wrapped_ddp": {"model": {"module." + k: v for k, v in sd.items()}, "optimizer": {}},
        "bare_timm": model.model.state_dict(),
        "compiled": {"_orig_mod." + k: v for k, v in sd.items()},
    }
    paths = {}
    for name, obj in layouts.items():
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(obj, paths[name])
    paths["project"] = edgeface.save(model, tmp_path / "project.pt", extra={"metrics": {"auc": 0.9}})
    return paths


def test_round_trip_identical_outputs_for_every_layout(tmp_path):
    src = _seeded("edgeface_xxs", seed=1)
    x = _faces()
    with torch.no_grad():
        ref = src(x)
    for name, path in _save_variants(src, tmp_path).items():
        m = edgeface.load(path)  # variant inferred
        assert m.variant == "edgeface_xxs" and not m.training, name
        with torch.no_grad():
            assert torch.equal(m(x), ref), name


def test_round_trip_gamma_variant_with_explicit_variant(tmp_path):
    src = _seeded("edgeface_xs_gamma_06", seed=2)
    torch.save(src.state_dict(), tmp_path / "xs.pt")
    x = _faces()
    for variant in (None, "edgeface_xs_gamma_06"):
        m = edgeface.load(tmp_path / "xs.pt", variant)
        assert m.variant == "edgeface_xs_gamma_06"
        with torch.no_grad():
            assert torch.equal(m(x), src(x))


def test_project_format(tmp_path):
    src = _seeded("edgeface_xxs", seed=3)
    path = edgeface.save(src, tmp_path / "sub" / "ft.pt", extra={"epoch": 7})
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "edgeface" and obj["variant"] == "edgeface_xxs" and obj["quantized"] is False
    assert obj["epoch"] == 7 and list(obj["state_dict"]) == list(src.state_dict())
    assert [p.name for p in path.parent.iterdir()] == ["ft.pt"]  # temp file replaced, none left behind
    with pytest.raises(ValueError, match="reserved"):
        edgeface.save(src, tmp_path / "x.pt", extra={"variant": "edgeface_base"})


@pytest.mark.parametrize("variant", edgeface.VARIANTS)
def test_guess_variant_is_exact_for_every_variant(variant):
    q = variant.endswith("_q")
    assert edgeface.guess_variant(_shared(variant).state_dict()) == (variant, q, 1.0)


# ---------------------------------------------------------------- loader: errors


def test_wrong_variant_reports_keys_and_guesses(tmp_path):
    torch.save(_seeded("edgeface_xxs").state_dict(), tmp_path / "xxs.pt")
    with pytest.raises(edgeface.CheckpointMismatch) as e:
        edgeface.load(tmp_path / "xxs.pt", "edgeface_xs_gamma_06")
    err, msg = e.value, str(e.value)
    assert isinstance(err, ValueError)
    assert err.guess == "edgeface_xxs" and err.guess_score == 1.0
    assert "model.stages.0.blocks.0.mlp.fc1.linear1.weight" in err.missing
    assert "model.stages.0.blocks.0.mlp.fc1.weight" in err.unexpected
    assert ("model.stem.0.weight", (24, 3, 4, 4), (32, 3, 4, 4)) in err.mismatched
    assert "missing" in msg and "unexpected" in msg and "shape mismatch" in msg
    assert "matches exactly variant 'edgeface_xxs'" in msg
    assert "model.stem.0.weight [24, 3, 4, 4] vs [32, 3, 4, 4]" in msg
    assert "more" in msg and len(msg) < 4000  # long lists truncated


def test_partial_checkpoint_fails_strict_with_best_guess(tmp_path):
    sd = _seeded("edgeface_s_gamma_05").state_dict()
    del sd["model.head.fc.linear2.bias"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(edgeface.CheckpointMismatch) as e:
        edgeface.load(tmp_path / "partial.pt")  # inferring the variant must not relax strictness
    assert e.value.missing == ["model.head.fc.linear2.bias"] and not e.value.unexpected
    assert e.value.guess == "edgeface_s_gamma_05" and 0.99 < e.value.guess_score < 1.0


def test_foreign_checkpoint_is_named_as_such(tmp_path):
    torch.save(nn.Conv2d(3, 8, 3).state_dict(), tmp_path / "dsr.pt")
    with pytest.raises(edgeface.CheckpointMismatch, match="does not look like any EdgeFace variant") as e:
        edgeface.load(tmp_path / "dsr.pt")
    assert e.value.unexpected == ["weight", "bias"] and e.value.guess is None
    assert "its keys: weight, bias" in str(e.value)


def test_no_state_dict_inside(tmp_path):
    torch.save({"epoch": 1, "optimizer": {"lr": 0.1}}, tmp_path / "empty.pt")
    with pytest.raises(edgeface.CheckpointMismatch, match="holds no state_dict"):
        edgeface.load(tmp_path / "empty.pt")


def test_missing_file_says_where_official_weights_are(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        edgeface.load(tmp_path / "edgeface_xs_gamma_06.pt")
    msg = str(e.value)
    assert "edgeface_xs_gamma_06.pt" in msg and "https://github.com/otroshi/edgeface" in msg
    assert "idiap/EdgeFace" in msg and "edgeface.weights=/path/to/edgeface_xs_gamma_06.pt" in msg
    with pytest.raises(FileNotFoundError, match="directory"):
        edgeface.load(tmp_path)


def test_unreadable_and_pickled_model_files_are_clear_errors(tmp_path):
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="could not read EdgeFace checkpoint"):
        edgeface.load(tmp_path / "trunc.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="state_dict"):  # weights_only refuses pickled classes
        edgeface.load(tmp_path / "module.pt")


# ---------------------------------------------------------------- quantized checkpoints


def _official_style_q(tmp_path):
    """A `_q` file made the way the release made them: quantize_dynamic on the float model."""
    float_model = _seeded("edgeface_xxs", seed=4, quantized=False)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated on recent torch
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8, inplace=False)
    torch.save(q.state_dict(), tmp_path / "edgeface_xxs_q.pt")
    return float_model, q, tmp_path / "edgeface_xxs_q.pt"


def _cos(a, b):
    return nn.functional.cosine_similarity(a, b, dim=1)


def test_quantized_file_loads_quantized_and_dequantizes_close_to_float(tmp_path):
    float_model, q_ref, path = _official_style_q(tmp_path)
    x = _faces(4)
    with torch.no_grad():
        ref_float, ref_q = float_model(x), q_ref(x)

    q = edgeface.load(path)  # weights_only=True inside, variant inferred
    assert q.variant == "edgeface_xxs_q" and q.quantized
    with torch.no_grad():
        assert torch.equal(q(x), ref_q)

    f = edgeface.load(path, quantized=False)
    assert not f.quantized and f.variant == "edgeface_xxs_q"
    assert list(f.state_dict()) == list(float_model.state_dict())  # float key layout
    with torch.no_grad():
        out = f(x)
        torch.testing.assert_close(edgeface.dequantize(q)(x), out)
    assert _cos(out, ref_float).min() > 0.999  # int8 weight error only
    assert (out - ref_float).abs().max() < 0.05 * ref_float.abs().max()
    assert _cos(out, ref_q).min() > 0.999


def test_dequantized_copy_trains(tmp_path):
    _, _, path = _official_style_q(tmp_path)
    f = edgeface.load(path, quantized=False).train()
    assert all(p.requires_grad for p in f.parameters())
    f(_faces()).pow(2).mean().backward()
    assert f.model.head.fc.weight.grad is not None and f.model.stem[0].weight.grad.abs().sum() > 0


def test_dequantized_copy_saves_and_reloads_as_float(tmp_path):
    _, _, path = _official_style_q(tmp_path)
    f = edgeface.load(path, quantized=False)
    reloaded = edgeface.load(edgeface.save(f, tmp_path / "ft.pt"))
    assert reloaded.variant == "edgeface_xxs_q" and not reloaded.quantized
    x = _faces()
    with torch.no_grad():
        assert torch.equal(reloaded(x), f(x))
    torch.save(f.state_dict(), tmp_path / "bare.pt")  # no format: recognised as float xxs_q / xxs
    assert edgeface.guess_variant(torch.load(tmp_path / "bare.pt", weights_only=True))[2] == 1.0


def test_float_file_can_be_loaded_quantized(tmp_path):
    src = _seeded("edgeface_xxs", seed=5)
    torch.save(src.state_dict(), tmp_path / "xxs.pt")
    q = edgeface.load(tmp_path / "xxs.pt", quantized=True)
    assert q.quantized and q.variant == "edgeface_xxs"
    x = _faces()
    with torch.no_grad():
        assert _cos(q(x), src(x)).min() > 0.999


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["xxs", "xs_gamma_06", "s_gamma_05", "base", "xs_q", "xxs_q"])
def test_config_group(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert set(cfg) == {"variant", "weights"}
    assert cfg.variant == f"edgeface_{name}" and cfg.variant in edgeface.VARIANTS
    assert cfg.weights is None


def test_configured_variant_mismatch_names_the_command_line_fix(tmp_path):
    """The README's `edgeface.weights=.../edgeface_xs_gamma_06.pt` against the default xxs: the hint is the
    override to type, not the Python API's variant=."""
    from conftest import compose_train

    from edgeface.supervisor import load_edgeface

    path = tmp_path / "edgeface_xs_gamma_06.pt"
    torch.save(_shared("edgeface_xs_gamma_06").state_dict(), path)
    cfg = compose_train([f"edgeface.weights={path}"])
    with pytest.raises(edgeface.CheckpointMismatch, match=r"command line with edgeface=xs_gamma_06, e\.g\.") as e:
        load_edgeface(cfg, path)
    assert "variant=" not in str(e.value)
    ok = compose_train(["edgeface=xs_gamma_06", f"edgeface.weights={path}"])
    assert load_edgeface(ok, path).variant == "edgeface_xs_gamma_06"
