#!/usr/bin/env python3
"""PyTorch reference for bench_sd (issue 7): the same figures on the same
shapes, from a compact SD1.5 written here from the architecture (no
diffusers: the GPU machine has none and no network), random init.

  unet_fwd_b2      UNet forward, batch 2, LxL latents (64: 512x512 images)
  train_step       1 instance + 1 prior row, MSE (instance + prior), global
                   norm clip 1.0, AdamW(fused=True), UNet trained; the text
                   encoder is frozen, so its output is a cached context here
                   (ours runs the frozen CLIP forward inside its step: 2 x 77
                   tokens, well under 1% of the step)
  sample_ddim_cfg  DDIM, STEPS steps, classifier-free guidance (UNet batch 2
                   per step), then the VAE decoder to 8L x 8L (ours also
                   encodes the two prompts with CLIP, likewise small)
  vae_decode       the VAE decoder alone, one image

Architecture (diffusers UNet2DConditionModel / AutoencoderKL as SD1.5
configures them): UNet channels 320/640/1280/1280, 2 ResNet blocks per level,
cross-attention transformers (depth 1, 8 heads, context 768, GEGLU 4C) on the
first three down levels, the mid block and the last three up levels,
GroupNorm 32, stride-2 conv downsamplers, nearest-2x + conv upsamplers; VAE
decoder 512/512/256/128 with 3 ResNet blocks per level and one single-head
attention in the middle.  --count checks the UNet's parameter count against
SD1.5's 859,520,964 without torch.

Precision: fp32 runs with TF32 off (cuDNN and cuBLAS; ours is FMA fp32, and
torch's cuDNN default would let convs use TF32: --tf32 allows it); bf16/fp16
are torch.autocast over fp32 weights (our contract too: fp32 masters, the
matmul-class ops in the compute type).  Timing: CUDA events around each rep
after warm-up, median; memory: torch.cuda.max_memory_allocated since a reset
before the timed reps.  Output: BENCH lines as bench_sd's (impl=torch, or
impl=torch_compile with --compile), then a markdown table.

  bench_torch.py [--device cuda|cpu] [--precision fp32,bf16] [--only fwd,train,sample,vae]
                 [--tiny] [--latent L] [--steps N] [--reps N] [--budget S] [--compile] [--tf32]
  bench_torch.py --count          (no torch needed)
"""
import argparse
import math
import os
import sys
import time
import traceback

SD15 = dict(block_out=(320, 640, 1280, 1280), down_attn=(1, 1, 1, 0), up_attn=(0, 1, 1, 1), layers=2, heads=8,
            context=768, groups=32, in_ch=4, latent=64,
            vae_block_out=(128, 256, 512, 512), vae_layers=2, vae_latent=4, vae_out=3)
# libcommon/sd/arch.c's "tiny" preset (the tiny test model)
TINY = dict(SD15, block_out=(32, 64, 64, 64), context=32, latent=16, vae_block_out=(32, 32, 64, 64))
SD15_UNET_PARAMS = 859520964
VAE_SCALE = 0.18215


# ---- counting without torch -------------------------------------------------------------

def count_unet_params(cfg):
    """Parameters of the UNet built below, counted from the same walk."""
    bo, E, D, n = cfg["block_out"], 4 * cfg["block_out"][0], cfg["context"], 0

    def conv(i, o, k):
        return i * o * k * k + o

    def lin(i, o, bias=True):
        return i * o + (o if bias else 0)

    def res(i, o):
        r = 2 * i + conv(i, o, 3) + lin(E, o) + 2 * o + conv(o, o, 3)
        return r + (conv(i, o, 1) if i != o else 0)

    def tr(c):
        t = 2 * c + conv(c, c, 1) + conv(c, c, 1)  # GroupNorm, proj_in, proj_out
        t += 3 * 2 * c  # three LayerNorms
        t += 3 * lin(c, c, False) + lin(c, c)  # self-attention q k v (no bias), out
        t += lin(c, c, False) + 2 * lin(D, c, False) + lin(c, c)  # cross-attention
        t += lin(c, 8 * c) + lin(4 * c, c)  # GEGLU projection, FF out
        return t

    n += lin(bo[0], E) + lin(E, E) + conv(cfg["in_ch"], bo[0], 3)
    ch, skips = bo[0], [bo[0]]
    for i, c in enumerate(bo):
        for _ in range(cfg["layers"]):
            n += res(ch, c) + (tr(c) if cfg["down_attn"][i] else 0)
            ch = c
            skips.append(ch)
        if i < len(bo) - 1:
            n += conv(ch, ch, 3)
            skips.append(ch)
    n += 2 * res(ch, ch) + tr(ch)
    for u, c in enumerate(reversed(bo)):
        for _ in range(cfg["layers"] + 1):
            n += res(ch + skips.pop(), c) + (tr(c) if cfg["up_attn"][u] else 0)
            ch = c
        if u < len(bo) - 1:
            n += conv(ch, ch, 3)
    n += 2 * ch + conv(ch, cfg["in_ch"], 3)
    return n


