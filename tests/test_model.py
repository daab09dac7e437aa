"""WhiteBoxDiT and DiT against the formulas of DESIGN.md, restated here independently.

Nothing in this file calls ``wbdit.reference`` to compute an expected value: every
expected value is an explicit einsum/numpy statement of the DESIGN.md formula.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wbdit import ops, reference
from wbdit.model import DiT, WhiteBoxDiT, arch_name, build_model

ARCHS = [WhiteBoxDiT, DiT]
TINY = dict(hidden_size=32, depth=1, num_heads=2)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter (zero-init ones included) with fresh non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(model, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.n_genes, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g) if model.num_classes else None
    return x, t, y


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- formula restatements (float64)


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """DiT/MAE 1-D position embedding: [sin(n w_i), cos(n w_i)], w_i = 10000^(-i / (dim/2))."""
    pe = np.zeros((n, dim))
    for pos in range(n):
        for i in range(dim // 2):
            w = 10000.0 ** (-i / (dim / 2))
            pe[pos, i] = math.sin(pos * w)
            pe[pos, dim // 2 + i] = math.cos(pos * w)
    return torch.from_numpy(pe)


def t_embed_formula(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)], f_k = exp(-ln(10000) k / (dim/2)), k = 0..dim/2-1 (float64 numpy)."""
    half = dim // 2
    tt = t.double().numpy()[:, None]
    f = np.exp(-np.log(10000.0) * np.arange(half) / half)[None]
    return torch.from_numpy(np.concatenate([np.cos(tt * f), np.sin(tt * f)], axis=1))


def layernorm(x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6)


def linear(x, W, b=None):
    out = torch.einsum("...i,oi->...o", x, W)
    return out if b is None else out + b


def mssa_formula(x, U, Wo, bo, heads):
    """w = U x; per head softmax(w w^T d^-1/2) w; concat; output Linear."""
    B, N, H = x.shape
    d = H // heads
    w = linear(x, U).reshape(B, N, heads, d)
    s = torch.einsum("bnhd,bmhd->bhnm", w, w) / math.sqrt(d)
    a = torch.exp(s - s.amax(-1, keepdim=True))
    a = a / a.sum(-1, keepdim=True)
    o = torch.einsum("bhnm,bmhd->bnhd", a, w).reshape(B, N, H)
    return linear(o, Wo, bo)


def ista_formula(x, D, eta=0.1, lmbda=0.1):
    """relu(x + eta (x D - x D^T D) - eta lambda), x as row vectors."""
    xD = torch.einsum("...i,ij->...j", x, D)
    xDtD = torch.einsum("...i,ji,jk->...k", x, D, D)
    return torch.clamp(x + eta * (xD - xDtD) - eta * lmbda, min=0)


