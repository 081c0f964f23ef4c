"""Why the tiny tokenizer stalled at the mean image: the experiments of README "Why the tiny
tokenizer stalled", re-runnable. Each run trains one variant for --steps steps on the built-in data
(batch --batch, AdamW, warm-up + cosine, grad clip as train_tok.py) and prints, and appends to
--results, one JSON line: held-out PSNR, the mean-image PSNR, the training loss every 100 steps,
and init_gain: std over images of the untrained output / of the input (how much content passes).

    python diagnose_tiny.py --tag base --patch 4 --tokens 64          # the old tiny preset
    python diagnose_tiny.py --tag ls1 --patch 4 --tokens 64 --ls 1    # LayerScale 1.0
    python diagnose_tiny.py --tag dec-patch --mode dec-patch --patch 8 --tokens 16 --ls 1

--mode replaces one half of the tokenizer by an oracle to see which half is slow:
  full          the tokenizer as it is
  enc-linear    ViT encoder + quantizer, then ONE linear layer from all L*D numbers to the pixels
  dec-linear    ONE linear layer from the pixels to L*D numbers, then quantizer + ViT decoder
  dec-patch     latent j = a linear map of patch j (L = N): the decoder only has to route
  enc-patch     ViT encoder; patch j = a linear map of latent j (L = N): the encoder only has to route
  patch-linear  no transformer: patch j -> 32 numbers -> patch j (a per-patch linear autoencoder)
  pca           no training: the PSNR of the best linear code of D = 32 numbers per patch (PCA of
                the training patches), the linear ceiling of one latent per patch
Init / schedule knobs: --ls (LayerScale init), --lr, --warmup, --batch, --lin-init (tn: trunc-normal
0.02 as the ViT, default: nn.Linear's, lecun: N(0, 1/fan_in) everywhere), --qk-std, --pos-std /
--lpos-std (2-D / latent position embeddings), --pos-lr (lr multiplier of positions and tokens),
--center (objects' centre range around 0.5), --q (quantizer), --K (codebook size).
Attention at init: --routing (the tiny preset's tokenizer.routing_init_: latent j <-> patch region j);
--match S (latent j's position := patch j's, random N(0, S^2)), --mimetic BETA (every head's
W_q = W_k = sqrt(BETA) x random orthonormal rows), --vo G (W_o W_v = G x a random rotation's identity).

    python diagnose_tiny.py --tag routing --patch 8 --tokens 16 --ls 1 --lr 2e-3 --routing
    python diagnose_tiny.py --tag mimetic --patch 8 --tokens 16 --ls 1 --lr 2e-3 --match 1 --mimetic 3 --vo 1
"""
import sys, time, math, json, argparse, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, torch.nn as nn, torch.nn.functional as F
import numpy as np
import tokenizer, data
p = argparse.ArgumentParser()
p.add_argument('--steps', type=int, default=200); p.add_argument('--lr', type=float, default=1e-3)
p.add_argument('--batch', type=int, default=16); p.add_argument('--warmup', type=int, default=20)
p.add_argument('--ls', type=float, default=1e-5); p.add_argument('--q', default='softvq')
p.add_argument('--patch', type=int, default=4); p.add_argument('--width', type=int, default=96)
p.add_argument('--depth', type=int, default=4); p.add_argument('--heads', type=int, default=3)
p.add_argument('--pos-std', type=float, default=0.02); p.add_argument('--mask-std', type=float, default=0.02)
p.add_argument('--lin-init', default='tn'); p.add_argument('--wd', type=float, default=1e-4)
p.add_argument('--clip', type=float, default=1.0); p.add_argument('--tag', default='')
p.add_argument('--qk-std', type=float, default=0); p.add_argument('--fixed', action='store_true'); p.add_argument('--all-std', type=float, default=0)
p.add_argument('--tokens', type=int, default=64); p.add_argument('--K', type=int, default=256)
p.add_argument('--mode', default='full')
p.add_argument('--lpos-std', type=float, default=0.02)
p.add_argument('--center', type=float, default=0)
p.add_argument('--pos-lr', type=float, default=1)
p.add_argument('--mimetic', type=float, default=0); p.add_argument('--vo', type=float, default=0)
p.add_argument('--match', type=float, default=0); p.add_argument('--routing', action='store_true')
p.add_argument('--threads', type=int, default=1); p.add_argument('--results', default='runs/diagnose_tiny.jsonl'); p.add_argument('--beta2', type=float, default=0.95)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
m = tokenizer.make_tokenizer('tiny', a.tokens, a.q, token_dim=32, patch_size=a.patch, enc_width=a.width, dec_width=a.width,
                              enc_depth=a.depth, dec_depth=a.depth, enc_heads=a.heads, dec_heads=a.heads,
                              layerscale_init=a.ls, codebook_size=a.K,
                              routing_init=a.routing)
