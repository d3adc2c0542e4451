"""GPU facts for the GPU issue, measured with PyTorch alone (the lent machine has no TensorRT and
no onnxruntime-gpu): the research path (eager, full-size ViT-B/32, random weights) on CUDA in FP32
and FP16, throughput by batch size, and how far FP16 drifts from FP32 (encoder-feature cosine,
head top-1 agreement), which decides what must stay FP32 in an FP16 engine.

    python scripts/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

if importlib.util.find_spec("crisis_triton") is None:  # run from a checkout, project not installed
    sys.exit(
        "gpu_check.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): run `pip install -e '.[export]'` in the repository root"
    )

import numpy as np
import torch

from crisis_triton.contract.sample_inputs import fixed_inputs
from crisis_triton.contract.spec import DEFAULT_TASKS, build_specs
from crisis_triton.models.encoders import hf_encoders
from crisis_triton.models.head import build_multitask_head, random_head


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dev = torch.device("cuda")
    enc = hf_encoders("openai/clip-vit-base-patch32", True, "base", seed=0)
    heads = {
        t: random_head(768, 512, t, "guided_ca_diff", seed=1 + i)
        for i, t in enumerate(DEFAULT_TASKS)
    }
    head = build_multitask_head(heads, DEFAULT_TASKS)
    specs = build_specs(enc.config)
    result: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "runs": [],
    }
    models = {"fp32": (enc.image.to(dev), enc.text.to(dev), head.to(dev))}
    models["fp16"] = tuple(__import__("copy").deepcopy(m).half() for m in models["fp32"])
    feats: dict = {}
    for batch in (1, 8, 32, 128):
        px = torch.from_numpy(fixed_inputs(specs.image_encoder, batch, 0, 49408)["pixel_values"])
        ids = torch.from_numpy(fixed_inputs(specs.text_encoder, batch, 1, 49408)["input_ids"])
        px, ids = px.to(dev), ids.to(dev)
        for precision, (img, txt, hd) in models.items():
            p = px.half() if precision == "fp16" else px

            def step(img=img, txt=txt, hd=hd, p=p, ids=ids):
                with torch.no_grad():
                    fi, ft = img(p), txt(ids)
                    return fi, ft, hd(fi, ft)

            for _ in range(3):
                step()
            lat = timed(step, 20 if batch < 128 else 8)
            fi, ft, probs = step()
            feats[(precision, batch)] = (
                fi.float().cpu(),
                ft.float().cpu(),
                [q.float().cpu() for q in probs],
            )
            result["runs"].append(
                {
                    "precision": precision,
                    "batch": batch,
                    "latency_ms_p50": round(1000 * float(np.median(lat)), 3),
                    "throughput_posts_per_s": round(batch / float(np.median(lat)), 1),
                }
            )
            print(result["runs"][-1], flush=True)
    drift = []
    for batch in (1, 8, 32, 128):
        a, b = feats[("fp32", batch)], feats[("fp16", batch)]
        cosine = torch.nn.functional.cosine_similarity
        cos = [float(cosine(a[i], b[i], dim=1).min()) for i in (0, 1)]
        agree = [float((x.argmax(1) == y.argmax(1)).float().mean()) for x, y in zip(a[2], b[2])]
        maxdiff = [float((x - y).abs().max()) for x, y in zip(a[2], b[2])]
        drift.append(
            {
                "batch": batch,
                "min_cosine_image": cos[0],
                "min_cosine_text": cos[1],
                "top1_agreement_per_task": agree,
                "max_abs_diff_probs": maxdiff,
            }
        )
        print(drift[-1], flush=True)
    result["fp16_vs_fp32"] = drift
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
