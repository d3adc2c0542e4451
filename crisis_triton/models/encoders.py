"""CLIP image and text towers that return exactly the spec's features.

- image: pixel_values [B, 3, S, S] -> image_features = pooled (post-layernorm CLS) [B, D_img]
- text: input_ids [B, 77] -> text_features = final-layernorm state at the first EOS [B, D_txt]
- token sequences (the cma_clip head, HF only): image tokens [B, 1+P, D_img] (post-layernormed,
  token 0 = image_features) and text tokens [B, 77, D_txt] with their mask (1 up to EOS)

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

from crisis_triton.contract.spec import EncoderConfig, load_encoder_config

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


def eos_positions(text_model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[B] index of the token the HF text model pools at (exactly as its pooler_output does).

    eos_token_id 2 (the legacy configs, the OpenAI ones included): argmax of the ids, i.e. the
    first 49407 of the OpenAI vocabulary; otherwise the first position of eos_token_id.
    """
    eos_id = getattr(text_model, "eos_token_id", 2)
    if eos_id == 2:
        return input_ids.to(torch.int32).argmax(dim=-1)
    return (input_ids.to(torch.int32) == eos_id).to(torch.int32).argmax(dim=-1)


class HFImageTokenEncoder(nn.Module):
    """pixel_values [B,3,S,S] -> image tokens [B, 1+P, Di]: the vision model's last hidden state
    with its post_layernorm applied to every token, so tokens[:, 0] is the pooled image feature."""

    def __init__(self, vision_model: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return self.vision_model.post_layernorm(hidden)


class HFTextTokenEncoder(nn.Module):
    """input_ids [B,T] int64 -> (tokens [B,T,Dt] float32, mask [B,T] float32).

    tokens: the text model's last hidden state (final-layernormed); mask: 1.0 at positions
    0..EOS (EOS: where the pooled text feature is taken, see eos_positions), 0.0 after, so
    tokens[b, eos] is the pooled text feature. Causal attention: the padding cannot change the
    unmasked tokens.
    """

    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.text_model(input_ids=input_ids).last_hidden_state
        eos = eos_positions(self.text_model, input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = (positions.unsqueeze(0) <= eos.unsqueeze(1)).to(tokens.dtype)
        return tokens, mask


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

    def token_encoders(self) -> tuple[HFImageTokenEncoder, HFTextTokenEncoder]:
        """The token-sequence modules (for the cma_clip head) sharing these towers' weights.

        Raises:
            EncoderLoadError: OpenCLIP encoders (cma_clip needs Hugging Face CLIP encoders).
        """
        if not isinstance(self.image, HFImageEncoder) or not isinstance(self.text, HFTextEncoder):
            raise EncoderLoadError(
                f"cma_clip needs Hugging Face CLIP encoders (hf:...); these are {self.description}"
            )
        image = HFImageTokenEncoder(self.image.vision_model)
        text = HFTextTokenEncoder(self.text.text_model)
        image.train(self.image.training)
        text.train(self.text.training)
        return image, text

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] -> [B, 1+P, Di]; tokens[:, 0] == self.image(pixel_values)."""
        return self.token_encoders()[0](pixel_values)

    def text_tokens(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,T] int64 -> (tokens [B,T,Dt], mask [B,T] float 0/1 up to and including EOS)."""
        return self.token_encoders()[1](input_ids)


def weights_sha256(*modules: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the modules' state (in order): equal
    encoders give equal digests, so a head trained on cached features can be matched to them."""
    import hashlib

    digest = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
