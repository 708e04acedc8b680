"""Generates the reference fixtures for distorch-models' parity tests.

Run from the repository root with a venv holding the reference stack (PyPI):

    python3 -m venv .venv && .venv/bin/pip install torch diffusers transformers safetensors accelerate
    .venv/bin/python tools/gen_fixtures.py

Every model is a tiny configuration with random weights from a fixed seed (model hubs are not
needed). Weights are rounded to bf16-representable values so the f16/bf16 variants of a
checkpoint hold the same numbers. Outputs are computed in float32 on the CPU.
"""

import json
import os

import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

OUT = os.path.join(os.path.dirname(__file__), "..", "distorch-models", "tests", "fixtures")


def bf16_round_(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def randomize_(model, seed, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def clip_to_open_clip(state, hidden):
    """OpenCLIP's layout (SD 2.x `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`)
    of a transformers CLIP text state dict: fused q/k/v, transposed projection; checked with
    diffusers' own converter."""
    out = {}
    names = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]
    for key, value in state.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.split(".")[-1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            rest = key[len("text_model.encoder.layers."):]
            layer, rest = rest.split(".", 1)
            base = f"transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.split(".")[-1]
                if rest.startswith("self_attn.q_proj"):
                    q = state[key]
                    k = state[key.replace("q_proj", "k_proj")]
                    v = state[key.replace("q_proj", "v_proj")]
                    out[base + "attn.in_proj_" + kind] = torch.cat([q, k, v], 0)
                continue
            for a, b in names:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
            out[base + rest] = value
        else:
            raise ValueError(key)
    prefix = "conditioner.embedders.1.model."
    full = {prefix + k: v for k, v in out.items()}
    back = convert_open_clip_checkpoint(None, full, prefix=prefix)
    assert set(back) == set(state), set(back) ^ set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    return full


def clip_text(name, hidden_act, seed):
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config).eval()
    randomize_(model, seed)
    bf16_round_(model)
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(folder, "model.safetensors"))
    if hidden_act == "gelu":
        save_file(clip_to_open_clip(weights, config.hidden_size), os.path.join(folder, "open_clip.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({k: v for k, v in config.to_dict().items() if not k.startswith("_")}, f, indent=1)
    # Two prompts: EOS inside the sequence (then padding), and EOS at the very end.
    ids = torch.tensor(
        [
            [998, 5, 17, 300, 999, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            [998] + list(range(40, 54)) + [999],
        ],
        dtype=torch.int64,
    )
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    pooled = out.last_hidden_state[torch.arange(2), (ids == config.eos_token_id).int().argmax(-1)]
    save_file(
        {
            "input_ids": ids.to(torch.int64),
            "last_hidden_state": out.last_hidden_state.contiguous(),
            "pooled_output": pooled.contiguous(),
            "text_embeds": out.text_embeds.contiguous(),
            "hidden_states": torch.stack(out.hidden_states).contiguous(),
        },
        os.path.join(folder, "reference.safetensors"),
    )
    print(name, {k: tuple(v.shape) for k, v in weights.items()}.__len__(), "tensors")


def vae_to_ldm(state, config):
    """The original (LDM) single-file layout of a diffusers VAE state dict, attention
    projections as 1x1 convolutions; checked with diffusers' own converter."""
    n = len(config["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = new.split(".")
        if parts[1] == "down_blocks":
            i, kind = parts[2], parts[3]
            if kind == "resnets":
                new = ".".join([parts[0], "down", i, "block"] + parts[4:])
            else:
                new = ".".join([parts[0], "down", i, "downsample"] + parts[5:])
        elif parts[1] == "up_blocks":
            i, kind = int(parts[2]), parts[3]
            block = str(n - 1 - i)
            if kind == "resnets":
                new = ".".join([parts[0], "up", block, "block"] + parts[4:])
            else:
                new = ".".join([parts[0], "up", block, "upsample"] + parts[5:])
        elif parts[1] == "mid_block":
            kind, j = parts[2], int(parts[3])
            if kind == "resnets":
                new = ".".join([parts[0], "mid", f"block_{j + 1}"] + parts[4:])
            else:
                rest = parts[4:]
                if rest[0] == "to_out":
                    rest = rest[1:]
                name = attn[parts[4]]
                new = ".".join([parts[0], "mid", "attn_1", name, rest[-1]])
                if rest[-1] == "weight" and value.dim() == 2:
                    value = value[:, :, None, None]
        out[new] = value
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in out.items()}, config)
    assert set(back) == set(state), set(back) ^ set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    return out


def vae(name, seed):
    torch.manual_seed(seed)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.18215,
    ).eval()
    randomize_(model, seed, scale=0.15)
    bf16_round_(model)
    folder = os.path.join(OUT, name)
    model.save_pretrained(folder, safe_serialization=True)
    ldm = vae_to_ldm(model.state_dict(), dict(model.config))
    save_file(
        {"first_stage_model." + k: v.contiguous() for k, v in ldm.items()},
        os.path.join(folder, "ldm.safetensors"),
    )
    g = torch.Generator().manual_seed(seed + 100)
    image = torch.rand((2, 3, 16, 16), generator=g) * 2 - 1
    z = torch.randn((2, 4, 8, 8), generator=g)
    with torch.no_grad():
        dist = model.encode(image).latent_dist
        decoded = model.decode(z).sample
    save_file(
        {
            "image": image.contiguous(),
            "latent_mean": dist.mean.contiguous(),
            "latent_logvar": dist.logvar.contiguous(),
            "z": z.contiguous(),
            "decoded": decoded.contiguous(),
        },
        os.path.join(folder, "reference.safetensors"),
    )
    print(name, len(model.state_dict()), "tensors")


RESNET_TO_LDM = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def unet_to_ldm(state, config):
    """The original (LDM) single-file layout of a diffusers UNet state dict; checked below by
    converting it back with diffusers' own single-file converter."""
    L = config["layers_per_block"]
    attn_up = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        new = None
        fixed = {
            "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0",
            "conv_norm_out": "out.0",
            "conv_out": "out.2",
        }
        module = ".".join(parts[:-1])
        if module in fixed:
            new = fixed[module] + "." + parts[-1]
        elif parts[0] in ("down_blocks", "up_blocks", "mid_block"):
            if parts[0] == "mid_block":
                b, kind, j, rest = None, parts[1], int(parts[2]), parts[3:]
                base = {"resnets": [0, 2], "attentions": [1]}[kind][j]
                prefix = f"middle_block.{base}"
            else:
                b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
                if parts[0] == "down_blocks":
                    if kind == "downsamplers":
                        prefix, rest = f"input_blocks.{(b + 1) * (L + 1)}.0.op", rest[1:]
                    else:
                        idx = 1 + b * (L + 1) + j
                        prefix = f"input_blocks.{idx}.{0 if kind == 'resnets' else 1}"
                else:
                    if kind == "upsamplers":
                        idx = b * (L + 1) + L
                        prefix = f"output_blocks.{idx}.{2 if attn_up[b] else 1}"
                    else:
                        idx = b * (L + 1) + j
                        prefix = f"output_blocks.{idx}.{0 if kind == 'resnets' else 1}"
            rest = ".".join(rest)
            if kind == "resnets":
                for d, l in RESNET_TO_LDM:
                    if rest.startswith(d + "."):
                        rest = l + rest[len(d):]
            new = prefix + "." + rest
        if new is None:
            raise ValueError(key)
        out[new] = value
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in out.items()}, config)
    assert set(back) == set(state), set(back) ^ set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    return out


