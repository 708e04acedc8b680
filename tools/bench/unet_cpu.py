"""distorch (ndarray) against diffusers (PyTorch CPU) on an SD1.5-shaped UNet at half width.

One script, same machine, same weights and inputs:

    .venv/bin/python tools/bench/unet_cpu.py [--passes 3] [--threads 2]

It builds the UNet with random weights (fixed seed) in a temporary folder, times diffusers'
forward with torch on `--threads` threads, runs `cargo run --release --example unet_bench`
on the same folder and inputs, checks the two outputs agree, and prints the time ratio and
both profiles (torch.profiler's operator table; the Rust side reports its own breakdown).
"""

import argparse
import json
import os
import subprocess
import time

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/distorch-unet-bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = os.path.join(args.dir, "unet")
    model = UNet2DConditionModel(
        block_out_channels=(160, 320, 640, 640),
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
        sample_size=64,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn((2, 4, 64, 64), generator=g),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn((2, 77, 768), generator=g),
    }
    ins = os.path.join(args.dir, "inputs.safetensors")
    save_file(inputs, ins)

    with torch.no_grad():
        model(**inputs)  # warm-up
        times = []
        for _ in range(args.passes):
            t = time.perf_counter()
            ref = model(**inputs).sample
            times.append(time.perf_counter() - t)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(**inputs)
    torch_s = min(times)

    out = os.path.join(args.dir, "out.safetensors")
    cmd = [
        "cargo", "run", "--release", "--quiet", "--example", "unet_bench", "--",
        "--model", folder, "--inputs", ins, "--out", out, "--passes", str(args.passes),
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    ours = json.loads(res.stdout.strip().splitlines()[-1])
    got = load_file(out)["sample"]
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()

    print(f"# UNet: SD1.5 shape at half width, {params / 1e6:.0f} M parameters (f32), "
          f"batch 2 × 4×64×64, 77 tokens; {args.threads} threads; best of {args.passes}")
    print(f"diffusers_s={torch_s:.2f} distorch_s={ours['best_s']:.2f} "
          f"ratio={ours['best_s'] / torch_s:.2f} max_abs_diff={err:.2e} (output max {scale:.2f})")
    print("\n## distorch breakdown (ours)")
    for k, v in ours["breakdown"].items():
        print(f"{k}: {v}")
    print("\n## torch.profiler (diffusers), top operators by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
