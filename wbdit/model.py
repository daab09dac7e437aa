"""WB-DiT and its DiT baseline: the same adaLN-Zero transformer over gene patches.

WhiteBoxDiT mixes tokens with CRATE's subspace attention (MSSA, one shared projection
for Q, K and V) and ISTA sparse coding; DiT with standard multi-head attention and an
MLP. Every fusable op goes through ``wbdit.ops``; ``fused`` only changes which
implementation runs, never the parameters (same ``state_dict`` keys either way).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from wbdit import ops
from wbdit.nvtx import nvtx_range
from wbdit.reference import sincos_pos_embed, unpatchify


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x (1 + scale) + shift``; shift/scale (B, H) broadcast over tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # one pass over x, not two


class FusedModule(nn.Module):
    """A module whose op implementation follows the owning model's ``fused`` flag."""

    fused: bool = False


class MSSA(FusedModule):
    """Multi-head subspace self-attention: ``proj(concat_h softmax(w_h w_h^T / sqrt(d)) w_h)``, w = U x."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.U = nn.Linear(hidden_size, hidden_size, bias=False)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        with nvtx_range("mssa"):
            return self.proj(ops.mssa(self.U(x), self.num_heads, fused=self.fused))


class ISTA(FusedModule):
    """One ISTA step ``relu(x + eta (x D - x D^T D) - eta lambda)`` with dictionary D (H, H).

    The fast paths compute ``relu(x + x B - eta lambda)``, B = eta (D - D^T D). While D is
    constant (no gradient wanted: sampling) B is formed once and kept until D changes.
    """

    def __init__(self, hidden_size: int, eta: float = 0.1, lmbda: float = 0.1):
        super().__init__()
        self.eta, self.lmbda = eta, lmbda
        self.D = nn.Parameter(torch.empty(hidden_size, hidden_size))
        nn.init.kaiming_uniform_(self.D)
        self._constant_B: tuple[tuple, Tensor, Tensor] | None = None  # (key of D, D's storage, B)

    def forward(self, x: Tensor) -> Tensor:
        with nvtx_range("ista"):
            return ops.ista(x, self.D, self.eta, self.lmbda, fused=self.fused, B=self._cached_B())

    def _cached_B(self) -> Tensor | None:
        """``ops.ista_matrix(D, eta)`` while D is constant, formed again only when D changed;
        None (the op forms B itself, differentiably) when D needs a gradient, under torch.compile
        (which traces B into the graph instead) or on the reference path (which has no B)."""
        D = self.D
        if not self.fused or torch.compiler.is_compiling() or (torch.is_grad_enabled() and D.requires_grad):
            self._constant_B = None
            return None
        # In-place writes (optimizer, EMA, load_state_dict) bump _version (writes through D.data
        # do not); .to() and assigning .data move the storage, and holding D's storage keeps its
        # address from being reused. A B formed under inference_mode cannot be saved for backward.
        key = (D.data_ptr(), D._version, D.device, D.dtype, self.eta, torch.is_inference_mode_enabled())
        if self._constant_B is None or self._constant_B[0] != key:
            self._constant_B = (key, D.detach(), ops.ista_matrix(D, self.eta))
        return self._constant_B[2]


class Attention(FusedModule):
    """Standard multi-head self-attention (DiT baseline): qkv Linear(H, 3H) with bias."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        with nvtx_range("attention"):
            return self.proj(ops.attention(self.qkv(x), self.num_heads, fused=self.fused))