with torch.no_grad():
    if not a.routing:   # --routing: tokenizer.routing_init_ has set the positions and tokens
        for vit in (m.encoder.model, m.decoder.model):
            vit.pos_embed.normal_(0, a.pos_std)
        m.decoder.mask_token.normal_(0, a.mask_std)
        m.encoder.latent_pos_embed.normal_(0, a.lpos_std); m.decoder.latent_pos_embed.normal_(0, a.lpos_std)
    for mod in m.modules():
        if isinstance(mod, tokenizer.Attention) and a.qk_std:
            w = mod.qkv.weight; C = w.shape[1]; w[:2*C].normal_(0, a.qk_std)
        if isinstance(mod, (nn.Linear,)) and a.all_std:
            mod.weight.normal_(0, a.all_std)
    if a.match:   # latent j's position embedding := patch j's (L = N), in encoder and decoder
        for vit, lpos in ((m.encoder.model, m.encoder.latent_pos_embed), (m.decoder.model, m.decoder.latent_pos_embed)):
            vit.pos_embed[0, 1:].normal_(0, a.match); lpos[0] = vit.pos_embed[0, 1:]
    if a.mimetic or a.vo:
        for mod in m.modules():
            if isinstance(mod, tokenizer.Attention):
                C = mod.qkv.weight.shape[1]; h = C // mod.heads
                if a.mimetic:
                    for hd in range(mod.heads):   # W_q = W_k = sqrt(beta) * h random orthonormal directions
                        E = torch.linalg.qr(torch.randn(C, h))[0].T * a.mimetic ** 0.5
                        mod.qkv.weight[hd * h:(hd + 1) * h] = E; mod.qkv.weight[C + hd * h:C + (hd + 1) * h] = E
                if a.vo:   # W_o W_v = vo * I
                    Q = torch.linalg.qr(torch.randn(C, C))[0]
                    mod.qkv.weight[2 * C:] = Q.T * abs(a.vo) ** 0.5; mod.proj.weight[:] = Q * abs(a.vo) ** 0.5 * (1 if a.vo > 0 else -1)
    if a.lin_init == 'lecun':
        for mod in m.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                fan_in = mod.weight[0].numel(); mod.weight.normal_(0, fan_in ** -0.5)
    if a.lin_init == 'default':
        for lin in (m.quant_conv, m.post_quant_conv, m.decoder.to_pixel):
            lin.reset_parameters()
class EncLinear(nn.Module):   # ViT encoder + quantizer, then a linear decoder from all L*D numbers to pixels
    def __init__(s, m):
        super().__init__(); s.m = m; L, D = m.config.num_tokens, m.config.token_dim
        s.dec = nn.Linear(L * D, 3 * 32 * 32)
    def forward(s, x):
        z, losses, info = s.m._encode(x)
        return s.dec(z.flatten(1)).view(-1, 3, 32, 32), z, losses, info
class DecLinear(nn.Module):   # linear encoder from pixels to L*D numbers, then quantizer + ViT decoder
    def __init__(s, m):
        super().__init__(); s.m = m; L, D = m.config.num_tokens, m.config.token_dim
        s.enc = nn.Linear(3 * 32 * 32, L * D); s.L, s.D = L, D
    def forward(s, x):
        z, losses, info = s.m.quantize(s.enc(x.flatten(1)).view(-1, s.L, s.D))
        return s.m.decode(z), z, losses, info
class DecPatch(nn.Module):   # latent j = a linear map of patch j's pixels (L = N): the decoder only has to route
    def __init__(s, m):
        super().__init__(); s.m = m; s.p = m.config.patch_size; D = m.config.token_dim
        s.enc = nn.Linear(3 * s.p * s.p, D)
    def forward(s, x):
        B, p = x.shape[0], s.p
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 3 * p * p)
        z, losses, info = s.m.quantize(s.enc(patches))
        return s.m.decode(z), z, losses, info
class EncPatch(nn.Module):   # ViT encoder; latent j decodes patch j linearly (L = N): the encoder only has to route
    def __init__(s, m):
        super().__init__(); s.m = m; s.p = m.config.patch_size; D = m.config.token_dim
        s.dec = nn.Linear(D, 3 * s.p * s.p)
    def forward(s, x):
        z, losses, info = s.m._encode(x)
        B, p, g = x.shape[0], s.p, 32 // s.p
        out = s.dec(z).view(B, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, 32, 32)
        return out, z, losses, info