def unet_macs(cfg, H, W, Tc=77):
    """Multiply-adds of one forward of one sample (bench_sd.c's count)."""
    bo, E, D = cfg["block_out"], 4 * cfg["block_out"][0], cfg["context"]
    hw = H * W
    m = bo[0] * E + E * E + cfg["in_ch"] * bo[0] * 9 * hw

    def res(i, o, hw):
        return i * o * 9 * hw + o * o * 9 * hw + E * o + (i * o * hw if i != o else 0)

    def tr(c, hw):
        return (2 * c * c * hw + 4 * c * c * hw + 2 * hw * hw * c + 2 * c * c * hw + 2 * D * c * Tc
                + 2 * hw * Tc * c + 12 * c * c * hw)

    ch, skips = bo[0], [bo[0]]
    for i, c in enumerate(bo):
        for _ in range(cfg["layers"]):
            m += res(ch, c, hw) + (tr(c, hw) if cfg["down_attn"][i] else 0)
            ch = c
            skips.append(ch)
        if i < len(bo) - 1:
            m += ch * ch * 9 * hw // 4
            hw //= 4
            skips.append(ch)
    m += 2 * res(ch, ch, hw) + tr(ch, hw)
    for u, c in enumerate(reversed(bo)):
        for _ in range(cfg["layers"] + 1):
            m += res(ch + skips.pop(), c, hw) + (tr(c, hw) if cfg["up_attn"][u] else 0)
            ch = c
        if u < len(bo) - 1:
            hw *= 4
            m += ch * ch * 9 * hw
    return m + ch * cfg["in_ch"] * 9 * hw


def vae_decode_macs(cfg, h, w):
    bo, Z = cfg["vae_block_out"], cfg["vae_latent"]
    hw, ch = h * w, bo[-1]
    m = Z * Z * hw + Z * ch * 9 * hw

    def res(i, o, hw):
        return i * o * 9 * hw + o * o * 9 * hw + (i * o * hw if i != o else 0)

    m += 2 * res(ch, ch, hw) + 4 * ch * ch * hw + 2 * hw * hw * ch
    for u, c in enumerate(reversed(bo)):
        for _ in range(cfg["vae_layers"] + 1):
            m += res(ch, c, hw)
            ch = c
        if u < len(bo) - 1:
            hw *= 4
            m += ch * ch * 9 * hw
    return m + ch * cfg["vae_out"] * 9 * hw


# ---- the networks (torch imported only here) ----------------------------------------------

