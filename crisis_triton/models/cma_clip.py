"""The cma_clip head: CLIP token sequences -> sequence-wise attention -> modality-wise attention.

For one task (one head per task, all on the same frozen encoder pass):

1. Sequence-wise attention: the image tokens [B, Ni, Di] and the text tokens [B, Nt, Dt] are each
   projected to ``dim``, a learned modality-type embedding is added, the two sequences are
   concatenated and run through ``layers`` pre-norm transformer layers whose attention is written
   out (scores, an additive large negative where the key is masked, softmax): the text keys after
   EOS (text_mask 0) and every image key of a post without an image (image_present 0) are masked.
   No nn.TransformerEncoder / nn.MultiheadAttention fast path, so the ONNX graph is predictable.
2. Per modality: masked mean of its output tokens -> m_img, m_txt.
3. Modality-wise attention with this task's weights: s_m = v . tanh(W m_m + b); s_img gets the
   large negative when image_present == 0; w = softmax([s_img, s_txt]);
   fused = w_img m_img + w_txt m_txt; probs = softmax(classifier(fused)).

Returns (probs [B, C], modality_weights [B, 2] = [image, text]). Nothing mixes the samples of a
batch (attention runs within one post; LayerNorm is per token; no BatchNorm), so a served answer
does not depend on what shares its batch. Text is always present (an empty text is still SOT +
EOS), so a post without an image is answered from its text alone, with image weight exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from crisis_triton.contract.spec import LABELS

# Added to the score of a masked key / absent modality. Large enough that exp() of it underflows
# to exactly 0 in float32, small enough to stay finite (and not turn 0 * x into NaN) in float16.
MASK_NEGATIVE = -1.0e4


@dataclass(frozen=True)
class CMAClipConfig:
    image_dim: int  # image token width (Di)
    text_dim: int  # text token width (Dt)
    num_classes: int
    dim: int = 256  # model width
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1  # identity in eval

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not a multiple of heads {self.heads}")
        if min(self.image_dim, self.text_dim, self.num_classes, self.dim, self.layers) < 1:
            raise ValueError(f"every size must be >= 1: {self}")

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention with an explicit additive key mask."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, N, D]; key_bias [B, N]: 0 where the key counts, MASK_NEGATIVE where it does not."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, hd]
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores + key_bias[:, None, None, :]
        attn = self.attn_dropout(torch.softmax(scores, dim=-1))
        y = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d)
        return self.out(y)


class TransformerLayer(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MaskedSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), key_bias))
        return x + self.dropout(self.mlp(self.ln2(x)))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], mask [B, N] 0/1 -> [B, D]; all-masked rows give 0 (not NaN)."""
    total = torch.sum(x * mask.unsqueeze(-1), dim=1)
    return total / torch.clamp(torch.sum(mask, dim=1, keepdim=True), min=1.0)


class CMAClipHead(nn.Module):
    """One task's cma_clip head (see the module docstring)."""

    def __init__(self, cfg: CMAClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.image_proj = nn.Linear(cfg.image_dim, d)
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.modality_embedding = nn.Parameter(torch.zeros(2, d).normal_(0, 0.02))
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d, cfg.heads, cfg.dropout) for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(d)
        # modality-wise attention: s_m = v . tanh(W m_m + b)
        self.modality_attn = nn.Linear(d, d)
        self.modality_score = nn.Linear(d, 1, bias=False)
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(d, cfg.num_classes))

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        image_present: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_tokens [B,Ni,Di], text_tokens [B,Nt,Dt], text_mask [B,Nt] float 0/1,
        image_present [B,1] float 0/1 -> (probs [B,C], modality_weights [B,2] = [image, text])."""
        logits, weights = self.logits(image_tokens, text_tokens, text_mask, image_present)
        return torch.softmax(logits, dim=-1), weights

    def logits(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        image_present: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As forward, with the classifier's logits instead of probabilities (training)."""
        n_img = image_tokens.shape[1]
        image_mask = image_present.expand(-1, n_img)  # [B, Ni]
        x_img = self.image_proj(image_tokens) + self.modality_embedding[0]
        x_txt = self.text_proj(text_tokens) + self.modality_embedding[1]
        x = self.input_dropout(torch.cat((x_img, x_txt), dim=1))
        key_mask = torch.cat((image_mask, text_mask), dim=1)  # [B, Ni+Nt]
        key_bias = (1.0 - key_mask) * MASK_NEGATIVE
        for layer in self.layers:
            x = layer(x, key_bias)
        x = self.ln_final(x)
        m_img = masked_mean(x[:, :n_img], image_mask)
        m_txt = masked_mean(x[:, n_img:], text_mask)
        m = torch.stack((m_img, m_txt), dim=1)  # [B, 2, D]
        scores = self.modality_score(torch.tanh(self.modality_attn(m))).squeeze(-1)  # [B, 2]
        absent = torch.cat((1.0 - image_present, torch.zeros_like(image_present)), dim=1)
        weights = torch.softmax(scores + absent * MASK_NEGATIVE, dim=-1)
        fused = torch.sum(weights.unsqueeze(-1) * m, dim=1)
        return self.classifier(fused), weights


class MultiTaskCMAClip(nn.Module):
    """Every task's cma_clip head on one encoder pass.

    forward -> (probs of each task in ``tasks`` order, then modality weights of each task).
    """

    def __init__(self, heads: Mapping[str, CMAClipHead]) -> None:
        super().__init__()
        self.tasks = tuple(heads)
        self.heads = nn.ModuleDict(heads)

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        image_present: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        outs = [
            self.heads[t](image_tokens, text_tokens, text_mask, image_present) for t in self.tasks
        ]
        return tuple(o[0] for o in outs) + tuple(o[1] for o in outs)


def build_multitask_cma_clip(
    heads: Mapping[str, CMAClipHead], tasks: Sequence[str]
) -> MultiTaskCMAClip:
    return MultiTaskCMAClip({t: heads[t] for t in tasks}).eval()


def random_cma_clip_head(
    image_dim: int, text_dim: int, task: str, seed: int, **sizes: int | float
) -> CMAClipHead:
    """A seeded random cma_clip head in eval mode; ``sizes``: other CMAClipConfig fields."""
    if task not in LABELS:
        raise ValueError(f"unknown task {task!r}; known: {list(LABELS)}")
    torch.manual_seed(seed)
    cfg = CMAClipConfig(image_dim, text_dim, len(LABELS[task]), **sizes)  # type: ignore[arg-type]
    return CMAClipHead(cfg).eval()