class MLP(nn.Sequential):
    """DiT's MLP: Linear(H, 4H) - tanh-GELU - Linear(4H, H)."""

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0):
        inner = int(hidden_size * mlp_ratio)
        super().__init__(nn.Linear(hidden_size, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        with nvtx_range("mlp"):
            return super().forward(x)


class Block(nn.Module):
    """adaLN-Zero block: ``x += g1 * mixer(mod(LN x)); x += g2 * ffn(mod(LN x))``."""

    def __init__(self, hidden_size: int, mixer: nn.Module, ffn: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = mixer
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = ffn
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        # x + gate * branch as one addcmul: one pass over the tokens instead of two, no temporary
        x = torch.addcmul(x, gate1.unsqueeze(1), self.attn(modulate(self.norm1(x), shift1, scale1)))
        return torch.addcmul(x, gate2.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear(H, patch_size) per token."""

    def __init__(self, hidden_size: int, patch_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        with nvtx_range("final_layer"):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.linear(modulate(self.norm(x), shift, scale))


class GeneDiT(nn.Module):
    """Shared trunk: patch + timestep (+ label) embedding, adaLN-Zero blocks, final layer.

    Subclasses define ``_mixer_and_ffn(hidden_size, num_heads)``, the block's two branches.

    forward(x (B, n_genes), t (B,), y (B,) or (B, K) or None) -> prediction (B, n_genes).

    ``num_classes``: None (unconditional), an int (one label column: the table
    Embedding(num_classes + 1, H), row ``num_classes`` the null class), or a list of K ints (K
    label columns, e.g. cell type and donor: one table Embedding(n_k + 1, H) per column, each
    with its own null class n_k). The label embeddings are summed into the conditioning, and
    any column can be set to its null class on its own (``drop_labels``): classifier-free
    guidance per attribute.
    """

    freq_dim = 256

    def __init__(
        self,
        n_genes: int = 2000,
        patch_size: int = 10,
        hidden_size: int = 768,
        depth: int = 3,
        num_heads: int = 8,
        num_classes: int | list[int] | None = None,
        fused: bool = False,
    ):
        super().__init__()
        if n_genes < 1 or patch_size < 1 or depth < 1:
            raise ValueError(f"n_genes, patch_size and depth must be >= 1, got {n_genes}, {patch_size}, {depth}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
        if isinstance(num_classes, (list, tuple)):
            num_classes = [int(n) for n in num_classes]
            if not num_classes or min(num_classes) < 1:
                raise ValueError(f"num_classes must list >= 1 classes per label column, got {num_classes}")
        self.config = dict(
            n_genes=n_genes,
            patch_size=patch_size,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            num_classes=num_classes,
        )
        self.n_genes, self.patch_size, self.num_classes = n_genes, patch_size, num_classes
        self.n_tokens = math.ceil(n_genes / patch_size)
        self.x_embedder = nn.Linear(patch_size, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed(self.n_tokens, hidden_size), persistent=False)
        self.t_embedder = nn.Sequential(
            nn.Linear(self.freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        # Classes per label column. One int keeps its single table (state_dict key y_embedder.weight,
        # as every run before several columns existed); a list gets one table per column.
        self.label_sizes = list(num_classes) if isinstance(num_classes, list) else [num_classes] if num_classes else []
        if isinstance(num_classes, list):
            self.y_embedder = nn.ModuleList(nn.Embedding(n + 1, hidden_size) for n in num_classes)
        else:
            self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList(
            Block(hidden_size, *self._mixer_and_ffn(hidden_size, num_heads)) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size)
        self._init_weights()
        self.fused = fused

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Linear(p, H) has the fans of DiT's Conv1d(1, H, p) flattened: same xavier bound.
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for table in self._label_tables():
            nn.init.normal_(table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _label_tables(self) -> list[nn.Embedding]:
        """One embedding table per label column (none for an unconditional model)."""
        if self.y_embedder is None:
            return []
        return list(self.y_embedder) if isinstance(self.y_embedder, nn.ModuleList) else [self.y_embedder]

    def drop_labels(self, y: Tensor, drop: Tensor) -> Tensor:
        """``y`` (B,) or (B, K) with the entries where ``drop`` (bool, broadcast to y's shape) is
        True set to their column's null class (column k's is ``num_classes[k]``)."""
        null = torch.tensor(self.label_sizes, dtype=y.dtype, device=y.device)
        return torch.where(drop, null, y)

    def embed_labels(self, y: Tensor) -> Tensor:
        """Sum of the label columns' embeddings (B, H) for y (B,) or (B, K) class indices."""
        cols = y.reshape(len(y), -1)
        if cols.shape[1] != len(self.label_sizes):
            raise ValueError(
                f"expected labels for {len(self.label_sizes)} label columns (num_classes="
                f"{self.num_classes}), got y of shape {tuple(y.shape)}"
            )
        tables = self._label_tables()
        if len(tables) == 1:
            return tables[0](cols[:, 0])
        return torch.stack([table(cols[:, k]) for k, table in enumerate(tables)]).sum(0)

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        for m in self.modules():
            if isinstance(m, FusedModule):
                m.fused = self._fused

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.n_genes:
            raise ValueError(f"expected x of shape (B, {self.n_genes}), got {tuple(x.shape)}")
        if (y is None) != (self.y_embedder is None):
            need = "needs labels y" if y is None else "is unconditional but got labels y"
            raise ValueError(f"{type(self).__name__} {need}")
        with nvtx_range("embed"):
            h = ops.patch_embed(x, self.x_embedder.weight, self.x_embedder.bias, self.pos_embed, fused=self.fused)
            t_freq = ops.timestep_embedding(t, self.freq_dim, 10000.0, fused=self.fused)
            c = self.t_embedder(t_freq.to(h.dtype))
            if self.y_embedder is not None:
                c = c + self.embed_labels(y)
        for i, block in enumerate(self.blocks):
            with nvtx_range(f"block {i}"):
                h = block(h, c)
        return unpatchify(self.final_layer(h, c), self.n_genes)


class WhiteBoxDiT(GeneDiT):
    """White-box DiT: MSSA token mixing and an ISTA sparse-coding step in every block."""

    def _mixer_and_ffn(self, hidden_size: int, num_heads: int) -> tuple[nn.Module, nn.Module]:
        return MSSA(hidden_size, num_heads), ISTA(hidden_size)


class DiT(GeneDiT):
    """The DiT baseline: multi-head attention (qkv with bias) and a tanh-GELU MLP (ratio 4)."""

    def _mixer_and_ffn(self, hidden_size: int, num_heads: int) -> tuple[nn.Module, nn.Module]:
        return Attention(hidden_size, num_heads), MLP(hidden_size)


MODELS: dict[str, type[GeneDiT]] = {"wbdit": WhiteBoxDiT, "dit": DiT}

# Model sizes: "seed" is the paper's configuration; "small" is the measured default for
# datasets of thousands of cells on a CPU (benchmarks/QUALITY.md).
PRESETS: dict[str, dict[str, int]] = {
    "seed": dict(patch_size=10, hidden_size=768, depth=3, num_heads=8),
    "small": dict(patch_size=10, hidden_size=128, depth=2, num_heads=4),
}


def build_model(arch: str, **config) -> GeneDiT:
    """Construct ``WhiteBoxDiT`` (arch "wbdit") or ``DiT`` ("dit") from a config dict."""
    if arch not in MODELS:
        raise ValueError(f"unknown model architecture {arch!r}; choose from {sorted(MODELS)}")
    return MODELS[arch](**config)


def arch_name(model: nn.Module) -> str:
    """Inverse of ``build_model``: "wbdit" or "dit"."""
    return next(name for name, cls in MODELS.items() if type(model) is cls)