def attention_formula(x, Wqkv, bqkv, Wo, bo, heads):
    """q, k, v = split(Linear(H, 3H)); per head softmax(q k^T d^-1/2) v; concat; output Linear."""
    B, N, H = x.shape
    d = H // heads
    qkv = linear(x, Wqkv, bqkv)
    q, k, v = (qkv[..., i * H : (i + 1) * H].reshape(B, N, heads, d) for i in range(3))
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d)
    a = torch.softmax(s, dim=-1)
    return linear(torch.einsum("bhnm,bmhd->bnhd", a, v).reshape(B, N, H), Wo, bo)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def forward_formula(model, x, t, y):
    """The whole network of DESIGN.md in float64, from the model's parameters by name."""
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    B, G = x.shape
    p, H = model.patch_size, P["x_embedder.weight"].shape[0]
    N = math.ceil(G / p)
    heads = model.config["num_heads"]
    xp = torch.cat([x.double(), torch.zeros(B, N * p - G, dtype=torch.float64)], 1).reshape(B, N, p)
    h = linear(xp, P["x_embedder.weight"], P["x_embedder.bias"]) + sincos_1d(N, H)
    temb = t_embed_formula(t)
    c = linear(
        F.silu(linear(temb, P["t_embedder.0.weight"], P["t_embedder.0.bias"])),
        P["t_embedder.2.weight"],
        P["t_embedder.2.bias"],
    )
    if y is not None:
        c = c + P["y_embedder.weight"][y]

    def mod(z, shift, scale):
        return z * (1 + scale[:, None]) + shift[:, None]

    for i in range(model.config["depth"]):
        q = f"blocks.{i}."
        m = linear(F.silu(c), P[q + "adaLN_modulation.1.weight"], P[q + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = m.chunk(6, dim=1)
        a = mod(layernorm(h), sh1, sc1)
        if isinstance(model, WhiteBoxDiT):
            mix = mssa_formula(a, P[q + "attn.U.weight"], P[q + "attn.proj.weight"], P[q + "attn.proj.bias"], heads)
        else:
            mix = attention_formula(
                a,
                P[q + "attn.qkv.weight"],
                P[q + "attn.qkv.bias"],
                P[q + "attn.proj.weight"],
                P[q + "attn.proj.bias"],
                heads,
            )
        h = h + g1[:, None] * mix
        b = mod(layernorm(h), sh2, sc2)
        if isinstance(model, WhiteBoxDiT):
            ffn = ista_formula(b, P[q + "mlp.D"])
        else:
            ffn = linear(
                gelu_tanh(linear(b, P[q + "mlp.0.weight"], P[q + "mlp.0.bias"])),
                P[q + "mlp.2.weight"],
                P[q + "mlp.2.bias"],
            )
        h = h + g2[:, None] * ffn
    shift, scale = linear(
        F.silu(c), P["final_layer.adaLN_modulation.1.weight"], P["final_layer.adaLN_modulation.1.bias"]
    ).chunk(2, dim=1)
    out = linear(mod(layernorm(h), shift, scale), P["final_layer.linear.weight"], P["final_layer.linear.bias"])
    return out.reshape(B, N * p)[:, :G]


# ---------------------------------------------------------------- shapes, keys, init


@pytest.mark.parametrize("cls", ARCHS)
@pytest.mark.parametrize("n_genes,patch_size", [(40, 10), (37, 10), (5, 10), (1, 3), (13, 1)])
@pytest.mark.parametrize("num_classes", [None, 4])
def test_shapes_any_gene_count(cls, n_genes, patch_size, num_classes):
    model = randomize(cls(n_genes=n_genes, patch_size=patch_size, num_classes=num_classes, **TINY))
    assert model.n_tokens == math.ceil(n_genes / patch_size)
    x, t, y = inputs(model, batch=3)
    x.requires_grad_(True)
    out = model(x, t, y)
    assert out.shape == (3, n_genes) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    out.square().sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("cls", ARCHS)
def test_forward_validates_inputs(cls):
    cond = cls(n_genes=20, patch_size=10, num_classes=3, **TINY)
    uncond = cls(n_genes=20, patch_size=10, **TINY)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="needs labels"):
        cond(torch.randn(2, 20), t)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(torch.randn(2, 20), t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 20\)"):
        uncond(torch.randn(2, 21), t)
    with pytest.raises(ValueError, match="heads"):
        cls(n_genes=20, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="n_genes"):
        cls(n_genes=0, **TINY)


def test_defaults_are_the_seed_configuration():
    model = WhiteBoxDiT()
    assert model.config == dict(n_genes=2000, patch_size=10, hidden_size=768, depth=3, num_heads=8, num_classes=None)
    assert model.n_tokens == 200 and model.fused is False
    blk = model.blocks[0]
    assert blk.attn.U.bias is None and blk.attn.U.weight.shape == (768, 768)  # one shared projection
    assert blk.mlp.D.shape == (768, 768) and (blk.mlp.eta, blk.mlp.lmbda) == (0.1, 0.1)
    dit = DiT(n_genes=2000)
    assert dit.blocks[0].attn.qkv.weight.shape == (3 * 768, 768) and dit.blocks[0].attn.qkv.bias is not None
    assert dit.blocks[0].mlp[0].out_features == 4 * 768
    assert model.t_embedder[0].in_features == 256


@pytest.mark.parametrize("cls", ARCHS)
def test_same_state_dict_keys_whatever_fused(cls):
    a = cls(n_genes=25, patch_size=10, num_classes=3, fused=False, **TINY)
    b = cls(n_genes=25, patch_size=10, num_classes=3, fused=True, **TINY)
    assert list(a.state_dict()) == list(b.state_dict())
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())  # strict
    assert "pos_embed" not in a.state_dict() and "pos_embed" not in dict(a.named_parameters())
    assert all(m.fused for m in b.modules() if hasattr(m, "fused"))
    b.fused = False
    assert not any(m.fused for m in b.modules() if hasattr(m, "fused"))