class PatchLinear(nn.Module):   # no transformer: patch j -> Linear -> D numbers -> Linear -> patch j
    def __init__(s, m):
        super().__init__(); s.m = m; s.p = m.config.patch_size; D = m.config.token_dim
        s.enc = nn.Linear(3 * s.p * s.p, D); s.dec = nn.Linear(D, 3 * s.p * s.p)
    def forward(s, x):
        B, p, g = x.shape[0], s.p, 32 // s.p
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 3 * p * p)
        z = s.enc(patches)
        out = s.dec(z).view(B, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, 32, 32)
        return out, z, {}, {}
if a.mode == 'patch-linear': m = PatchLinear(m)
if a.mode == 'dec-patch': m = DecPatch(m)
if a.mode == 'enc-patch': m = EncPatch(m)
if a.mode == 'enc-linear': m = EncLinear(m)
if a.mode == 'dec-linear': m = DecLinear(m)
mm = m if a.mode in ('full', 'pca') else m.m
if a.center: data.CENTRE_RANGE = (0.5 - a.center, 0.5 + a.center)
ds = data.SyntheticShapes(10000, 32, seed=0, train=True)
val = data.SyntheticShapes(500, 32, seed=12345, train=False)
xv = torch.stack([val[i][0] for i in range(256)])
xtr_mean = torch.stack([ds[i][0] for i in range(2000)]).mean(0, keepdim=True)
def psnr(x, y):
    mse = ((x.clamp(-1,1) - y) ** 2).mean(dim=(1,2,3)) / 4  # on [0,1]
    return (10 * torch.log10(1 / mse)).mean().item()
posn = [p for n, p in m.named_parameters() if any(k in n for k in ('pos_embed', 'latent_tokens', 'mask_token', 'cls_token'))]
ids = {id(p) for p in posn}
decay = [p for p in m.parameters() if p.ndim >= 2 and id(p) not in ids]; nodecay = [p for p in m.parameters() if p.ndim < 2]
opt = torch.optim.AdamW([{'params': decay, 'weight_decay': a.wd, 'mult': 1}, {'params': nodecay, 'weight_decay': 0, 'mult': 1},
                         {'params': posn, 'weight_decay': 0, 'mult': a.pos_lr}], lr=a.lr, betas=(0.9, a.beta2))
if a.mode == 'pca':
    def patches(x, p=a.patch): return x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * p * p)
    P = patches(torch.stack([ds[i][0] for i in range(3000)])); mu = P.mean(0)
    V = torch.linalg.svd(P - mu, full_matrices=False)[2][:32]
    rec = ((patches(xv) - mu) @ V.T @ V + mu).view(len(xv), 32 // a.patch, 32 // a.patch, 3, a.patch, a.patch)
    rec = rec.permute(0, 3, 1, 4, 2, 5).reshape(len(xv), 3, 32, 32)
    print(json.dumps(dict(tag=a.tag, mode='pca', psnr=round(psnr(rec, xv), 2)))); sys.exit()
with torch.no_grad():   # how much of the image-dependent input reaches the output before training
    m.eval(); init_gain = (m(xv[:64])[0].std(0).mean() / xv[:64].std(0).mean()).item(); m.train()
g = torch.Generator().manual_seed(0)
t0 = time.time(); hist = []
for step in range(a.steps):
    idx = torch.randint(0, len(ds), (a.batch,), generator=g)
    if a.fixed: idx = torch.arange(a.batch)
    x = torch.stack([ds[int(i)][0] for i in idx])
    lr = a.lr * min(1, (step + 1) / a.warmup) * (0.5 * (1 + math.cos(math.pi * step / a.steps)) * 0.9 + 0.1)
    for gr in opt.param_groups: gr['lr'] = lr * gr['mult']
    xr, z, losses, info = m(x)
    rec = F.mse_loss(xr, x); loss = rec + sum(losses.values())
    opt.zero_grad(); loss.backward()
    if a.clip: nn.utils.clip_grad_norm_(m.parameters(), a.clip)
    opt.step()
    if step % 100 == 0 or step == a.steps - 1: hist.append((step, round(rec.item(), 4)))
m.eval()
with torch.no_grad():
    xr = torch.cat([m(xv[i:i+64])[0] for i in range(0, len(xv), 64)])
    if a.fixed:
        xf = torch.stack([ds[i][0] for i in range(a.batch)]); print('fixed-batch psnr', psnr(m(xf)[0], xf))
res = dict(tag=a.tag, args={k: v for k, v in vars(a).items() if k != 'tag'}, psnr=round(psnr(xr, xv), 2),
           mean_psnr=round(psnr(xtr_mean.expand_as(xv), xv), 2), init_gain=round(init_gain, 4), hist=hist, sec=round(time.time() - t0, 1),
           ls=[round(b.ls1.gamma.abs().mean().item(), 4) for b in mm.decoder.model.blocks])
print(json.dumps(res)); os.makedirs(os.path.dirname(a.results) or '.', exist_ok=True); open(a.results, 'a').write(json.dumps(res) + '\n')
