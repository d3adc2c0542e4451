"""CLIP image and text towers that return exactly the spec's features.

- image: pixel_values [B, 3, S, S] -> image_features = pooled (post-layernorm CLS) [B, D_img]
- text: input_ids [B, 77] -> text_features = final-layernorm state at the first EOS [B, D_txt]

Families: Hugging Face `transformers` CLIP (the paper's) and OpenCLIP (`open_clip_torch`, optional:
it imports torchvision, see README). Weights come from a hub name, a local folder/file, a research
checkpoint, or are random on explicit request.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.spec import EncoderConfig, load_encoder_config

DEFAULT_ENCODERS = "hf:openai/clip-vit-base-patch32"
SIZE_CONFIGS = {"base": "hf-clip-vit-base-patch32", "tiny": "hf-clip-tiny"}


class EncoderLoadError(RuntimeError):
    pass


class HFImageEncoder(nn.Module):
    def __init__(self, vision_model: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).pooler_output


class HFTextEncoder(nn.Module):
    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Causal attention: the padding after the first EOS cannot change the pooled state.
        return self.text_model(input_ids=input_ids).pooler_output


class OpenCLIPImageEncoder(nn.Module):
    """open_clip VisionTransformer without its final projection (the pooled width-d feature)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.visual.proj = None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)