@pytest.mark.parametrize("cls", ARCHS)
@pytest.mark.parametrize("num_classes", [None, 5])
def test_zero_init_predicts_exact_zeros(cls, num_classes):
    torch.manual_seed(0)
    model = cls(n_genes=33, patch_size=4, num_classes=num_classes, **TINY)
    x, t, y = inputs(model, batch=4)
    out = model(x * 10, t, y)
    assert torch.equal(out, torch.zeros_like(out))
    # ...but the trunk is not degenerate: weights that DiT does not zero are non-zero.
    assert model.x_embedder.weight.abs().sum() > 0 and model.t_embedder[0].weight.std().item() == pytest.approx(
        0.02, rel=0.2
    )
    for blk in model.blocks:
        assert not blk.adaLN_modulation[-1].weight.any() and not blk.adaLN_modulation[-1].bias.any()


def test_build_model_and_arch_name():
    assert arch_name(build_model("wbdit", n_genes=10, **TINY)) == "wbdit"
    assert arch_name(build_model("dit", n_genes=10, **TINY)) == "dit"
    with pytest.raises(ValueError, match="unknown model architecture 'crate'"):
        build_model("crate", n_genes=10)


# ---------------------------------------------------------------- the formulas


@pytest.mark.parametrize("cls", ARCHS)
@pytest.mark.parametrize("n_genes,patch_size,num_classes", [(37, 10, 3), (12, 1, None)])
def test_whole_network_equals_design_formulas(cls, n_genes, patch_size, num_classes):
    model = randomize(
        cls(n_genes=n_genes, patch_size=patch_size, num_classes=num_classes, hidden_size=32, depth=2, num_heads=4),
        seed=3,
        std=0.1,
    )
    x, t, y = inputs(model, batch=4, seed=5)
    got = model(x, t, y)
    want = forward_formula(model, x, t, y)
    assert want.abs().max() > 0.1  # non-trivial values
    close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_mssa_module_equals_formula():
    torch.manual_seed(0)
    blk = randomize(WhiteBoxDiT(n_genes=40, **TINY)).blocks[0]
    x = torch.randn(3, 6, 32)
    want = mssa_formula(
        x.double(), blk.attn.U.weight.double(), blk.attn.proj.weight.double(), blk.attn.proj.bias.double(), heads=2
    )
    close(blk.attn(x), want)
    # Q = K = V: the module has one projection, not three.
    assert [n for n, _ in blk.attn.named_parameters()] == ["U.weight", "proj.weight", "proj.bias"]


def test_ista_module_equals_formula():
    torch.manual_seed(0)
    ista = WhiteBoxDiT(n_genes=40, **TINY).blocks[0].mlp  # kaiming-uniform D as initialised
    bound = math.sqrt(6 / 32)  # kaiming_uniform_(a=0): gain sqrt(2), bound gain * sqrt(3 / fan_in)
    assert ista.D.abs().max() <= bound and ista.D.abs().max() > 0.8 * bound
    x = torch.randn(2, 5, 32)
    out = ista(x)
    close(out, ista_formula(x.double(), ista.D.detach().double()))
    assert (out == 0).any() and (out > 0).any()  # the relu is active on both sides


