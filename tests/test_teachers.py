"""Tests of the alignment teachers of Table 4 (tokenizer.py: ClipViT, EvaViT, load_timm_tower,
teacher_checkpoint; train_tok.py: --teacher, Teacher, make_teacher): the timm model-hub key layouts,
strict loading from synthetic model.safetensors files, the patch-grid rule, EVA-02's rotary
embedding, our own teacher files, and (where timm is installed) equality with timm's towers on the
same random weights. CPU, tiny widths (layouts at full size on the meta device), no downloads.

Run: python -m pytest -q tests/test_teachers.py
"""

import os
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tokenizer  # noqa: E402
import train_tok  # noqa: E402
from conftest import run_script  # noqa: E402
from tokenizer import (ClipViT, EvaViT, VisionTransformer, load_teacher_checkpoint,  # noqa: E402
                       load_timm_tower, teacher_checkpoint)

CLIP, EVA = "vit_base_patch16_clip_224.openai", "eva02_base_patch16_clip_224.merged2b"
TOWERS = {CLIP: ClipViT, EVA: EvaViT}
TINY = (32, 2, 2)                                     # width, depth, heads

# timm 1.0's state dict of each model at full size (what it writes to the model hub), block 0 and
# the top level; every block repeats block 0's keys. head.* (the 512-d projection) is dropped.
CLIP_KEYS = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768),
             "patch_embed.proj.weight": (768, 3, 16, 16),
             "norm_pre.weight": (768,), "norm_pre.bias": (768,),
             "blocks.0.norm1.weight": (768,), "blocks.0.norm1.bias": (768,),
             "blocks.0.attn.qkv.weight": (2304, 768), "blocks.0.attn.qkv.bias": (2304,),
             "blocks.0.attn.proj.weight": (768, 768), "blocks.0.attn.proj.bias": (768,),
             "blocks.0.norm2.weight": (768,), "blocks.0.norm2.bias": (768,),
             "blocks.0.mlp.fc1.weight": (3072, 768), "blocks.0.mlp.fc1.bias": (3072,),
             "blocks.0.mlp.fc2.weight": (768, 3072), "blocks.0.mlp.fc2.bias": (768,),
             "norm.weight": (768,), "norm.bias": (768,)}
EVA_KEYS = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
            "patch_embed.proj.bias": (768,), "blocks.0.norm1.weight": (768,), "blocks.0.norm1.bias": (768,),
            "blocks.0.attn.q_proj.weight": (768, 768), "blocks.0.attn.q_proj.bias": (768,),
            "blocks.0.attn.k_proj.weight": (768, 768), "blocks.0.attn.v_proj.weight": (768, 768),
            "blocks.0.attn.v_proj.bias": (768,), "blocks.0.attn.norm.weight": (768,),
            "blocks.0.attn.norm.bias": (768,), "blocks.0.attn.proj.weight": (768, 768),
            "blocks.0.attn.proj.bias": (768,), "blocks.0.norm2.weight": (768,), "blocks.0.norm2.bias": (768,),
            "blocks.0.mlp.fc1_g.weight": (2048, 768), "blocks.0.mlp.fc1_g.bias": (2048,),
            "blocks.0.mlp.fc1_x.weight": (2048, 768), "blocks.0.mlp.fc1_x.bias": (2048,),
            "blocks.0.mlp.norm.weight": (2048,), "blocks.0.mlp.norm.bias": (2048,),
            "blocks.0.mlp.fc2.weight": (768, 2048), "blocks.0.mlp.fc2.bias": (768,),
            "norm.weight": (768,), "norm.bias": (768,)}


