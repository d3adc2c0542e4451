"""The fused head of the paper (guided cross attention + differential attention), in PyTorch.

Math and parameter names follow ../shared/reference-model.md and the research checkpoints, with
the deployed contract of one-sample semantics: the research code's batch self-attention
SA(X) = softmax(X X^T) X mixes the samples of a batch; for one sample it is the identity, so a
served request gets the same answer whatever shares its batch. The differential attention runs on
a sequence of ONE token, where both softmax maps are exactly 1: its output is
out_proj(RMSNorm((1 - lambda) v) * (1 - lambda_init)). q_proj and k_proj cannot change the
output; they stay as parameters so research checkpoints load strictly, and are left out of the
computation (and of the ONNX graph).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from crisis_triton.contract.spec import HEAD_VARIANTS, LABELS


@dataclass(frozen=True)
class HeadConfig:
    image_dim: int  # encoder image feature (768 for ViT-B/32)
    text_dim: int  # encoder text feature (512 for ViT-B/32)
    num_classes: int
    variant: str = "guided_ca_diff"
    map_dim: int = 512  # image_map/text_map hidden size
    repr_dim: int = 768  # dim_visual_repr = dim_text_repr
    proj_dim: int = 128  # dim_proj
    diff_heads: int = 4
    diff_depth: int = 1

    def __post_init__(self) -> None:
        if self.variant not in HEAD_VARIANTS:
            raise ValueError(f"unknown head variant {self.variant!r}; known: {HEAD_VARIANTS}")


class RMSNorm(nn.Module):
    """RMSNorm as in the differential-transformer code: computed in float32, learned weight."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class DiffAttnOneToken(nn.Module):
    """Multi-head differential attention applied to a sequence of one token."""

    def __init__(self, embed_dim: int, num_heads: int, depth: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads // 2
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.zeros(self.head_dim).normal_(0, 0.1)))
        self.subln = RMSNorm(2 * self.head_dim, eps=1e-5)

    def lambda_full(self) -> torch.Tensor:
        l1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1).float())
        l2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1).float())
        return l1 - l2 + self.lambda_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, E]
        v = self.v_proj(x).view(x.shape[0], self.num_heads, 2 * self.head_dim)
        attn = self.subln((1.0 - self.lambda_full()).type_as(v) * v) * (1.0 - self.lambda_init)
        return self.out_proj(attn.reshape(x.shape[0], -1))


class GuidedCAHead(nn.Module):
    """One task's head. Parameter names are the research checkpoint's keys."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        r, p = cfg.repr_dim, cfg.proj_dim
        self.image_map = nn.Sequential(
            nn.Linear(cfg.image_dim, cfg.map_dim, bias=False), nn.ReLU(), nn.Linear(cfg.map_dim, r)
        )
        self.text_map = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.map_dim, bias=False), nn.ReLU(), nn.Linear(cfg.map_dim, r)
        )
        self.proj_visual = nn.Linear(r, p)
        self.proj_text = nn.Linear(r, p)
        self.proj_visual_bn = nn.BatchNorm1d(p)
        self.proj_text_bn = nn.BatchNorm1d(p)
        self.layer_attn_visual = nn.Linear(r, p)
        self.layer_attn_text = nn.Linear(r, p)
        if cfg.variant == "guided_ca_diff":
            self.multihead_diffattn = DiffAttnOneToken(2 * p, cfg.diff_heads, cfg.diff_depth)
        self.fc_as_self_attn = nn.Linear(2 * p, 2 * p)
        self.self_attn_bn = nn.BatchNorm1d(2 * p)
        self.cls_layer = nn.Linear(2 * p, cfg.num_classes)

    def forward(self, x_img: torch.Tensor, x_txt: torch.Tensor) -> torch.Tensor:
        """Logits [B, C]; each row depends on its own sample only (eval mode)."""
        f = self.image_map(x_img)
        e = self.text_map(x_txt)
        ft = torch.relu(self.proj_visual_bn(self.proj_visual(f)))
        et = torch.relu(self.proj_text_bn(self.proj_text(e)))
        a_v = torch.sigmoid(self.layer_attn_text(e))  # SA(e) = e for one sample: text guides image
        a_e = torch.sigmoid(self.layer_attn_visual(f))  # image guides text
        j = torch.cat((a_v * ft, a_e * et), dim=1)
        if self.cfg.variant == "guided_ca_diff":
            j = self.multihead_diffattn(j)
        h = torch.relu(self.self_attn_bn(self.fc_as_self_attn(j)))
        return self.cls_layer(h)


class MultiTaskHead(nn.Module):
    """All tasks' heads on one pair of features: the single exported head graph."""

    def __init__(self, heads: Mapping[str, GuidedCAHead]) -> None:
        super().__init__()
        self.tasks = tuple(heads)
        self.heads = nn.ModuleDict(heads)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> tuple:
        return tuple(
            torch.softmax(self.heads[t](image_features, text_features), dim=-1) for t in self.tasks
        )


def random_head(image_dim: int, text_dim: int, task: str, variant: str, seed: int) -> GuidedCAHead:
    """A head with random weights AND random BatchNorm statistics (so BN is not a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = GuidedCAHead(HeadConfig(image_dim, text_dim, len(LABELS[task]), variant))
    for bn in (head.proj_visual_bn, head.proj_text_bn, head.self_attn_bn):
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return head.eval()


class TextOnlyMultiTaskHead(MultiTaskHead):
    """All tasks' heads, trained with modality dropout (train/train_head.py --modality-dropout):
    the image features are multiplied by image_present, so a post without an image (0) is
    answered from zero image features, as modality dropout trained the heads
    (docs/text-only.md). With image_present 1 the answer is MultiTaskHead's."""

    def forward(  # type: ignore[override]
        self, image_features: torch.Tensor, text_features: torch.Tensor, image_present: torch.Tensor
    ) -> tuple:
        return super().forward(image_features * image_present, text_features)


def build_multitask_head(
    heads: Mapping[str, nn.Module], tasks: Sequence[str], text_only: bool = False
) -> nn.Module:
    """The one head graph of an export: every task's head on one encoder pass, the inputs and
    outputs of crisis_triton.contract.spec.build_specs(..., head, text_only). cma_clip heads take
    the token
    sequences and image_present; the paper's heads take the pooled features, and image_present
    too when `text_only` (trained with modality dropout)."""
    from crisis_triton.models.cma_clip import CMAClipHead, build_multitask_cma_clip

    if all(isinstance(h, CMAClipHead) for h in heads.values()):
        return build_multitask_cma_clip(heads, tasks)  # type: ignore[arg-type]
    if not all(isinstance(h, GuidedCAHead) for h in heads.values()):
        raise ValueError("one export serves one kind of head: cma_clip or the paper's, not both")
    kind = TextOnlyMultiTaskHead if text_only else MultiTaskHead
    return kind({t: heads[t] for t in tasks}).eval()  # type: ignore[misc]