def unet(name, seed, sdxl):
    torch.manual_seed(seed)
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=24,
    )
    if sdxl:
        model = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 12,
            **common,
        )
    else:
        model = UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4,
            **common,
        )
    model = model.eval()
    randomize_(model, seed, scale=0.15)
    bf16_round_(model)
    folder = os.path.join(OUT, name)
    model.save_pretrained(folder, safe_serialization=True)
    ldm = unet_to_ldm(model.state_dict(), dict(model.config))
    save_file(
        {"model.diffusion_model." + k: v.contiguous() for k, v in ldm.items()},
        os.path.join(folder, "ldm.safetensors"),
    )
    g = torch.Generator().manual_seed(seed + 100)
    sample = torch.randn((2, 4, 8, 8), generator=g)
    timestep = torch.tensor([999.0, 17.0])
    context = torch.randn((2, 5, 24), generator=g)
    inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
    kwargs = {}
    if sdxl:
        inputs["text_embeds"] = torch.randn((2, 12), generator=g)
        inputs["time_ids"] = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0], [16.0, 12.0, 2.0, 1.0, 8.0, 8.0]])
        kwargs["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    with torch.no_grad():
        out = model(sample, timestep, context, **kwargs).sample
        # ControlNet-style residuals: one per down-block output, and the mid block's.
        shapes = [(2, 16, 8, 8), (2, 16, 8, 8), (2, 16, 4, 4), (2, 32, 4, 4)]
        residuals = [0.5 * torch.randn(s, generator=g) for s in shapes]
        mid = 0.5 * torch.randn((2, 32, 4, 4), generator=g)
        controlled = model(
            sample,
            timestep,
            context,
            down_block_additional_residuals=tuple(residuals),
            mid_block_additional_residual=mid,
            **kwargs,
        ).sample
    tensors = {k: v.contiguous() for k, v in inputs.items()}
    tensors["out"] = out.contiguous()
    tensors["controlled_out"] = controlled.contiguous()
    tensors["mid_block_res_sample"] = mid.contiguous()
    for i, r in enumerate(residuals):
        tensors[f"down_block_res_samples.{i}"] = r.contiguous()
    save_file(tensors, os.path.join(folder, "reference.safetensors"))
    print(name, len(model.state_dict()), "tensors")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    unet("unet_sd", 4, False)
    unet("unet_sdxl", 5, True)
    vae("vae", 3)
    clip_text("clip_text_quick_gelu", "quick_gelu", 1)
    clip_text("clip_text_gelu", "gelu", 2)