def build_modules(torch):
    nn, F = torch.nn, torch.nn.functional

    def sdpa_math(q, k, v):
        """softmax(q k^T / sqrt(d)) v, for torch < 2.0 (no SDPA; checks the script there, never timed
        against ours: the GPU machine's torch has SDPA)"""
        w = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
        return w.to(v.dtype) @ v

    sdpa = getattr(F, "scaled_dot_product_attention", sdpa_math)

    class ResBlock(nn.Module):
        """ResnetBlock2D: GN+SiLU, conv, + time embedding, GN+SiLU, conv, skip (1x1 when widths differ)."""

        def __init__(self, cin, cout, temb, groups, eps):
            super().__init__()
            self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
            self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
            self.time_emb_proj = nn.Linear(temb, cout) if temb else None
            self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
            self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

        def forward(self, x, temb=None):
            h = self.conv1(F.silu(self.norm1(x)))
            if self.time_emb_proj is not None:
                h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
            h = self.conv2(F.silu(self.norm2(h)))
            return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h

    class Attention(nn.Module):
        def __init__(self, c, ctx_dim, heads):
            super().__init__()
            self.heads = heads
            self.to_q = nn.Linear(c, c, bias=False)
            self.to_k = nn.Linear(ctx_dim, c, bias=False)
            self.to_v = nn.Linear(ctx_dim, c, bias=False)
            self.to_out = nn.Linear(c, c)

        def forward(self, x, ctx=None):
            ctx = x if ctx is None else ctx
            B, T, C = x.shape
            q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
            q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
            o = sdpa(q, k, v)
            return self.to_out(o.transpose(1, 2).reshape(B, T, C))

    class Transformer(nn.Module):
        """Transformer2DModel (SD1: 1x1-conv projections) with one BasicTransformerBlock."""

        def __init__(self, c, ctx_dim, heads, groups):
            super().__init__()
            self.norm = nn.GroupNorm(groups, c, eps=1e-6)
            self.proj_in = nn.Conv2d(c, c, 1)
            self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
            self.attn1 = Attention(c, c, heads)
            self.attn2 = Attention(c, ctx_dim, heads)
            self.ff_proj = nn.Linear(c, 8 * c)  # GEGLU: hidden and gate
            self.ff_out = nn.Linear(4 * c, c)
            self.proj_out = nn.Conv2d(c, c, 1)

        def forward(self, x, ctx):
            B, C, H, W = x.shape
            h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
            h = h + self.attn1(self.norm1(h))
            h = h + self.attn2(self.norm2(h), ctx)
            a, gate = self.ff_proj(self.norm3(h)).chunk(2, dim=-1)
            h = h + self.ff_out(a * F.gelu(gate))
            return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))

    class UNet(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            bo, g, heads, D = cfg["block_out"], cfg["groups"], cfg["heads"], cfg["context"]
            E = 4 * bo[0]
            self.c0 = bo[0]
            self.time1, self.time2 = nn.Linear(bo[0], E), nn.Linear(E, E)
            self.conv_in = nn.Conv2d(cfg["in_ch"], bo[0], 3, padding=1)
            self.down = nn.ModuleList()  # entries: ("res"|"down", module, transformer or None)
            kinds = []
            ch, skips = bo[0], [bo[0]]
            for i, c in enumerate(bo):
                for _ in range(cfg["layers"]):
                    self.down.append(nn.ModuleList([ResBlock(ch, c, E, g, 1e-5),
                                                    Transformer(c, D, heads, g) if cfg["down_attn"][i] else nn.Identity()]))
                    kinds.append(bool(cfg["down_attn"][i]))
                    ch = c
                    skips.append(ch)
                if i < len(bo) - 1:
                    self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                    kinds.append(None)
                    skips.append(ch)
            self.down_kinds = kinds
            self.mid1 = ResBlock(ch, ch, E, g, 1e-5)
            self.mid_attn = Transformer(ch, D, heads, g)
            self.mid2 = ResBlock(ch, ch, E, g, 1e-5)
            self.up = nn.ModuleList()
            kinds = []
            for u, c in enumerate(reversed(bo)):
                for _ in range(cfg["layers"] + 1):
                    self.up.append(nn.ModuleList([ResBlock(ch + skips.pop(), c, E, g, 1e-5),
                                                  Transformer(c, D, heads, g) if cfg["up_attn"][u] else nn.Identity()]))
                    kinds.append(bool(cfg["up_attn"][u]))
                    ch = c
                if u < len(bo) - 1:
                    self.up.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, padding=1)]))
                    kinds.append(None)
            self.up_kinds = kinds
            self.norm_out = nn.GroupNorm(g, ch, eps=1e-5)
            self.conv_out = nn.Conv2d(ch, cfg["in_ch"], 3, padding=1)

        def time_embedding(self, t):
            half = self.c0 // 2
            freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
            arg = t.float()[:, None] * freq[None]
            emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)  # flip_sin_to_cos
            return self.time2(F.silu(self.time1(emb)))

        def forward(self, x, t, ctx):
            temb = self.time_embedding(t)
            h = self.conv_in(x)
            skips = [h]
            for kind, m in zip(self.down_kinds, self.down):
                if kind is None:
                    h = m[0](h)
                else:
                    h = m[0](h, temb)
                    if kind:
                        h = m[1](h, ctx)
                skips.append(h)
            h = self.mid2(self.mid_attn(self.mid1(h, temb), ctx), temb)
            for kind, m in zip(self.up_kinds, self.up):
                if kind is None:
                    h = m[0](F.interpolate(h, scale_factor=2.0, mode="nearest"))
                else:
                    h = m[0](torch.cat([h, skips.pop()], dim=1), temb)
                    if kind:
                        h = m[1](h, ctx)
            return self.conv_out(F.silu(self.norm_out(h)))

    class VAEAttention(nn.Module):
        """The VAE's mid attention: one head over the H*W positions, residual."""

        def __init__(self, c, groups):
            super().__init__()
            self.norm = nn.GroupNorm(groups, c, eps=1e-6)
            self.q, self.k, self.v, self.proj = (nn.Linear(c, c) for _ in range(4))

        def forward(self, x):
            B, C, H, W = x.shape
            h = self.norm(x).flatten(2).transpose(1, 2)
            o = sdpa(self.q(h)[:, None], self.k(h)[:, None], self.v(h)[:, None])[:, 0]
            return x + self.proj(o).transpose(1, 2).reshape(B, C, H, W)

    class VAEDecoder(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            bo, g, Z = cfg["vae_block_out"], cfg["groups"], cfg["vae_latent"]
            ch = bo[-1]
            self.post_quant_conv = nn.Conv2d(Z, Z, 1)
            self.conv_in = nn.Conv2d(Z, ch, 3, padding=1)
            self.mid1 = ResBlock(ch, ch, 0, g, 1e-6)
            self.mid_attn = VAEAttention(ch, g)
            self.mid2 = ResBlock(ch, ch, 0, g, 1e-6)
            self.blocks = nn.ModuleList()
            for u, c in enumerate(reversed(bo)):
                for _ in range(cfg["vae_layers"] + 1):
                    self.blocks.append(ResBlock(ch, c, 0, g, 1e-6))
                    ch = c
                if u < len(bo) - 1:
                    self.blocks.append(nn.Conv2d(ch, ch, 3, padding=1))  # after a nearest 2x
            self.norm_out = nn.GroupNorm(g, ch, eps=1e-6)
            self.conv_out = nn.Conv2d(ch, cfg["vae_out"], 3, padding=1)

        def forward(self, z):
            h = self.conv_in(self.post_quant_conv(z))
            h = self.mid2(self.mid_attn(self.mid1(h)))
            for m in self.blocks:
                h = m(F.interpolate(h, scale_factor=2.0, mode="nearest")) if isinstance(m, nn.Conv2d) else m(h)
            return self.conv_out(F.silu(self.norm_out(h)))

    return UNet, VAEDecoder


def ddim_coefficients(steps):
    """SD1.5's scheduler: scaled-linear betas 0.00085..0.012 over 1000 steps;
    DDIM 'leading' spacing with steps_offset 1; set_alpha_to_one False."""
    n = 1000
    b0, b1 = math.sqrt(0.00085), math.sqrt(0.012)
    acp, p = [], 1.0
    for i in range(n):
        beta = (b0 + (b1 - b0) * i / (n - 1)) ** 2
        p *= 1.0 - beta
        acp.append(p)
    ratio = n // steps
    ts = [i * ratio + 1 for i in reversed(range(steps))]
    out = []
    for t in ts:
        prev = t - ratio
        out.append((t, acp[t], acp[prev] if prev >= 0 else acp[0]))
    return out


# ---- benchmarking --------------------------------------------------------------------------

class Bench:
    def __init__(self, torch, args, impl):
        self.torch, self.args, self.impl = torch, args, impl
        self.cuda = args.device.startswith("cuda")
        self.rows, self.failures = [], 0

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def one(self, fn):
        """Milliseconds of one call, finished on the device."""
        if self.cuda:
            e0, e1 = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1)
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    def peak_reset(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mib(self):
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 1048576.0
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def measure(self, fn, warmup, maxreps, budget):
        last = 0.0
        for _ in range(warmup):
            last = self.one(fn)
        # reps from the budget and the last warm-up call, but at least 5
        # (or maxreps): one rep is no median (the 2026-11-27 third H200
        # call timed PyTorch's training step once, on the heels of its
        # first, AdamW-state-allocating step)
        reps = maxreps
        if warmup and last > 0 and budget > 0:
            reps = max(min(maxreps, 5), min(maxreps, int(budget * 1e3 / last)))
        self.sync()
        self.peak_reset()
        t = sorted(self.one(fn) for _ in range(reps))
        mid = len(t) // 2
        ms = t[mid] if len(t) % 2 else 0.5 * (t[mid - 1] + t[mid])
        return ms, reps, self.peak_mib()

    def report(self, name, prec, ms, gflop, peak, reps, extra=""):
        tflops = gflop / ms
        self.rows.append((name, prec, ms, tflops, peak, reps, extra))
        print("BENCH impl=%s name=%s device=%s precision=%s ms=%.3f tflops=%.4g peak_mib=%.1f reps=%d%s"
              % (self.impl, name, "cuda" if self.cuda else "cpu", prec, ms, tflops, peak, reps,
                 (" " + extra) if extra else ""), flush=True)

    def error(self, name, prec, e):
        msg = ("%s: %s" % (type(e).__name__, e)).replace("\n", " ").replace('"', "'")[:200]
        if os.environ.get("BENCH_TORCH_TRACE"):  # where it failed, on stderr
            traceback.print_exception(type(e), e, e.__traceback__)
        self.rows.append((name, prec, None, None, None, 0, "error"))
        print('BENCH impl=%s name=%s device=%s precision=%s error="%s"'
              % (self.impl, name, "cuda" if self.cuda else "cpu", prec, msg), flush=True)
        self.failures += 1


def on_device(torch, dev, make):
    """make() with its parameters created on dev: inside `with dev` where torch
    has it (2.0 on: 860M parameters drawn on the host would take seconds),
    else made on the host and moved."""
    if hasattr(dev, "__enter__"):
        with dev:
            return make()
    return make().to(dev)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--only", default="fwd,train,sample,vae")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--latent", type=int, default=0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of timed reps per figure")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE (impl=torch_compile)")
    ap.add_argument("--tf32", action="store_true", help="let fp32 convs and matmuls use TF32")
    ap.add_argument("--count", action="store_true", help="check the UNet parameter count (no torch needed)")
    args = ap.parse_args()
    cfg = TINY if args.tiny else SD15
    n = count_unet_params(cfg)
    if args.count:
        ok = args.tiny or n == SD15_UNET_PARAMS
        print("UNet parameters (%s): %d%s" % ("tiny" if args.tiny else "sd15", n,
                                              "" if args.tiny else " (SD1.5: %d) %s" % (SD15_UNET_PARAMS, "ok" if ok else "MISMATCH")))
        print("UNet forward at %dx%d: %.4g GMAC per sample; VAE decode to %dx%d: %.4g GMAC"
              % (cfg["latent"], cfg["latent"], unet_macs(cfg, cfg["latent"], cfg["latent"]) / 1e9,
                 8 * cfg["latent"], 8 * cfg["latent"], vae_decode_macs(cfg, cfg["latent"], cfg["latent"]) / 1e9))
        return 0 if ok else 1
    only = set(args.only.split(","))
    if not only <= {"fwd", "train", "sample", "vae"}:
        ap.error("--only takes fwd, train, sample, vae")
    if args.compile and "train" in only:  # compiling the backward too would take minutes: the eager step is impl=torch
        only.discard("train")
    precs = args.precision.split(",")
    if not set(precs) <= {"fp32", "bf16", "fp16"}:
        ap.error("--precision takes fp32, bf16, fp16")
    L = args.latent or cfg["latent"]

    t_start = time.perf_counter()
    try:
        import torch
    except ImportError as e:  # say so in the format the table reads
        figs = {"fwd": "unet_fwd_b2", "train": "train_step", "sample": "sample_ddim_cfg", "vae": "vae_decode"}
        print("# bench_torch: no PyTorch here (%s)" % e)
        for k in ("fwd", "train", "sample", "vae"):
            for prec in precs if k in only else []:
                print('BENCH impl=%s name=%s device=%s precision=%s error="no torch"'
                      % ("torch_compile" if args.compile else "torch", figs[k], args.device.split(":")[0], prec))
        return 1
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(1)
    dev = torch.device(args.device)
    UNet, VAEDecoder = build_modules(torch)
    impl = "torch_compile" if args.compile else "torch"
    B = Bench(torch, args, impl)
    name = torch.cuda.get_device_name(dev) if B.cuda else "cpu"
    unet = on_device(torch, dev, lambda: UNet(cfg))
    got = sum(p.numel() for p in unet.parameters())
    if got != n or (not args.tiny and got != SD15_UNET_PARAMS):
        print("# bench_torch: WARNING: UNet has %d parameters, expected %d" % (got, n if args.tiny else SD15_UNET_PARAMS))
    print("# bench_torch: %s (random weights, %d UNet parameters), torch %s, %s, latents %dx%d, precision %s, "
          "TF32 %s%s; UNet forward %.1f GMAC per sample; setup %.1f s"
          % ("tiny" if args.tiny else "sd15", got, torch.__version__, name, L, L, args.precision,
             "on" if args.tf32 else "off", ", torch.compile" if args.compile else "",
             unet_macs(cfg, L, L) / 1e9, time.perf_counter() - t_start), flush=True)
    fwd_model = unet
    if args.compile:
        fwd_model = torch.compile(unet)
        print("# bench_torch: torch.compile wrapped (compiles at the first call of each precision)", flush=True)

    def autocast(prec):
        if prec == "fp32":
            return torch.autocast(device_type=dev.type, enabled=False)
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16 if prec == "bf16" else torch.float16)

    Tc, D, C = 77, cfg["context"], cfg["in_ch"]
    unet_gflop = 2 * unet_macs(cfg, L, L, Tc) / 1e9  # one sample
    vae_gflop = 2 * vae_decode_macs(cfg, L, L) / 1e9
    fwd_ms = {}

    # (a) UNet forward, batch 2
    if "fwd" in only:
        x = torch.randn(2, C, L, L, device=dev)
        t = torch.full((2,), 500.0, device=dev)
        ctx = torch.randn(2, Tc, D, device=dev)
        unet.eval()
        for prec in precs:
            try:
                def fwd():
                    with torch.no_grad(), autocast(prec):
                        fwd_model(x, t, ctx)
                ms, reps, pk = B.measure(fwd, 2, args.reps, args.budget)
                fwd_ms[prec] = ms
                B.report("unet_fwd_b2", prec, ms, 2 * unet_gflop, pk, reps)
            except Exception as e:  # one figure's failure must not cost the others
                B.error("unet_fwd_b2", prec, e)
        del x, t, ctx

    # (b) training step: 1 instance + 1 prior row
    if "train" in only:
        unet.train()
        opt = None
        try:
            fused = {"fused": True} if B.cuda else {}  # (torch < 2.0 has no fused=, not needed on the CPU)
            opt = torch.optim.AdamW(unet.parameters(), lr=1e-9, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                                    **fused)
        except Exception as e:
            for prec in precs:
                B.error("train_step", prec, e)
        lat = torch.randn(2, C, L, L, device=dev)
        noise = torch.randn(2, C, L, L, device=dev)
        ctx = torch.randn(2, Tc, D, device=dev)
        acp = ddim_coefficients(50)  # only for sqrt(acp[t]) of two timesteps
        a1, a2 = acp[len(acp) // 4][1], acp[3 * len(acp) // 4][1]
        sa = torch.tensor([math.sqrt(a1), math.sqrt(a2)], device=dev)[:, None, None, None]
        sb = torch.tensor([math.sqrt(1 - a1), math.sqrt(1 - a2)], device=dev)[:, None, None, None]
        ts = torch.tensor([250.0, 750.0], device=dev)
        for prec in precs if opt is not None else []:
            try:
                scaler = torch.amp.GradScaler(dev.type) if prec == "fp16" else None

                def step():
                    noisy = sa * lat + sb * noise
                    with autocast(prec):
                        pred = unet(noisy, ts, ctx)
                    pred = pred.float()
                    loss = F_mse(torch, pred[:1], noise[:1]) + F_mse(torch, pred[1:], noise[1:])
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(opt)
                    else:
                        loss.backward()
                    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                ms, reps, pk = B.measure(step, 3, args.reps, args.budget)
                B.report("train_step", prec, ms, 3 * 2 * unet_gflop, pk, reps)
            except Exception as e:
                B.error("train_step", prec, e)
        unet.eval()
        del opt, lat, noise, ctx
        for p in unet.parameters():
            p.grad = None
        if B.cuda:
            torch.cuda.empty_cache()

    # (c) DDIM + CFG, then the VAE decoder; and the decoder alone
    vae = None
    if "sample" in only or "vae" in only:
        try:
            vae = on_device(torch, dev, lambda: VAEDecoder(cfg)).eval()
        except Exception as e:
            for prec in precs:
                B.error("vae_decode", prec, e)
    vae_model = torch.compile(vae) if (args.compile and vae is not None) else vae
    if "sample" in only and vae is not None:
        ctx2 = torch.randn(2, Tc, D, device=dev)  # [negative, prompt] embeddings
        for prec in precs:
            try:
                def sample(steps):
                    with torch.no_grad(), autocast(prec):
                        g = torch.Generator(device=dev).manual_seed(1)
                        x = torch.randn(1, C, L, L, device=dev, generator=g)
                        for t, a_t, a_prev in ddim_coefficients(steps):
                            tt = torch.full((2,), float(t), device=dev)
                            eps = fwd_model(torch.cat([x, x]), tt, ctx2).float()
                            unc, txt = eps.chunk(2)
                            eps = unc + 7.5 * (txt - unc)
                            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
                            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
                        return vae_model(x / VAE_SCALE).float()
                B.one(lambda: sample(2))  # warm-up
                ms, reps, pk = B.measure(lambda: sample(args.steps), 0, 1, 0)
                B.report("sample_ddim_cfg", prec, ms, args.steps * 2 * unet_gflop + vae_gflop, pk, reps,
                         "steps=%d" % args.steps)
            except Exception as e:
                B.error("sample_ddim_cfg", prec, e)
        del ctx2
    if "vae" in only and vae is not None:
        z = torch.randn(1, cfg["vae_latent"], L, L, device=dev)
        for prec in precs:
            try:
                def dec():
                    with torch.no_grad(), autocast(prec):
                        vae_model(z)
                ms, reps, pk = B.measure(dec, 1, args.reps, args.budget)
                B.report("vae_decode", prec, ms, vae_gflop, pk, reps)
            except Exception as e:
                B.error("vae_decode", prec, e)

    print()
    print("| figure (%s, %s, %s) | precision | ms | TFLOP/s | peak MiB | reps | |" % (impl, "tiny" if args.tiny else "sd15", name))
    print("|---|---|---:|---:|---:|---:|---|")
    for name_, prec, ms, tf, pk, reps, extra in B.rows:
        if ms is None:
            print("| %s | %s | error | | | | |" % (name_, prec))
        else:
            print("| %s | %s | %.2f | %.3g | %.0f | %d | %s |" % (name_, prec, ms, tf, pk, reps, extra))
    print("\n# total %.1f s" % (time.perf_counter() - t_start))
    return 1 if B.failures else 0


def F_mse(torch, a, b):
    return torch.nn.functional.mse_loss(a, b, reduction="mean")


if __name__ == "__main__":
    sys.exit(main())
