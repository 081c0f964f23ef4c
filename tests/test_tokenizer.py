"""Tests of tokenizer.py: shapes, gradients, presets, parameter counts, the official forward order,
and loading of DINOv2 / DINO / released checkpoints (synthetic files with the real key layouts).

Run: python -m pytest -q tests/test_tokenizer.py   (CPU, no downloads, well under a minute)
"""

import dataclasses
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tokenizer  # noqa: E402
from tokenizer import (PRESETS, SoftVQVAE, TokenizerConfig, VisionTransformer, load_dino,  # noqa: E402
                       load_dinov2, load_released, load_released_state_dict, make_tokenizer,
                       released_state_dict, unpatchify)

# copies of ../shared/reference (official names, shapes and config), so nothing skips in a plain clone
REFERENCE = os.path.join(os.path.dirname(__file__), "reference")
OFFICIAL_SHAPES = os.path.join(REFERENCE, "official-state-dict-shapes.json")
OFFICIAL_CONFIG = os.path.join(REFERENCE, "official-softvq-s-64.config.json")


def tiny_images(batch=2, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_layerscale(module, seed=0):
    """Random init leaves LayerScale at 1e-5 (blocks ~ identity); make the blocks matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


# ---- shapes, gradients, sizes ----
@pytest.mark.parametrize("quantizer", ["softvq", "gmmvq", "vq", "kl", "ae"])
def test_every_quantizer_through_the_tokenizer(quantizer):
    torch.manual_seed(0)
    model = make_tokenizer("tiny", tokens=32, quantizer=quantizer)
    x = tiny_images()
    x_rec, z_q, losses, info = model(x)
    assert x_rec.shape == x.shape
    assert z_q.shape == (2, 32, 64)                       # tokens=32 picks D = 64
    assert model.encode(x).shape == (2, 32, 64)
    assert model.decode(z_q).shape == x.shape
    assert all(v.dim() == 0 and v.requires_grad for v in losses.values())
    assert all(not v.requires_grad for v in info.values())
    assert torch.isfinite(x_rec).all()


def test_kl_quant_conv_gives_mean_and_log_variance_directly():
    """Official KL model: quant_conv = Linear(width -> 2D) and nothing between it and the
    Gaussian, so mean and log-variance are not confined to a rank-D subspace."""
    model = make_tokenizer("tiny", quantizer="kl").eval()
    D = model.config.token_dim
    assert model.quant_conv.out_features == 2 * D and not list(model.quantize.parameters())
    x = tiny_images()
    moments = model.quant_conv(model.encoder(x))
    assert torch.equal(model.encode(x), moments[..., :D])     # eval: z_q = the mean
    rank = torch.linalg.matrix_rank(model.quant_conv.weight.detach())
    assert rank > D                                           # Linear(D -> 2D) after D would cap it
    assert make_tokenizer("tiny", quantizer="vq").quant_conv.out_features == D


def test_z_q_keeps_its_gradient():
    torch.manual_seed(0)
    model = make_tokenizer("tiny")
    x_rec, z_q, losses, _ = model(tiny_images())
    assert z_q.requires_grad
    z_q.pow(2).sum().backward()                  # e.g. the alignment loss acts on z_q only
    assert model.encoder.latent_tokens.grad.abs().sum() > 0
    assert model.encoder.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.decoder.to_pixel.weight.grad is None  # z_q does not depend on the decoder


def test_other_image_sizes_keep_the_latent_length():
    torch.manual_seed(0)
    model = make_tokenizer("tiny").eval()
    with torch.no_grad():
        x_rec, z_q, _, _ = model(tiny_images(1, 64))      # 2x the preset's size
    assert x_rec.shape == (1, 3, 64, 64) and z_q.shape == (1, 64, 32)
    # 256 and 512 px; patch 16 instead of the preset's 4 keeps this a CPU-seconds test.
    model = make_tokenizer("tiny", patch_size=16).eval()
    with torch.no_grad():
        for size in (256, 512):
            x_rec, z_q, _, _ = model(tiny_images(1, size))
            assert x_rec.shape == (1, 3, size, size) and z_q.shape == (1, 64, 32)
            assert model.decode(z_q, image_size=size).shape == (1, 3, size, size)
            assert torch.isfinite(x_rec).all()


def test_bad_inputs_raise_value_errors():
    model = make_tokenizer("tiny")
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        model(tiny_images(1, 30))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 64, 32\)"):
        model.decode(torch.randn(1, 32, 32))               # wrong token count
    with pytest.raises(ValueError, match=r"\(B, 64, 32\)"):
        model.decode(torch.randn(1, 64, 16))               # wrong token dimension
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model.decode(torch.randn(1, 64, 32), image_size=30)


def test_unknown_names_raise_value_errors_listing_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'XL'.*'S', 'B', 'BL', 'L', 'tiny'"):
        make_tokenizer("XL")
    with pytest.raises(ValueError, match=r"unknown quantizer 'fsq'.*'ae', 'gmmvq', 'kl', 'softvq', 'vq'"):
        make_tokenizer("tiny", quantizer="fsq")
    with pytest.raises(ValueError, match=r"unknown config fields \['widht'\].*enc_width"):
        make_tokenizer("tiny", widht=8)
    with pytest.raises(ValueError, match="tokens=16 has no default token dimension"):
        make_tokenizer("tiny", tokens=16)
    model = make_tokenizer("tiny", tokens=16, token_dim=8)   # explicit D is fine
    assert model.encode(tiny_images()).shape == (2, 16, 8)


def test_unpatchify_uses_the_official_order():
    # value of feature (i, j, c) of patch (r, s) must land at pixel (c, r*p + i, s*p + j)
    h, w, p = 2, 3, 4
    r, s, i, j, c = torch.meshgrid(*(torch.arange(n) for n in (h, w, p, p, 3)), indexing="ij")
    code = (r * 10000 + s * 1000 + i * 100 + j * 10 + c).float()       # (h, w, p, p, 3)
    image = unpatchify(code.reshape(1, h * w, p * p * 3), (h, w), p)[0]
    for (rr, ss, ii, jj, cc) in [(0, 0, 0, 0, 0), (1, 2, 3, 1, 2), (0, 1, 2, 3, 1), (1, 0, 1, 2, 0)]:
        assert image[cc, rr * p + ii, ss * p + jj] == rr * 10000 + ss * 1000 + ii * 100 + jj * 10 + cc


# ---- presets and parameter counts ----
def test_paper_parameter_counts_within_two_percent():
    counts = tokenizer.parameter_counts(presets=("S", "B", "BL", "L"), tokens=(64,))
    for preset, paper_m in tokenizer.PAPER_PARAMS_M.items():
        total = counts[(preset, 64)]["total"]
        assert abs(total / 1e6 - paper_m) / paper_m < 0.02, (preset, total)


def test_tiny_preset_is_about_one_million_parameters():
    total = tokenizer.count_parameters(make_tokenizer("tiny"))
    assert 0.7e6 < total < 1.3e6
    cfg = PRESETS["tiny"]
    assert (cfg.image_size // cfg.patch_size) ** 2 >= 16


@pytest.mark.parametrize("name,preset,tokens", [("softvq-s-64", "S", 64), ("softvq-s-32", "S", 32),
                                                ("softvq-b-64", "B", 64), ("softvq-bl-64", "BL", 64),
                                                ("softvq-l-64", "L", 64)])
def test_released_layout_equals_the_official_state_dict(name, preset, tokens):
    """Inverse mapping of our model == the official key names and shapes, tensor for tensor;
    the exported config.json (save_released writes both) names the official timm ViTs."""
    with open(OFFICIAL_SHAPES) as f:
        official = json.load(f)[name]
    with torch.device("meta"):
        model = make_tokenizer(preset, tokens=tokens)
    ours = {k: list(v.shape) for k, v in released_state_dict(model).items()}
    assert ours == official
    fields = tokenizer.released_config(model, 0.0, 1.0)
    assert tokenizer.official_loadable(fields) and tokenizer.EXPORT_CONFIG_KEY not in fields
    vit = {"s": "vit_small_patch14_dinov2.lvd142m", "b": "vit_base_patch14_dinov2.lvd142m",
           "l": "vit_large_patch14_dinov2.lvd142m"}
    assert (fields["encoder_model"], fields["decoder_model"]) == (
        vit[preset[0].lower()], vit[preset[-1].lower()])
    assert tokenizer.config_from_released(fields) == model.config


# ---- the official forward order, restated independently on raw tensors ----
def official_forward(sd, cfg, x):
    """The "forward-pass facts" of ../shared/reference/README.md on official-named tensors."""
    B, p, L, D, G = x.shape[0], cfg.patch_size, cfg.num_tokens, cfg.token_dim, cfg.num_codebooks
    h, w = x.shape[2] // p, x.shape[3] // p

    def vit(prefix, t, heads):
        width, i = t.shape[-1], 0
        hd = width // heads
        while f"{prefix}.blocks.{i}.norm1.weight" in sd:
            b = lambda name: sd[f"{prefix}.blocks.{i}.{name}"]  # noqa: E731
            a = F.layer_norm(t, (width,), b("norm1.weight"), b("norm1.bias"), 1e-6)
            q, k, v = (a @ b("attn.qkv.weight").T + b("attn.qkv.bias")).reshape(
                B, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
            a = ((q @ k.transpose(-1, -2)) * hd ** -0.5).softmax(-1) @ v
            a = a.transpose(1, 2).reshape(B, -1, width) @ b("attn.proj.weight").T + b("attn.proj.bias")
            t = t + b("ls1.gamma") * a
            m = F.layer_norm(t, (width,), b("norm2.weight"), b("norm2.bias"), 1e-6)
            m = F.gelu(m @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")) @ b("mlp.fc2.weight").T
            t = t + b("ls2.gamma") * (m + b("mlp.fc2.bias"))
            i += 1
        return F.layer_norm(t, (width,), sd[f"{prefix}.norm.weight"], sd[f"{prefix}.norm.bias"], 1e-6)

    # encoder: patch-embed, prepend cls, + pos (cls included), append latents + their pos
    t = F.conv2d(x, sd["encoder.model.patch_embed.proj.weight"], sd["encoder.model.patch_embed.proj.bias"],
                 stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([sd["encoder.model.cls_token"].expand(B, -1, -1), t], 1) + sd["encoder.model.pos_embed"]
    t = torch.cat([t, (sd["encoder.latent_tokens"] + sd["encoder.latent_pos_embed"]).expand(B, -1, -1)], 1)
    z_hat = vit("encoder.model", t, cfg.enc_heads)[:, -L:] @ sd["quant_conv.weight"].T + sd["quant_conv.bias"]
    # cosine SoftVQ per 16-token segment of its own codebook
    C = F.normalize(sd["quantize.embedding"], dim=-1)
    probs = (torch.einsum("bgnd,gkd->bgnk", F.normalize(z_hat.reshape(B, G, L // G, D), dim=-1), C)
             / cfg.tau).softmax(-1)
    z_q = torch.einsum("bgnk,gkd->bgnd", probs, C).reshape(B, L, D)
    # decoder: [cls, N mask] + pos, append post_quant(z) + latent pos, keep the N mask positions
    z = z_q @ sd["post_quant_conv.weight"].T + sd["post_quant_conv.bias"]
    t = torch.cat([sd["decoder.model.cls_token"].expand(B, -1, -1),
                   sd["decoder.mask_token"].expand(B, h * w, -1)], 1) + sd["decoder.model.pos_embed"]
    t = torch.cat([t, z + sd["decoder.latent_pos_embed"]], 1)
    t = vit("decoder.model", t, cfg.dec_heads)[:, 1:1 + h * w]
    pix = t @ sd["decoder.to_pixel.model.weight"].T + sd["decoder.to_pixel.model.bias"]
    pix = pix.reshape(B, h, w, p, p, 3)
    return torch.einsum("nhwpqc->nchpwq", pix).reshape(B, 3, h * p, w * p), z_q


def test_forward_matches_the_official_order():
    torch.manual_seed(0)
    model = make_tokenizer("tiny").eval()
    randomize_layerscale(model)
    x = tiny_images()
    with torch.no_grad():
        x_rec, z_q, _, _ = model(x)
        ref_rec, ref_z = official_forward(released_state_dict(model), model.config, x)
    assert torch.allclose(z_q, ref_z, atol=1e-5)
    assert torch.allclose(x_rec, ref_rec, atol=1e-4)
    assert (x_rec - ref_rec).abs().max() < 1e-3 * x_rec.abs().max()


# ---- save / load ----
def test_save_load_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = make_tokenizer("tiny").eval()
    model.latent_mean.fill_(0.3)
    path = tmp_path / "tok.pt"
    torch.save({"config": dataclasses.asdict(model.config), "model": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    other = SoftVQVAE(TokenizerConfig(**ckpt["config"])).eval()
    x = tiny_images()
    assert not torch.equal(other.encode(x), model.encode(x))
    other.load_state_dict(ckpt["model"])
    assert other.config == model.config
    assert other.latent_mean.item() == pytest.approx(0.3)
    with torch.no_grad():
        assert torch.equal(other(x)[0], model(x)[0])


# ---- DINOv2 / DINO v1 ----
def fake_dinov2(width=32, depth=2, heads=2):
    """Random state dict with the DINOv2 ViT-14 layout at 518 px: pos_embed 1 + 37x37, mask_token."""
    torch.manual_seed(0)
    src = VisionTransformer(518, 14, width, depth, heads)
    randomize_layerscale(src)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["mask_token"] = torch.randn(1, width)
    return state


def test_dinov2_loading_resamples_kernel_and_positions(tmp_path):
    state = fake_dinov2()
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 32)
    state["pos_embed"][:, 1:] = torch.linspace(-1, 1, 32)      # a constant grid stays constant
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    vit = load_dinov2(path, VisionTransformer(64, 16, 32, 2, 2))
    loaded = vit.state_dict()
    for key in ("cls_token", "blocks.1.ls2.gamma", "blocks.0.attn.qkv.weight", "norm.bias",
                "patch_embed.proj.bias"):
        assert torch.equal(loaded[key], state[key]), key
    assert loaded["pos_embed"].shape == (1, 1 + 4 * 4, 32)
    assert torch.equal(loaded["pos_embed"][:, 0], state["pos_embed"][:, 0])   # cls position kept
    assert torch.allclose(loaded["pos_embed"][0, 1:], torch.linspace(-1, 1, 32).expand(16, -1), atol=1e-5)
    # FlexiViT: a 14x14 patch, resized to 16x16 (timm's bicubic with anti-aliasing), embeds under the
    # new kernel exactly as the original patch under the 14x14 kernel.
    patch14 = torch.randn(5, 3, 14, 14)
    patch16 = F.interpolate(patch14, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    old = F.conv2d(patch14, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"]).flatten(1)
    new = vit.patch_embed.proj(patch16).flatten(1)
    assert (new - old).abs().max() < 1e-4
    assert old.abs().max() > 0.1           # not trivially zero
    with torch.no_grad():
        assert vit.forward_features(tiny_images(1, 64)).shape == (1, 17, 32)


def test_dino_v1_loading_and_discriminator_taps(tmp_path):
    torch.manual_seed(0)
    src = VisionTransformer(224, 16, 32, 3, 2, layerscale=False)      # DINO v1: no LayerScale
    assert not any("ls1" in k for k in src.state_dict())
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(src.state_dict(), path)
    vit = load_dino(path, VisionTransformer(224, 16, 32, 3, 2, layerscale=False))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in vit.state_dict().items())
    x = tiny_images(2, 224)
    with torch.no_grad():
        taps = vit.forward_features(x, return_blocks=(0, 2), include_embed=True)
        assert [t.shape for t in taps] == [(2, 197, 32)] * 3
        tokens = vit.embed(x)
        assert torch.equal(taps[0], tokens)
        assert torch.allclose(taps[1], vit.blocks[0](tokens))
        assert torch.allclose(vit.forward_features(x), vit.norm(taps[2]), atol=1e-5)
    with pytest.raises(ValueError, match="block indices"):
        vit.forward_features(x, return_blocks=(3,))
    # DINO v1 weights have no LayerScale: a DINOv2-style ViT names what is missing
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.ls1.gamma'"):
        load_dino(path, VisionTransformer(224, 16, 32, 3, 2))


def test_loader_errors_name_the_file_and_the_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/dinov2_vitl14_pretrain.pth.*facebookresearch/dinov2"):
        load_dinov2(tmp_path / "nowhere" / "dinov2_vitl14_pretrain.pth", "l")
    with pytest.raises(FileNotFoundError, match=r"dino_deitsmall16_pretrain.pth.*facebookresearch/dino"):
        load_dino(tmp_path / "dino_deitsmall16_pretrain.pth")
    state = fake_dinov2()
    state["norm.scale"] = state.pop("norm.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\]; unexpected keys \['norm.scale'\]"):
        load_dinov2(tmp_path / "renamed.pth", VisionTransformer(64, 16, 32, 2, 2))
    torch.save(fake_dinov2(depth=12), tmp_path / "small.pth")   # ViT-S keys, but 32 wide
    with pytest.raises(ValueError, match=r"cls_token: file \(1, 1, 32\) vs model \(1, 1, 384\)"):
        load_dinov2(tmp_path / "small.pth", "s", img_size=32)
    with pytest.raises(ValueError, match="one of"):
        load_dinov2(tmp_path / "small.pth", "g")


# ---- released checkpoints ----
def test_released_softvq_s_64_loads_strictly_and_reproduces_outputs(tmp_path):
    from safetensors.torch import save_file
    with torch.device("meta"):                  # random normal weights: faster than the real init
        model = make_tokenizer("S")
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05, generator=g)
    state = released_state_dict(model)
    state["projection.0.weight"] = torch.randn(1024, 32)       # alignment projector: dropped
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with open(OFFICIAL_CONFIG) as f:
        fields = json.load(f)
    fields.update(vq_mean=0.25, vq_std=0.5)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    loaded = load_released(tmp_path)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.latent_mean.item() == 0.25 and loaded.latent_std.item() == 0.5
    x = tiny_images(1, 64)        # any size works; 64 px keeps this test fast on a CPU
    with torch.no_grad():
        x_rec, z_q, _, _ = loaded(x)
        assert torch.isfinite(x_rec).all()
        assert torch.equal(x_rec, model(x)[0])
        assert z_q.norm(dim=-1).max() <= 1 + 1e-5               # cosine form: |z_q| <= 1


def test_released_mapping_refuses_unknown_and_missing_keys():
    model = make_tokenizer("tiny")
    state = released_state_dict(model)
    load_released_state_dict(make_tokenizer("tiny"), dict(state))          # the exact layout loads
    extra = dict(state, **{"decoder.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys \['decoder.extra.weight'\]"):
        load_released_state_dict(make_tokenizer("tiny"), extra)
    missing = {k: v for k, v in state.items() if k != "decoder.to_pixel.model.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['decoder.to_pixel.bias'\]"):
        load_released_state_dict(make_tokenizer("tiny"), missing)
    wrong = dict(state, **{"quant_conv.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"quant_conv.bias: file \(7,\) vs model \(32,\)"):
        load_released_state_dict(make_tokenizer("tiny"), wrong)


def test_released_config_maps_to_our_preset_and_refuses_what_it_cannot_load(tmp_path):
    with open(OFFICIAL_CONFIG) as f:
        fields = json.load(f)
    assert tokenizer.config_from_released(fields) == tokenizer.make_config("S")
    large = dict(fields, encoder_model="vit_base_patch14_dinov2.lvd142m",
                 decoder_model="vit_large_patch14_dinov2.lvd142m", num_latent_tokens=32,
                 codebook_embed_dim=64)
    assert tokenizer.config_from_released(large) == tokenizer.make_config("BL", tokens=32)
    with pytest.raises(ValueError, match="vit_giant_patch14_dinov2.lvd142m"):
        tokenizer.config_from_released(dict(fields, encoder_model="vit_giant_patch14_dinov2.lvd142m"))
    with pytest.raises(ValueError, match="use_rope"):
        tokenizer.config_from_released(dict(fields, use_rope=True))
    with pytest.raises(ValueError, match=r"lacks the fields \['tau'\]"):
        tokenizer.config_from_released({k: v for k, v in fields.items() if k != "tau"})
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        load_released(tmp_path / "missing_folder")
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_released(tmp_path)


# ---- export in the released format (save_released -> load_released) ----
def random_model(preset, tokens, seed=0, **overrides):
    """A model with every tensor random (built on the meta device: faster than the real init)."""
    with torch.device("meta"):
        model = make_tokenizer(preset, tokens=tokens, **overrides)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05, generator=g)
        model.latent_mean.fill_(0.0123)
        model.latent_std.fill_(0.456)
    return model


def assert_same_model(loaded, model, size):
    assert not loaded.training and loaded.config == model.config
    assert (loaded.latent_mean.item(), loaded.latent_std.item()) == (model.latent_mean.item(),
                                                                     model.latent_std.item())
    x = tiny_images(2, size)
    with torch.no_grad():
        x_rec, z_q, _, _ = model(x)
        assert torch.equal(loaded.encode(x), z_q)
        assert torch.equal(loaded(x)[0], x_rec)
        assert x_rec.abs().max() > 0.01                              # not trivially zero


@pytest.mark.parametrize("preset,tokens", [("tiny", 64), ("tiny", 32), ("S", 64), ("S", 32)])
def test_save_released_round_trip_is_bit_identical(tmp_path, preset, tokens):
    from safetensors.torch import load_file
    model = random_model(preset, tokens)
    fields = tokenizer.save_released(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == fields
    assert fields["vq_mean"] == pytest.approx(0.0123) and fields["vq_std"] == pytest.approx(0.456)
    names = {k: list(v.shape) for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    assert names == {k: list(v.shape) for k, v in released_state_dict(model).items()}
    assert_same_model(load_released(tmp_path), model, 32)
    with open(OFFICIAL_CONFIG) as f:
        reference = json.load(f)
    if preset == "S":                       # the official layout says everything: no extra field
        assert tokenizer.official_loadable(fields)
        assert set(fields) == set(reference)
        differ = {k for k in reference if fields[k] != reference[k]}
        expected = {"enc_pretrained", "vq_mean", "vq_std"} | (
            {"num_latent_tokens", "codebook_embed_dim"} if tokens == 32 else set())
        assert differ == expected
        if tokens == 64:
            with open(OFFICIAL_SHAPES) as f:
                assert names == json.load(f)["softvq-s-64"]
    else:                                   # 96 wide, 4 deep: no timm ViT of that size
        assert not tokenizer.official_loadable(fields)
        assert set(fields) == set(reference) | {tokenizer.EXPORT_CONFIG_KEY}
        assert fields["encoder_model"] == tokenizer.NOT_OFFICIAL_VIT


@pytest.mark.parametrize("overrides,official", [
    (dict(codebook_split="channels"), False), (dict(residual_depth=2), False),
    (dict(posterior="sqeuclid"), False), (dict(posterior="euclid"), False),
    (dict(tau="learnable"), False), (dict(quantizer="gmmvq"), False), (dict(quantizer="vq"), False),
    (dict(quantizer="kl"), False), (dict(quantizer="ae"), False), (dict(tau=0.1), True),
    (dict(entropy_temp=0.05), True),                      # training-only: the official code agrees
])
def test_export_of_what_the_official_layout_cannot_say(tmp_path, overrides, official):
    """S-sized ViTs with another quantizer setting: the extra field carries it, our loader reads
    it back exactly, and only settings that keep the official outputs stay official-loadable."""
    cfg = dataclasses.replace(PRESETS["tiny"], **_vit_dims_of("s"), layerscale_init=tokenizer.LAYERSCALE_INIT,
                              routing_init=False,
                              **overrides)
    with torch.device("meta"):
        meta_model = SoftVQVAE(cfg)
    fields = tokenizer.released_config(meta_model, 0.0, 1.0)
    assert tokenizer.official_loadable(fields) == official
    assert (tokenizer.EXPORT_CONFIG_KEY in fields) == (overrides != dict(tau=0.1))
    assert tokenizer.config_from_released(fields) == cfg
    # the same settings at tiny size, through the files
    torch.manual_seed(0)
    model = make_tokenizer("tiny", **overrides).eval()
    randomize_layerscale(model)
    if overrides.get("tau") == "learnable":
        with torch.no_grad():
            model.quantize.log_tau.fill_(-3.0)
    tokenizer.save_released(model, tmp_path)
    assert_same_model(load_released(tmp_path), model, 32)


def _vit_dims_of(size):
    width, depth, heads = tokenizer.VIT_SIZES[size]
    return dict(enc_width=width, enc_depth=depth, enc_heads=heads, dec_width=width,
                dec_depth=depth, dec_heads=heads, patch_size=16, image_size=64)


def test_export_config_that_disagrees_or_is_incomplete_is_refused(tmp_path):
    model = make_tokenizer("tiny").eval()
    fields = tokenizer.save_released(model, tmp_path)
    edited = dict(fields, num_latent_tokens=32)
    (tmp_path / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"disagree.*num_latent_tokens.*32 vs 64"):
        load_released(tmp_path)
    partial = dict(fields, **{tokenizer.EXPORT_CONFIG_KEY: {
        k: v for k, v in fields[tokenizer.EXPORT_CONFIG_KEY].items() if k != "posterior"}})
    with pytest.raises(ValueError, match=r"missing \['posterior'\]"):
        tokenizer.config_from_released(partial)
    nan = make_tokenizer("tiny")
    with torch.no_grad():
        nan.quant_conv.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite weights: \['quant_conv.bias'\]"):
        tokenizer.save_released(nan, tmp_path / "nan")


def test_export_command_writes_ema_or_raw_weights(tmp_path, capsys):
    torch.manual_seed(0)
    live, ema = make_tokenizer("tiny").eval(), make_tokenizer("tiny").eval()
    randomize_layerscale(live)
    randomize_layerscale(ema, seed=1)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"config": dataclasses.asdict(live.config), "model": live.state_dict(),
                "ema": ema.state_dict(), "step": 7}, ckpt)
    for flags, expected in (([], ema), (["--raw"], live)):
        out = tmp_path / f"out{len(flags)}"
        run_script("tokenizer.py", "--export", ckpt, out, *flags)
        assert "only tokenizer.load_released loads it" in capsys.readouterr().out
        assert_same_model(load_released(out), expected, 32)
    with pytest.raises(ValueError, match="holds no 'ema' weights"):
        torch.save({"config": dataclasses.asdict(live.config), "model": live.state_dict()}, ckpt)
        tokenizer.export_checkpoint(str(ckpt), tmp_path / "none")


def _patch_dependence(model, image_size=32):
    """(N, N) matrix: row p = how the gradient of output patch p spreads over the input patches
    (fractions summing to 1), on a batch of built-in images, at the model's current weights."""
    import data
    p = model.config.patch_size
    g = image_size // p
    held = data.SyntheticShapes(8, image_size, seed=3, train=False)
    x = torch.stack([held[i][0] for i in range(len(held))]).requires_grad_(True)
    out = model(x)[0]
    rows = []
    for i in range(g * g):
        r, c = divmod(i, g)
        grad, = torch.autograd.grad(out[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].pow(2).sum(), x,
                                    retain_graph=True)
        share = grad.abs().sum((0, 1)).reshape(g, p, g, p).sum((1, 3)).flatten()
        rows.append(share / share.sum())
    return torch.stack(rows)


def test_routing_init_starts_the_tokenizer_as_a_local_autoencoder():
    """routing_init (the tiny preset's): before any training, output patch p is made from input
    patch p alone (L = N: one latent per patch), or from the patches of its latent's region
    (L < N); with the official random init it depends on every patch alike (uniform attention).
    Fails if q/k do not read the position channels, if the encoder's and the decoder's latent
    positions do not match their regions, or if the values do not pass the content on."""
    torch.manual_seed(0)
    routed = tokenizer.make_tokenizer("tiny", 16, "softvq", token_dim=32).eval()
    assert routed.config.routing_init
    share = _patch_dependence(routed)
    assert share.diag().min() > 0.9, share.diag()
    plain = tokenizer.make_tokenizer("tiny", 16, "softvq", token_dim=32, routing_init=False).eval()
    assert _patch_dependence(plain).diag().max() < 2.0 / 16
    # L = 4 latents over 4x4 patches: each latent owns a 2x2 block; output patch p reads its block
    coarse = tokenizer.make_tokenizer("tiny", 4, "ae", token_dim=32).eval()
    share = _patch_dependence(coarse)
    region = torch.tensor([(r // 2) * 2 + c // 2 for r in range(4) for c in range(4)])
    same = (region[:, None] == region[None, :]).float()
    assert (share * same).sum(1).min() > 0.9, (share * same).sum(1)


def test_routing_regions_tile_the_grid_or_say_why():
    patch, latent = tokenizer.routing_regions(16, (4, 4))            # one latent per patch
    assert patch.tolist() == list(range(16)) and latent.tolist() == list(range(16))
    patch, latent = tokenizer.routing_regions(8, (8, 8))             # 2 x 4 latents of 4 x 2 patches
    assert patch.view(8, 8)[:4, :2].unique().tolist() == [0] and patch.view(8, 8)[4:, 6:].unique().tolist() == [7]
    assert torch.bincount(patch).tolist() == [8] * 8
    patch, latent = tokenizer.routing_regions(64, (4, 4))            # 4 latents per patch
    assert latent.tolist() == [j % 16 for j in range(64)]
    with pytest.raises(ValueError, match="tile the 4x4 patch grid"):
        tokenizer.routing_regions(6, (4, 4))
    with pytest.raises(ValueError, match="multiple of"):
        tokenizer.make_tokenizer("tiny", 24, "softvq", token_dim=8)      # 24 latents, 16 patches