def test_dit_attention_module_equals_formula():
    torch.manual_seed(0)
    attn = randomize(DiT(n_genes=40, **TINY)).blocks[0].attn
    x = torch.randn(3, 6, 32)
    want = attention_formula(
        x.double(),
        attn.qkv.weight.double(),
        attn.qkv.bias.double(),
        attn.proj.weight.double(),
        attn.proj.bias.double(),
        heads=2,
    )
    close(attn(x), want)


@pytest.mark.parametrize("n_genes,p", [(40, 10), (37, 10), (7, 1), (3, 5)])
def test_patch_embed_equals_conv1d_on_padded_vector(n_genes, p):
    g = torch.Generator().manual_seed(0)
    H, B = 16, 3
    N = math.ceil(n_genes / p)
    x = torch.randn(B, n_genes, generator=g)
    W, b, pos = torch.randn(H, p, generator=g), torch.randn(H, generator=g), torch.randn(N, H, generator=g)
    padded = F.pad(x, (0, N * p - n_genes))[:, None, :]  # (B, 1, N p)
    conv = torch.nn.Conv1d(1, H, kernel_size=p, stride=p)
    with torch.no_grad():
        conv.weight.copy_(W[:, None, :])
        conv.bias.copy_(b)
    want = conv(padded).detach().transpose(1, 2) + pos
    close(reference.patch_embed(x, W, b, pos), want)
    close(ops.patch_embed(x, W, b, pos), want)


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 17, 500, 999])
    got = ops.timestep_embedding(t, 256)
    assert got.shape == (5, 256) and got.dtype == torch.float32
    close(got, t_embed_formula(t), rtol=1e-5, atol=1e-4)  # fp32 sin/cos of arguments up to 999
    close(ops.timestep_embedding(t.float(), 256), got)
    with pytest.raises(ValueError, match="even"):
        ops.timestep_embedding(t, 255)


def test_position_embedding_formula():
    close(reference.sincos_pos_embed(9, 16), sincos_1d(9, 16), atol=1e-6)
    assert torch.equal(WhiteBoxDiT(n_genes=37, patch_size=10, **TINY).pos_embed, reference.sincos_pos_embed(4, 32))


# ---------------------------------------------------------------- ops dispatch


def _mssa_args():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(2, 9, 4 * 8, generator=g), 4)


def _ista_args():
    g = torch.Generator().manual_seed(12)
    return (torch.randn(2, 9, 24, generator=g), torch.randn(24, 24, generator=g) * 0.2, 0.1, 0.1)


def _attention_args():
    g = torch.Generator().manual_seed(13)
    return (torch.randn(2, 9, 3 * 32, generator=g), 4)


def test_unfused_runs_reference():
    ops.mssa(*_mssa_args(), fused=False)
    ops.ista(*_ista_args(), fused=False)
    ops.attention(*_attention_args(), fused=False)
    rep = ops.report()
    assert rep["mssa"] == rep["ista"] == rep["attention"] == "reference"


