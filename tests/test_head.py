"""The PyTorch head: per-sample semantics, and equality with the research forward at batch 1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crisis_triton.contract.spec import HEAD_VARIANTS, LABELS
from crisis_triton.models.head import GuidedCAHead, build_multitask_head, random_head


def research_forward(m: GuidedCAHead, x_img: torch.Tensor, x_txt: torch.Tensor) -> torch.Tensor:
    """A direct transcription of the research code's forward (batch self-attention, full
    multi-head differential attention over a sequence), independent of
    crisis_triton/models/head.py's
    shortcuts."""

    def sa(x: torch.Tensor) -> torch.Tensor:  # softmax(X X^T) X over the batch
        return torch.softmax(x @ x.t(), dim=-1) @ x

    f = m.image_map(x_img)
    e = m.text_map(x_txt)
    ft = F.relu(m.proj_visual_bn(m.proj_visual(f)))
    et = F.relu(m.proj_text_bn(m.proj_text(e)))
    a_v = torch.sigmoid(m.layer_attn_text(sa(e)))
    a_e = torch.sigmoid(m.layer_attn_visual(sa(f)))
    j = torch.cat((a_v * ft, a_e * et), dim=1)
    if m.cfg.variant == "guided_ca_diff":
        d = m.multihead_diffattn
        x = j.unsqueeze(1)  # [B, T=1, E]
        bsz, tgt, _ = x.shape
        q = d.q_proj(x).view(bsz, tgt, 2 * d.num_heads, d.head_dim).transpose(1, 2)
        k = d.k_proj(x).view(bsz, tgt, 2 * d.num_heads, d.head_dim).transpose(1, 2)
        v = d.v_proj(x).view(bsz, tgt, d.num_heads, 2 * d.head_dim).transpose(1, 2)
        w = torch.matmul(q * d.head_dim**-0.5, k.transpose(-1, -2))
        w = torch.softmax(torch.nan_to_num(w), dim=-1, dtype=torch.float32).type_as(w)
        lambda_init = 0.8 - 0.6 * math.exp(-0.3 * 1)
        lam = (
            torch.exp(torch.sum(d.lambda_q1 * d.lambda_k1, dim=-1).float())
            - torch.exp(torch.sum(d.lambda_q2 * d.lambda_k2, dim=-1).float())
            + lambda_init
        )
        w = w.view(bsz, d.num_heads, 2, tgt, tgt)
        w = w[:, :, 0] - lam * w[:, :, 1]
        attn = torch.matmul(w, v)
        xf = attn.float()
        attn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(attn)
        attn = attn * d.subln.weight * (1 - lambda_init)
        attn = attn.transpose(1, 2).reshape(bsz, tgt, d.num_heads * 2 * d.head_dim)
        j = d.out_proj(attn).squeeze(1)
    h = F.relu(m.self_attn_bn(m.fc_as_self_attn(j)))
    return m.cls_layer(h)


@pytest.mark.parametrize("variant", HEAD_VARIANTS)
@pytest.mark.parametrize("task", ["task1", "task2", "task3"])
def test_batch_equals_each_sample_alone(variant: str, task: str) -> None:
    head = random_head(768, 512, task, variant, seed=11)
    x_img, x_txt = torch.randn(16, 768) * 3, torch.randn(16, 512) * 3
    with torch.no_grad():
        batched = head(x_img, x_txt)
        alone = torch.cat([head(x_img[i : i + 1], x_txt[i : i + 1]) for i in range(16)])
    assert batched.shape == (16, len(LABELS[task]))
    assert (batched - alone).abs().max().item() <= 1e-6


@pytest.mark.parametrize("variant", HEAD_VARIANTS)
def test_equals_research_forward_at_batch_1(variant: str) -> None:
    head = random_head(768, 512, "task2", variant, seed=5)
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        x_img, x_txt = torch.randn(1, 768, generator=g), torch.randn(1, 512, generator=g)
        with torch.no_grad():
            ours, theirs = head(x_img, x_txt), research_forward(head, x_img, x_txt)
        assert (ours - theirs).abs().max().item() <= 1e-6


def test_research_forward_mixes_samples_but_deployed_head_does_not() -> None:
    """Documents why the deployed contract is one-sample: the research SA couples a batch."""
    head = random_head(768, 512, "task1", "guided_ca_diff", seed=2)
    x_img, x_txt = torch.randn(4, 768) * 0.05, torch.randn(4, 512) * 0.05
    with torch.no_grad():
        research = research_forward(head, x_img, x_txt)
        alone = torch.cat(
            [research_forward(head, x_img[i : i + 1], x_txt[i : i + 1]) for i in range(4)]
        )
        ours = head(x_img, x_txt)
    assert (research - alone).abs().max().item() > 1e-4  # batch-dependent in research code
    assert (ours - alone).abs().max().item() <= 1e-6


def test_q_k_cannot_change_the_output() -> None:
    head = random_head(768, 512, "task3", "guided_ca_diff", seed=9)
    x_img, x_txt = torch.randn(3, 768), torch.randn(3, 512)
    with torch.no_grad():
        before = head(x_img, x_txt)
        head.multihead_diffattn.q_proj.weight.normal_()
        head.multihead_diffattn.k_proj.weight.normal_()
        after = head(x_img, x_txt)
    assert torch.equal(before, after)


def test_multitask_head_outputs_probabilities_in_task_order() -> None:
    heads = {t: random_head(64, 48, t, "guided_ca_diff", seed=i) for i, t in enumerate(LABELS)}
    multi = build_multitask_head(heads, ["task1", "task2", "task2_full", "task3"])
    with torch.no_grad():
        outs = multi(torch.randn(5, 64), torch.randn(5, 48))
    assert [o.shape[1] for o in outs] == [2, 6, 8, 3]
    for o in outs:
        assert torch.allclose(o.sum(-1), torch.ones(5), atol=1e-6)