class OpenCLIPTextEncoder(nn.Module):
    """open_clip CLIP.encode_text without text_projection (final-layernorm state at EOT)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.transformer = model.transformer
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.ln_final = model.ln_final
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), input_ids.argmax(dim=-1)]


@dataclass
class Encoders:
    image: nn.Module
    text: nn.Module
    config: EncoderConfig
    description: str
    random_weights: bool

    def eval(self) -> Encoders:
        self.image.eval()
        self.text.eval()
        return self


def parse_encoders(arg: str) -> tuple[str, str, str | None]:
    """'hf:NAME_OR_DIR' | 'openclip:MODEL:TAG_OR_FILE' -> (family, ref, tag)."""
    family, _, rest = arg.partition(":")
    if family == "hf" and rest:
        return "hf", rest, None
    if family == "openclip":
        model, _, tag = rest.partition(":")
        if model:
            return "openclip", model, tag or None
    raise ValueError(
        f"--encoders {arg!r}: expected hf:HUB_NAME, hf:LOCAL_FOLDER or openclip:MODEL:TAG_OR_FILE"
    )


# ------------------------------------------------------------------------------ Hugging Face


def _hf_config_for(ref: str, size: str | None) -> EncoderConfig:
    """Architecture of an HF reference, known offline where possible."""
    if size is not None:
        return load_encoder_config(SIZE_CONFIGS[size])
    if Path(ref).is_dir():
        raw = json.loads((Path(ref) / "config.json").read_text())
        keys = ("projection_dim", "text_config", "vision_config")
        hf_config = {k: raw[k] for k in keys if k in raw}
        base = load_encoder_config(SIZE_CONFIGS["base"])
        return dataclasses.replace(
            base,
            name=f"hf:{ref}",
            source=ref,
            image_dim=raw["vision_config"]["hidden_size"],
            text_dim=raw["text_config"]["hidden_size"],
            image_size=raw["vision_config"].get("image_size", 224),
            context_length=raw["text_config"].get("max_position_embeddings", 77),
            vocab_size=raw["text_config"].get("vocab_size", 49408),
            hf_config=hf_config,
        )
    base = load_encoder_config(SIZE_CONFIGS["base"])
    if ref == base.source:
        return base
    raise EncoderLoadError(
        f"architecture of {ref!r} is not known offline; pass a local folder (hf:DIR with "
        f"config.json) or one of: {base.source}"
    )


def _hf_towers(config: EncoderConfig) -> tuple[nn.Module, nn.Module]:
    from transformers import CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig(**config.hf_config))
    return model.vision_model, model.text_model


def hf_encoders(ref: str, random_weights: bool, size: str | None, seed: int = 0) -> Encoders:
    if random_weights:
        config = _hf_config_for(ref, size or "base")
        torch.manual_seed(seed)
        vision, text = _hf_towers(config)
        desc = f"RANDOM weights, architecture {config.name}"
    else:
        from transformers import CLIPModel

        try:
            model = CLIPModel.from_pretrained(ref)
        except OSError as exc:
            raise EncoderLoadError(
                f"cannot load Hugging Face CLIP {ref!r}: {exc}. Offline, pass a local folder "
                f"(hf:DIR) or --random-weights."
            ) from None
        config = _hf_config_for(ref, None) if Path(ref).is_dir() else _hf_config_for(ref, "base")
        vision, text = model.vision_model, model.text_model
        desc = f"pretrained weights from {ref}"
    return Encoders(
        HFImageEncoder(vision), HFTextEncoder(text), config, desc, random_weights
    ).eval()


def hf_encoders_from_states(
    ref: str, image_state: dict, text_state: dict, origin: str
) -> tuple[Encoders, list[str]]:
    """Towers built from the architecture of `ref` with tensors from a research checkpoint."""
    config = _hf_config_for(ref, None)
    vision, text = _hf_towers(config)
    problems = strict_load(vision, image_state, "image_encoder.")
    problems += strict_load(text, text_state, "text_encoder.")
    enc = Encoders(
        HFImageEncoder(vision), HFTextEncoder(text), config, f"encoders from {origin}", False
    )
    return enc.eval(), problems


# Buffers older transformers versions saved in state dicts; they hold no learned value.
IGNORABLE_KEYS = frozenset({"embeddings.position_ids"})


def strict_load(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Load `state` into `module`; return every missing, unknown or misshapen key (prefixed)."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k not in IGNORABLE_KEYS}
    problems = [f"missing key {prefix}{k}" for k in own if k not in state]
    problems += [f"unknown key {prefix}{k}" for k in state if k not in own]
    problems += [
        f"misshapen key {prefix}{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if not problems:
        module.load_state_dict(state, strict=True)
    return problems


# ---------------------------------------------------------------------------------- OpenCLIP


def openclip_encoders(model_name: str, tag: str | None, random_weights: bool) -> Encoders:
    try:
        import open_clip
    except Exception as exc:  # ImportError, or torchvision's operator error beside a CPU torch
        raise EncoderLoadError(
            f"OpenCLIP encoders need the `openclip` extra (open_clip_torch + torchvision): {exc}"
        ) from None
    if not random_weights and not tag:
        raise EncoderLoadError("openclip:MODEL:TAG_OR_FILE needs a pretrained tag or a file")
    try:
        model = open_clip.create_model(
            model_name, pretrained=None if random_weights else tag, device="cpu"
        )
    except (RuntimeError, OSError) as exc:
        raise EncoderLoadError(f"cannot load OpenCLIP {model_name}:{tag}: {exc}") from None
    cfg = open_clip.get_model_config(model_name)
    vision_cfg, text_cfg = cfg["vision_cfg"], cfg["text_cfg"]
    image_size = vision_cfg.get("image_size", 224)
    config = dataclasses.replace(
        load_encoder_config(SIZE_CONFIGS["base"]),
        name=f"openclip:{model_name}",
        family="openclip",
        source=f"{model_name}:{tag}",
        image_dim=vision_cfg["width"],
        text_dim=text_cfg["width"],
        image_size=image_size if isinstance(image_size, int) else image_size[0],
        context_length=text_cfg.get("context_length", 77),
        vocab_size=text_cfg.get("vocab_size", 49408),
        hf_config={},
    )
    desc = "RANDOM weights" if random_weights else f"pretrained weights {tag}"
    return Encoders(
        OpenCLIPImageEncoder(model.visual),
        OpenCLIPTextEncoder(model),
        config,
        f"OpenCLIP {model_name}, {desc}",
        random_weights,
    ).eval()