@pytest.mark.parametrize(
    "op,args,name",
    [
        ("mssa", _mssa_args, "cpu-sdpa"),
        ("ista", _ista_args, "cpu-1gemm"),
        ("attention", _attention_args, "sdpa"),
    ],
)
def test_cpu_fast_paths_equal_reference_fwd_bwd(monkeypatch, op, args, name):
    ops.available()  # load the real backends under the test-wide TRITON_INTERPRET, before changing it
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(ops.STRICT_ENV, raising=False)
    a_fast = [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args()]
    a_ref = [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fast path exists: no fallback warning
        fast = getattr(ops, op)(*a_fast, fused=True)
    assert ops.report()[op] == name
    ref = getattr(ops, op)(*a_ref, fused=False)
    assert ops.report()[op] == "reference"
    close(fast, ref)
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    (fast * gout).sum().backward()
    (ref * gout).sum().backward()
    for af, ar in zip(a_fast, a_ref):
        if isinstance(af, torch.Tensor):
            assert af.grad.abs().sum() > 0
            close(af.grad, ar.grad, rtol=1e-5, atol=1e-5)


@pytest.fixture
def builtin_cpu_ops_only(monkeypatch):
    """The dispatch table as it is with no optional backend: only ops.py's own CPU paths."""
    table = {op: [i for i in impls if i.name in ("cpu-sdpa", "cpu-1gemm", "sdpa")] for op, impls in ops._IMPLS.items()}
    monkeypatch.setattr(ops, "_IMPLS", table)
    monkeypatch.setattr(ops, "_backends_loaded", True)
    monkeypatch.setattr(ops, "_UNAVAILABLE", {"extension": "ImportError: simulated for the test"})
    monkeypatch.setattr(ops, "_WARNED", set())
    monkeypatch.setattr(ops, "_LAST", {})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(ops.STRICT_ENV, raising=False)
    return table


def _patch_args():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 25, generator=g),
        torch.randn(8, 10, generator=g),
        torch.randn(8, generator=g),
        torch.randn(3, 8, generator=g),
    )


def test_missing_fast_impl_warns_once_and_runs_reference(builtin_cpu_ops_only):
    assert builtin_cpu_ops_only["patch_embed"] == []
    want = reference.patch_embed(*_patch_args())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = ops.patch_embed(*_patch_args(), fused=True)
        out2 = ops.patch_embed(*_patch_args(), fused=True)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "patch_embed" in msgs[0] and "simulated for the test" in msgs[0]
    assert ops.report()["patch_embed"] == "reference (fallback)"
    assert torch.equal(out1, want) and torch.equal(out2, want)


def test_missing_fast_impl_raises_when_strict(builtin_cpu_ops_only, monkeypatch):
    monkeypatch.setenv(ops.STRICT_ENV, "1")
    with pytest.raises(RuntimeError, match=r"patch_embed.*WBDIT_STRICT_FUSED=1"):
        ops.patch_embed(*_patch_args(), fused=True)
    with pytest.raises(RuntimeError, match="timestep_embedding"):
        ops.timestep_embedding(torch.arange(3), 256, 10000.0, fused=True)
    # The ops that have a CPU fast path still run under strict mode.
    ops.mssa(*_mssa_args(), fused=True)
    assert ops.report()["mssa"] == "cpu-sdpa"
    # And fused=False is never affected.
    ops.patch_embed(*_patch_args(), fused=False)
    assert ops.report()["patch_embed"] == "reference"


@pytest.mark.parametrize("cls", ARCHS)
def test_fused_model_equals_reference_model_fwd_bwd(builtin_cpu_ops_only, cls):
    ref = randomize(cls(n_genes=37, patch_size=10, num_classes=3, hidden_size=32, depth=2, num_heads=4), seed=7)
    fast = cls(n_genes=37, patch_size=10, num_classes=3, hidden_size=32, depth=2, num_heads=4, fused=True)
    fast.load_state_dict(ref.state_dict())
    x, t, y = inputs(ref, batch=4)
    with pytest.warns(RuntimeWarning, match="no fast implementation"):  # patch/timestep embedding fall back
        out_fast = fast(x, t, y)
    rep = ops.report()
    out_ref = ref(x, t, y)
    assert rep["mssa" if cls is WhiteBoxDiT else "attention"] in ("cpu-sdpa", "sdpa")
    if cls is WhiteBoxDiT:
        assert rep["ista"] == "cpu-1gemm"
    close(out_fast, out_ref)
    out_fast.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, pf), pr in zip(fast.named_parameters(), ref.parameters()):
        assert pf.grad is not None, name
        close(pf.grad, pr.grad, rtol=1e-4, atol=1e-5 * (pr.grad.abs().max().item() + 1e-3))