def random_state(module, seed=0):
    """Random values for every tensor (LayerNorm weights around 1), so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * (0.05 if v.dim() > 1 else 0.3)
                + (1.0 if k.endswith("norm.weight") or "norm1.weight" in k or "norm2.weight" in k
                   or "norm_pre.weight" in k else 0.0))
            for k, v in module.state_dict().items()}


def hub_file(tmp_path, name, dims=TINY, extra=None, drop=None, dtype=torch.float32,
             file="model.safetensors"):
    """A model.safetensors in the layout of huggingface.co/timm/<name> (tiny widths, 224 px / 16),
    with the contrastive head the hub files carry."""
    state = random_state(TOWERS[name](224, 16, *dims))
    state["head.weight"], state["head.bias"] = torch.randn(512, dims[0]), torch.zeros(512)
    state.update(extra or {})
    for key in drop or ():
        del state[key]
    path = tmp_path / file
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path))
    return path, state


@pytest.mark.parametrize("name, expected", [(CLIP, CLIP_KEYS), (EVA, EVA_KEYS)])
def test_full_size_key_layout_is_timms(name, expected):
    with torch.device("meta"):
        tower = TOWERS[name](224, 16, *tokenizer.TIMM_TOWERS[name][1])
    state = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    top = {k: s for k, s in state.items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    assert top == expected                                               # top level and block 0
    per_block = [k for k in expected if k.startswith("blocks.0.")]
    assert len(state) == len(expected) + 11 * len(per_block)           # 12 blocks, nothing else


@pytest.mark.parametrize("name", [CLIP, EVA])
def test_strict_loading_names_keys_and_files(tmp_path, name):
    path, state = hub_file(tmp_path, name, dtype=torch.float16)             # fp16 file -> float32
    tower = load_timm_tower(path, TOWERS[name](224, 16, *TINY))
    for key, value in tower.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, state[key].half().float()), key
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.norm2.bias'\]; "
                                         r"unexpected keys \['blocks.1.extra'\]"):
        load_timm_tower(hub_file(tmp_path, name, extra={"blocks.1.extra": torch.zeros(1)},
                                 drop=["blocks.1.norm2.bias"], file="edited.safetensors")[0],
                        TOWERS[name](224, 16, *TINY))
    with pytest.raises(ValueError, match="cls_token: file .1, 1, 32. vs model .1, 1, 64."):
        load_timm_tower(path, TOWERS[name](224, 16, 64, 2, 2))
    with pytest.raises(FileNotFoundError, match=rf"nowhere.safetensors.*huggingface.co/timm/{name}"):
        load_timm_tower(tmp_path / "nowhere.safetensors", name)
    with pytest.raises(ValueError, match="one of"):
        load_timm_tower(path, "vit_base_patch16_clip_224.laion2b")


def test_clip_and_eva_layouts_are_not_interchangeable(tmp_path):
    clip_path, _ = hub_file(tmp_path, CLIP)
    with pytest.raises(ValueError, match=r"missing keys \[.*'blocks.0.attn.k_proj.weight'.*"
                                         r"unexpected keys \[.*'norm_pre.weight'"):
        load_timm_tower(clip_path, EvaViT(224, 16, *TINY))


@pytest.mark.parametrize("name", [CLIP, EVA])
def test_patch_grid_rule_and_feature_shapes(tmp_path, name):
    """Built at the tokenizer's grid: 64 px with patch 8 -> 8x8 patch tokens, the 16x16 kernel
    resampled and the 14x14 position grid resized (cls position kept)."""
    path, state = hub_file(tmp_path, name)
    tower = load_timm_tower(path, TOWERS[name](64, 8, *TINY)).eval()
    assert tower.patch_embed.proj.weight.shape == (32, 3, 8, 8)
    assert tower.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert torch.equal(tower.pos_embed[:, 0], state["pos_embed"][:, 0])
    with torch.no_grad():
        feats = tower.forward_features(torch.randn(2, 3, 64, 64))
        assert feats.shape == (2, 65, 32) and torch.isfinite(feats).all()
        assert tower.forward_features(torch.randn(1, 3, 64, 96)).shape == (1, 1 + 8 * 12, 32)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        tower.forward_features(torch.randn(1, 3, 60, 64))


def test_eva_rope_is_a_relative_2d_rotation():
    """On the 16x16 reference grid, <R(p) q, R(p') k> depends only on p' - p (rows and columns);
    on an 8x8 grid, position i sits where 2i does on the 16x16 grid (timm's ref_feat_shape)."""
    torch.manual_seed(0)
    head_dim = 16
    sin, cos = tokenizer.eva_rope((16, 16), head_dim)
    assert sin.shape == cos.shape == (256, head_dim)
    assert torch.allclose(sin ** 2 + cos ** 2, torch.ones(256, head_dim))
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    rot = tokenizer.apply_rope(torch.stack([q] * 256 + [k] * 256).view(2, 256, head_dim), (sin, cos))

    def score(p, p2):     # (row, col) positions of q and k
        return rot[0, p[0] * 16 + p[1]] @ rot[1, p2[0] * 16 + p2[1]]

    for offset in [(0, 1), (1, 0), (2, 3)]:
        a = score((0, 0), offset)
        b = score((5, 7), (5 + offset[0], 7 + offset[1]))
        assert torch.allclose(a, b, atol=1e-5), offset
    assert not torch.allclose(score((0, 0), (0, 1)), score((0, 0), (1, 0)), atol=1e-3)   # 2-D, not 1-D
    assert not torch.allclose(score((0, 0), (0, 0)), score((0, 0), (0, 1)), atol=1e-3)
    sin8, cos8 = tokenizer.eva_rope((8, 8), head_dim)
    assert torch.allclose(sin8[3 * 8 + 5], sin[6 * 16 + 10]) and torch.allclose(cos8[1], cos[2])


def test_towers_match_timm_on_the_same_weights(tmp_path):
    """Our towers against timm's create_model(name, pretrained=True, img_size, patch_size) on the
    same file (what the official code calls): at the native grid and with patch 8 at 64 px."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    for name, cls in TOWERS.items():
        ref = timm.create_model(name, pretrained=False, embed_dim=32, depth=2, num_heads=2)
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in random_state(ref).items()}, str(path))
        for img, patch in ((224, 16), (64, 8)):
            theirs = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                       embed_dim=32, depth=2, num_heads=2, img_size=img,
                                       patch_size=patch).eval()
            ours = load_timm_tower(path, cls(img, patch, *TINY)).eval()
            x = torch.randn(2, 3, img, img)
            with torch.no_grad():
                a, b = theirs.forward_features(x), ours.forward_features(x)
            assert a.shape == b.shape and a.abs().max() > 0.5
            assert (a - b).abs().max() < 1e-4, (name, img, patch, (a - b).abs().max())


# ---- teachers saved by this project (--teacher vit-file) ----
def test_teacher_file_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(32, 4, *TINY, layerscale=False)
    path = tmp_path / "teacher.pt"
    torch.save(teacher_checkpoint(vit, (0.5, 0.4, 0.3), (0.2, 0.2, 0.25)), path)
    loaded, mean, std = load_teacher_checkpoint(path, 32, 4)
    assert (mean, std) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.25))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), vit.forward_features(x))
        resampled, _, _ = load_teacher_checkpoint(path, 64, 4)           # another grid: positions resized
        assert resampled.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1 + 16 * 16, 32)
    ckpt = teacher_checkpoint(vit, (0.5,) * 3, (0.2,) * 3)
    ckpt["arch"]["layerscale"] = True                                    # arch and weights disagree
    torch.save(ckpt, tmp_path / "bad_arch.pt")
    with pytest.raises(ValueError, match=r"does not match its arch.*blocks.0.ls1.gamma"):
        load_teacher_checkpoint(tmp_path / "bad_arch.pt", 32, 4)
    torch.save(vit.state_dict(), tmp_path / "bare.pt")                   # a bare state dict
    with pytest.raises(ValueError, match="not a teacher file"):
        load_teacher_checkpoint(tmp_path / "bare.pt", 32, 4)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_teacher_checkpoint(tmp_path / "nowhere.pt", 32, 4)
    with pytest.raises(ValueError, match="VisionTransformer"):
        teacher_checkpoint(ClipViT(32, 4, *TINY), (0.5,) * 3, (0.2,) * 3)


# ---- train_tok.py: the teacher wrapper and the --teacher flag ----
def test_teacher_wrapper_uses_its_own_normalisation():
    torch.manual_seed(0)
    vit = ClipViT(32, 4, *TINY)
    teacher = train_tok.Teacher(vit, train_tok.CLIP_MEAN, train_tok.CLIP_STD).train()
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = torch.tensor(train_tok.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(train_tok.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = teacher(x)
        assert torch.allclose(out, vit.forward_features(((x + 1) / 2 - mean) / std)[:, 1:], atol=1e-6)
        assert out.shape == (2, 64, 32) and teacher.width == 32
        imagenet = train_tok.Teacher(vit, train_tok.IMAGENET_MEAN, train_tok.IMAGENET_STD)(x)
        assert not torch.allclose(out, imagenet, atol=1e-3)              # the normalisation matters


def test_make_teacher_builds_each_architecture(tmp_path):
    kinds = {"dinov2-b": VisionTransformer, "clip-b16": ClipViT, "eva02-clip-b16": EvaViT,
             "vit-file": VisionTransformer}
    assert set(kinds) | {"dinov2-s", "dinov2-l"} == set(train_tok.TEACHERS)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for kind, cls in kinds.items():
        teacher = train_tok.make_teacher(kind, None, 32, 4, stand_in=TINY)
        assert type(teacher.vit) is cls, kind
        with torch.no_grad():
            assert teacher(x).shape == (1, 64, 32)
    vit = VisionTransformer(32, 4, *TINY)
    torch.save(teacher_checkpoint(vit, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1)), tmp_path / "own.pt")
    teacher = train_tok.make_teacher("vit-file", str(tmp_path / "own.pt"), 32, 4)
    assert (teacher.mean, teacher.std) == ((0.1, 0.2, 0.3), (0.3, 0.2, 0.1))


def run_train_tok(tmp_path, monkeypatch, *args):
    """train_tok.py's command line in this process (no interpreter start-up), no pretrained files."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    run_script("train_tok.py", "--batch", "2", "--iters", "1", "--out-dir", tmp_path, *args)


def test_cli_trains_with_an_own_teacher_file(tmp_path, monkeypatch, capsys):
    """--teacher vit-file --teacher-path F turns the alignment term on without any other file (the
    tiny preset switches LPIPS / GAN off); without --teacher-path it is a clear error."""
    torch.save(teacher_checkpoint(VisionTransformer(32, 4, *TINY), (0.5,) * 3, (0.25,) * 3),
               tmp_path / "own.pt")
    run_train_tok(tmp_path, monkeypatch, "--preset", "tiny", "--teacher", "vit-file",
                  "--teacher-path", tmp_path / "own.pt", "--log-every", "1")
    out = capsys.readouterr().out
    assert f"alignment teacher vit-file from {tmp_path / 'own.pt'}" in out
    assert "alignment + quantizer" in out and " align " in out
    with pytest.raises(ValueError, match="--teacher vit-file needs --teacher-path"):
        run_train_tok(tmp_path, monkeypatch, "--preset", "tiny", "--teacher", "vit-file")


def test_cli_teacher_size_is_a_deprecated_alias(tmp_path, monkeypatch, capsys):
    with pytest.warns(FutureWarning, match="--teacher-size is deprecated: use --teacher dinov2-s"):
        run_train_tok(tmp_path, monkeypatch, "--preset", "tiny", "--teacher-size", "s",
                      "--fake-pretrained", "--lpips-weight", "0", "--disc-weight", "0")
    assert "alignment teacher dinov2-s (random stand-in)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: --teacher-size s contradicts --teacher clip-b16"):
        run_train_tok(tmp_path, monkeypatch, "--preset", "tiny", "--teacher-size", "s",
                      "--teacher", "clip-b16")


@pytest.mark.parametrize("kind, name", [("clip-b16", CLIP), ("eva02-clip-b16", EVA)])
def test_full_preset_names_the_missing_teacher_file(tmp_path, monkeypatch, kind, name):
    with pytest.raises(SystemExit,       # a one-line user error naming the file and where to get it
                       match=rf"{name}.safetensors \(from model.safetensors of "
                             rf"huggingface.co/timm/{name}\)"):
        run_train_tok(tmp_path, monkeypatch, "--preset", "B", "--data-path", "builtin", "--teacher", kind)
