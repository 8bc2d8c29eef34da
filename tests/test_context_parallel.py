"""Context parallelism on CPU: head slices of the kernels (reference and Triton), the Ulysses attention over 2
and 4 gloo processes against one process, training with context_parallel_size=2 against one process, and
config errors. Real multi-process torch.distributed, tiny shapes."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import bpe_tokenizer, losses, run_cli, save_tiny_models, train_config, weights, write_toml
from longgen import BlockLayout, BlockSparse, Full, SinkWindow, sparse_attention
from longgen.train import load_config
from longgen.train.context_parallel import check_context_parallel, kv_head_split, shard_batch
from longgen.train.loss import shift_labels

LAYOUT = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
EYE = torch.eye(4, dtype=torch.bool)
PER_HEAD_LAYOUT = torch.stack([LAYOUT, EYE | LAYOUT.tril(-2), EYE, torch.ones(4, 4, dtype=torch.bool).tril()])


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------
# kernels: a slice of the KV heads with kv_head_offset equals the slice of the all-heads result
SLICED = [BlockSparse(16, 1, 3, dense_kv_heads=1), BlockSparse(16, 1, None, 1), BlockLayout(PER_HEAD_LAYOUT, 16)]


@pytest.mark.parametrize(
    "backend,pattern,packed",
    [("reference", p, packed) for p in SLICED for packed in (False, True)]
    + [("triton", SLICED[0], False), ("triton", SLICED[2], True)],  # the interpreter is slow: two cases
    ids=repr,
)
def test_head_slice_equals_slice_of_all_heads(backend, pattern, packed):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU interpreter test")
    H, hkv, T = 8, 4, 45
    shape = (T, H, 16) if packed else (1, T, H, 16)
    kv_shape = (*shape[:-2], hkv, 16)
    q, k, v, dout = rand(shape, 0), rand(kv_shape, 1), rand(kv_shape, 2), rand(shape, 3)
    kw = {"cu_seqlens": torch.tensor([0, 20, T], dtype=torch.int32)} if packed else {}

    def run(offset, n):
        hs, gs = slice(offset * 2, (offset + n) * 2), slice(offset, offset + n)
        qq, kk, vv = (x[..., s, :].clone().requires_grad_() for x, s in ((q, hs), (k, gs), (v, gs)))
        heads = {"kv_head_offset": offset, "num_kv_heads_total": hkv}
        out = sparse_attention(qq, kk, vv, pattern, backend=backend, **heads, **kw)
        (out * dout[..., hs, :]).sum().backward()
        return out, qq.grad, kk.grad, vv.grad

    full = run(0, hkv)
    for offset, n in ((1, 2), (3, 1)):  # the last KV head is BlockSparse's dense one
        part = run(offset, n)
        hs, gs = slice(offset * 2, (offset + n) * 2), slice(offset, offset + n)
        for name, a, b, s in zip(("out", "dq", "dk", "dv"), part, full, (hs, hs, gs, gs), strict=True):
            torch.testing.assert_close(a, b[..., s, :], rtol=1e-5, atol=1e-6, msg=f"{name} at offset {offset}")


def test_head_slice_errors():
    q, k = rand((1, 16, 4, 16), 0), rand((1, 16, 2, 16), 1)
    with pytest.raises(ValueError, match="kv_head_offset=3 with 2 local KV heads"):
        sparse_attention(q, k, k, Full(), kv_head_offset=3, num_kv_heads_total=4)
    with pytest.raises(ValueError, match="num_kv_heads_total=1"):
        sparse_attention(q, k, k, Full(), num_kv_heads_total=1)
    with pytest.raises(TypeError, match="kv_head_offset must be an int"):
        sparse_attention(q, k, k, Full(), kv_head_offset=1.0, num_kv_heads_total=4)
    with pytest.raises(ValueError, match="dense_kv_heads=5 exceeds the number of KV heads \\(4\\)"):
        sparse_attention(q, k, k, BlockSparse(16, 1, None, 5), kv_head_offset=2, num_kv_heads_total=4)


# ------------------------------------------------------------------------------------------------------------
# how ranks share heads, and how a batch is cut
def test_kv_head_split_rules():
    assert kv_head_split(32, 8, 4) == (1, 2)
    assert kv_head_split(8, 2, 4) == (2, 1)  # KV heads fewer than ranks: each replicated to 2 ranks
    assert kv_head_split(4, 1, 2) == (2, 1)
    with pytest.raises(ValueError, match="must divide the number of attention heads \\(6\\)"):
        kv_head_split(6, 6, 4)
    with pytest.raises(ValueError, match="must divide the number of KV heads \\(6\\) or be a multiple of it"):
        kv_head_split(12, 6, 4)


def test_shard_batch_keeps_the_target_at_shard_boundaries():
    ids = torch.arange(24).view(2, 12)
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    labels = ids.clone()
    labels[:, 5] = -100  # a document start
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels}
    shards = [shard_batch(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards], 1), ids)
    assert torch.equal(torch.cat([s["position_ids"] for s in shards], 1), pos)
    targets = torch.cat([s["targets"] for s in shards], 1)
    assert torch.equal(targets, shift_labels(labels))
    assert shards[0]["targets"][0, -1] == 4 and targets[0, -1] == -100  # shard 0's last token predicts token 4
    assert all(torch.equal(s["full_position_ids"], pos) for s in shards)
    with pytest.raises(ValueError, match="not divisible"):
        shard_batch(batch, 0, 5)


# ------------------------------------------------------------------------------------------------------------
# the Ulysses attention over real gloo processes
CASES = [  # pattern, heads, KV heads
    (Full(), 8, 4),
    (SinkWindow(2, 9), 8, 2),
    (BlockSparse(16, 1, None, dense_kv_heads=1), 8, 4),
    (BlockSparse(16, 1, 3, dense_kv_heads=1), 8, 2),
    (BlockLayout(PER_HEAD_LAYOUT, 16), 8, 4),
    (BlockSparse(16, 2, None), 4, 1),
]


def _attention_worker(rank, world, cp_size, init):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        from longgen.model.attention import _attend_prefill
        from longgen.train.context_parallel import setup_context_parallel, ulysses_attention

        cp = setup_context_parallel(cp_size, "cpu")
        assert (cp.dp_rank, cp.rank) == divmod(rank, cp_size)
        B, T, d = 2, 64, 8
        n = T // cp_size
        mine = slice(cp.rank * n, (cp.rank + 1) * n)
        packed = torch.cat([torch.arange(21), torch.arange(3), torch.arange(40)])[None].expand(B, T)
        for i, (pattern, H, hkv) in enumerate(CASES):
            for position_ids in (None, packed):
                q, k, v = rand((B, T, H, d), i), rand((B, T, hkv, d), i + 10), rand((B, T, hkv, d), i + 20)
                dout = rand((B, T, H, d), i + 30)
                full = [x.clone().requires_grad_() for x in (q, k, v)]
                ref = _attend_prefill(*full, pattern, None, position_ids, None)
                (ref * dout).sum().backward()
                shard = [x[:, mine].clone().requires_grad_() for x in (q, k, v)]
                out = ulysses_attention(*shard, pattern, cp.group, position_ids=position_ids)
                (out * dout[:, mine]).sum().backward()
                where = f"{pattern} H={H} Hkv={hkv} packed={position_ids is not None} cp rank {cp.rank}/{cp_size}"
                torch.testing.assert_close(out, ref[:, mine], rtol=1e-5, atol=1e-6, msg=f"out {where}")
                for name, a, b in zip(("dq", "dk", "dv"), shard, full, strict=True):
                    torch.testing.assert_close(a.grad, b.grad[:, mine], rtol=1e-5, atol=1e-5, msg=f"{name} {where}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,cp_size", [(2, 2), (4, 4), (4, 2)], ids=["cp2", "cp4", "dp2xcp2"])
def test_ulysses_attention_equals_one_process(world, cp_size, tmp_path):
    """Full, SinkWindow, BlockSparse with a dense head, per-head BlockLayout; GQA with KV heads fewer than ranks
    and MQA; one sequence per row and packed documents: outputs and dq, dk, dv equal the single-process ones."""
    # forked workers start in a moment: they inherit this process's imports (torch, transformers, longgen)
    args = (world, cp_size, f"file://{tmp_path / 'init'}")
    mp.start_processes(_attention_worker, args=args, nprocs=world, start_method="fork")


# ------------------------------------------------------------------------------------------------------------
# training
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A corpus, a BPE tokenizer and a tiny hybrid with BlockSparse layers (a dense KV head) and a full layer."""
    root = tmp_path_factory.mktemp("cp")
    corpus = root / "corpus"
    shutil.copytree(Path(json.__file__).parent, corpus, ignore=shutil.ignore_patterns("__pycache__"))
    tokenizer = bpe_tokenizer([p.read_text() for p in sorted(corpus.rglob("*.py"))])
    save_tiny_models(root, tokenizer, max_len=128, pattern=BlockSparse(16, 2, None, dense_kv_heads=1))
    return root


