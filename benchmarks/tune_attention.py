"""Sweep tile configurations of the Triton attention kernels at one size (GPU; a tuning aid, not a target check).

    PYTHONPATH=src python benchmarks/tune_attention.py [--seq-len 32768] [--kv-heads 32 8]

Prints forward and backward (dq + dkdv) median ms per config and pattern, next to SDPA causal.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import longgen
from longgen.kernels import triton_attention as ta

T_ = ta.Tiles
CONFIGS = [
    {"fwd": T_(128, 64, 8, 3), "dq": T_(128, 32, 4, 3), "dkdv": T_(32, 64, 4, 3)},
    {"fwd": T_(128, 64, 8, 4), "dq": T_(128, 32, 4, 4), "dkdv": T_(32, 128, 4, 3)},
    {"fwd": T_(128, 64, 8, 3), "dq": T_(128, 64, 8, 3), "dkdv": T_(64, 128, 8, 3)},
    {"fwd": T_(128, 32, 4, 3), "dq": T_(64, 32, 4, 3), "dkdv": T_(32, 128, 8, 2)},
]


def _fmt(cfg) -> str:
    return " ".join(f"{k}={t.block_m}x{t.block_n}/w{t.num_warps}s{t.num_stages}" for k, t in cfg.items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    args = ap.parse_args()
    for hkv in args.kv_heads:
        sweep(args.seq_len, hkv)


def sweep(T: int, hkv: int, H: int = 32, d: int = 128) -> None:
    q = torch.randn(1, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, T, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, T, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    sd = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=hkv != H)  # noqa: E731
    sdpa_f = do_bench(sd, return_mode="median")
    sdpa_fb = do_bench(lambda: sd().backward(do.transpose(1, 2)), grad_to_none=[qt, kt, vt], return_mode="median")
    print(f"T={T} kv={hkv}: SDPA fwd {sdpa_f:.2f} fwd+bwd {sdpa_fb:.2f}", flush=True)
    pats = [longgen.Full(), longgen.SinkWindow(64, 2048), longgen.BlockSparse(64, 16, hkv)]
    for cfg, p in itertools.product(CONFIGS, pats):
        ta._tile_config = lambda *a, cfg=cfg: cfg
        try:
            f = lambda p=p: longgen.sparse_attention(q, k, v, p, backend="triton")  # noqa: E731
            ms_f = do_bench(f, return_mode="median")
            ms_fb = do_bench(lambda f=f: f().backward(do), grad_to_none=[q, k, v], return_mode="median")
            print(f"  {_fmt(cfg):<46} {p!r:<70} fwd {ms_f:8.2f}  fwd+bwd {ms_fb:8.2f}", flush=True)
        except Exception as e:  # a config can exceed shared memory; report and go on
            print(f"  {_fmt(cfg):<46} {p!r:<70} failed: {type(e).__name__}: {str(e)[:100]}", flush=True)


if __name__ == "__main__":
    main()
