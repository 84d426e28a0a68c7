"""Tiny Stable-Diffusion-shaped pipelines from configs (random weights, no download), for diffusers' LoRA loader.

The shapes follow diffusers' own test configs: SD 1.x (one CLIP text encoder, cross-attention
width 32) and SDXL (two text encoders whose hidden states concatenate to 64, `text_time` added
conditioning). The VAE, tokenizers and scheduler play no part in loading a LoRA and are left out.
"""

from __future__ import annotations

from typing import Any

import torch

SEED = 0


def _clip(projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, projection_dim=32,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def sd15() -> Any:
    """StableDiffusionPipeline with a 2-block UNet (conv proj_in/out) and one text encoder."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8,
    ).eval()  # fmt: skip
    return StableDiffusionPipeline(
        vae=None, text_encoder=_clip(False), tokenizer=None, unet=unet, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def sdxl() -> Any:
    """StableDiffusionXLPipeline with a linear-projection UNet and SDXL's two text encoders."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    ).eval()  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=None, text_encoder=_clip(False), text_encoder_2=_clip(True), tokenizer=None, tokenizer_2=None,
        unet=unet, scheduler=None,
    )  # fmt: skip


def components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's LoRA-able components by their adapter prefix."""
    names = ("unet", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def outputs(pipe: Any) -> dict[str, torch.Tensor]:
    """Each component's output on fixed seeded inputs."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (1, 7), generator=g)
    out = {}
    with torch.no_grad():
        states = []
        for name, te in components(pipe).items():
            if name != "unet":
                hidden = te(ids, output_hidden_states=True)
                out[name] = hidden.hidden_states[-2]
                states.append(hidden.hidden_states[-2])
        context = torch.cat(states, dim=-1)
        extra = {}
        if pipe.unet.config.addition_embed_type == "text_time":
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                           "time_ids": torch.randn(1, 6, generator=g)}}  # fmt: skip
        sample = torch.randn(1, 4, 8, 8, generator=g)
        out["unet"] = pipe.unet(sample, 10, encoder_hidden_states=context, **extra).sample
    return out