@pytest.mark.slow
def test_context_parallel_training_equals_one_process(workspace, tmp_path):
    """3 steps: one process (batch 2) == cp=2 on 2 processes == dp=2 x cp=2 on 4 processes: losses and weights.
    The context-parallel runs checkpoint activations, so attention (and its all-to-all) is recomputed in backward."""
    cp2 = {"train__context_parallel_size": 2, "model__activation_checkpointing": True}
    runs = {"one": ({}, None), "cp2": (cp2, 2), "dp2cp2": ({**cp2, "train__batch_size": 1}, 4)}
    for name, (over, nproc) in runs.items():
        raw = train_config(workspace, tmp_path / name, train__steps=3, train__save_every=3, **over)
        path = write_toml(tmp_path / f"{name}.toml", raw)
        r = run_cli([str(path)], nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    ref, ref_w = torch.tensor(losses(tmp_path / "one")), weights(tmp_path / "one")
    for name in ("cp2", "dp2cp2"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / name)), ref, rtol=1e-4, atol=1e-5)
        w = weights(tmp_path / name)
        assert w.keys() == ref_w.keys()
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "world,override,match",
    [
        (1, "train.context_parallel_size=0", "context_parallel_size must be >= 1"),
        (1, "train.context_parallel_size=2", r"must divide the number of processes \(1\)"),
        (6, "train.context_parallel_size=3", r"must divide the number of attention heads \(4\)"),
        (4, "data.seq_len=126", r"must divide the sequence length \(data.seq_len=126\)"),
    ],
)
def test_bad_context_parallel_config_is_a_clear_error(workspace, tmp_path, monkeypatch, world, override, match):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    raw = train_config(workspace, tmp_path / "bad", train__context_parallel_size=4)
    with pytest.raises(ValueError, match=match):
        load_config(raw=raw, overrides=[override])
    assert not (tmp_path / "bad").exists()


def test_attention_hook_is_installed_only_inside_the_block():
    from longgen.model import attention
    from longgen.train.context_parallel import context_parallel_attention, setup_context_parallel

    assert setup_context_parallel(1).size == 1
    with pytest.raises(ValueError, match=r"must divide the number of processes \(1\)"):
        setup_context_parallel(2)
    with context_parallel_attention(None):
        assert attention.CONTEXT_PARALLEL is None
    with context_parallel_attention(object()):
        hook = attention.CONTEXT_PARALLEL
        q = torch.zeros(1, 4, 2, 16)
        with pytest.raises(ValueError, match="not padding masks"):
            hook(q, q, q, Full(), torch.tensor([[True, True, False, False]]), None)
    assert attention.CONTEXT_PARALLEL is None


def test_check_context_parallel_names_what_is_wrong():
    check_context_parallel(4, world_size=8, num_heads=32, num_kv_heads=8, seq_len=131072)
    with pytest.raises(ValueError, match="must be an int >= 1"):
        check_context_parallel(True, world_size=2)
    with pytest.raises(ValueError, match=r"number of KV heads \(3\)"):
        check_context_parallel(2, world_size=2, num_heads=6, num_kv_heads=3)
