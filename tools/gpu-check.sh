#!/usr/bin/env bash
# The project's one GPU check, in two halves:
#
#   tools/gpu-check.sh build   # here, on a machine without a GPU: builds the CUDA binaries
#                              # into gpu-bin/ (ignored by git; carry it to the GPU machine)
#   tools/gpu-check.sh run     # on the GPU machine, from the repository root: runs them,
#                              # writing logs to $OUT (or gpu-out/) — one call, under 8 minutes
#
# What `run` runs, in order (each step's log is kept even when a later one fails):
#   1. the runtime tests on CUDA (DISTORCH_TEST_CUDA=1): homes, dtypes (f32/f16/bf16/fp8 at
#      every home, plan == store == bytes moved), streaming, re-patching;
#   2. the same tests with DISTORCH_TEST_CUDA_GPUS set when more than one GPU is visible;
#   3. the model parity tests on CUDA (every model against diffusers / transformers at f32,
#      resident and offloaded; and at f16 and bf16 against PyTorch's own run at that dtype,
#      tests/parity/half.rs);
#   4. offload_bench --backend cuda on an f32 and a bf16 file at 0/50/100 % offload, f32 and
#      bf16 compute (SD-UNet-sized stack: 24 layers, 240 MB in f32); each run first measures
#      the host-to-device upload bandwidth through pinned staging (`upload_gb_s`), and each
#      line gives the pass time over max(resident pass, bytes moved / bandwidth)
#      (`vs_bound`; the target is <= 1.10 at 100 % offload);
#   5. attention_bench --backend cuda at 16,384 and 32,768 tokens (12 heads of 128): at f16
#      the fused attention kernel (src/fused.rs), at f32 the blocked path; first call (kernel
#      compilation) and steady state;
#   6. flux_block_swap_bench --backend cuda at FLUX.1's widths (1 double + 2 single blocks,
#      1,246 MB of bf16 blocks, 4,096 image tokens): none, half and all blocks in host memory,
#      each swapped block crossing PCIe at its bf16 size;
#   7. `distorch generate image` on the demo checkpoint (written to /tmp first, ~2 GB): the
#      UNet on cuda:0 with 1 GB of virtual VRAM on the CPU, the text encoders on cuda:1 when a
#      second GPU is visible (else cuda:0), 256×256, 4 steps; and `generate flux` on its demo
#      folder with every block swapped to the CPU;
#   8. auto_bench --backend cuda (issue 21): the SD 1.5 UNet and the offload stack at
#      25/50/75 % budgets in interleave, tail and auto order, predicted against measured, the
#      link from a timed 256 MiB upload (the measured pinned bandwidth) — where uploads
#      overlap compute, the case auto is for.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
bin=gpu-bin

case "$mode" in
build)
  mkdir -p "$bin"
  exe=$(cargo test -p distorch-core --features test-cuda --test runtime --release --no-run \
    --message-format=json | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
  test -x "$exe" || { echo "no runtime test binary built" >&2; exit 1; }
  cp "$exe" "$bin/runtime-cuda"
  exe=$(cargo test -p distorch-models --features test-cuda --test parity --release --no-run \
    --message-format=json | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
  test -x "$exe" || { echo "no parity test binary built" >&2; exit 1; }
  cp "$exe" "$bin/parity-cuda"
  cargo build --release --features cuda --example offload_bench --example attention_bench \
    --example flux_block_swap_bench --example auto_bench
  cp target/release/examples/offload_bench "$bin/offload_bench-cuda"
  cp target/release/examples/attention_bench "$bin/attention_bench-cuda"
  cp target/release/examples/flux_block_swap_bench "$bin/flux_block_swap_bench-cuda"
  cp target/release/examples/auto_bench "$bin/auto_bench-cuda"
  cargo build --release -p distorch-cli --features cuda
  cp target/release/distorch "$bin/distorch-cuda"
  ls -l "$bin"
  ;;
run)
  out="${OUT:-gpu-out}"
  mkdir -p "$out"
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
  status=0
  DISTORCH_TEST_CUDA=1 timeout 240 "$bin/runtime-cuda" --test-threads 1 2>&1 |
    tee "$out/runtime-cuda.log" || status=1
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)
  if [ "$gpus" -gt 1 ]; then
    DISTORCH_TEST_CUDA=1 DISTORCH_TEST_CUDA_GPUS="$gpus" timeout 120 "$bin/runtime-cuda" \
      --test-threads 1 homes 2>&1 | tee "$out/runtime-cuda-2gpu.log" || status=1
  fi
  # The fixtures are read from the source tree (CARGO_MANIFEST_DIR is baked in at build
  # time; the tree travels with the working copy to the same path).
  timeout 180 "$bin/parity-cuda" --test-threads 1 2>&1 | tee "$out/parity-cuda.log" || status=1
  for file in f32 bf16; do
    for dtype in f32 bf16; do
      timeout 90 "$bin/offload_bench-cuda" --backend cuda --passes 3 --file-dtype "$file" \
        --dtype "$dtype" 2>&1 | tee -a "$out/offload-cuda.log" || status=1
    done
  done
  for tokens in 16384 32768; do
    for dtype in f16 f32; do
      timeout 45 "$bin/attention_bench-cuda" --backend cuda --dtype "$dtype" --tokens "$tokens" \
        2>&1 | tee -a "$out/attention-cuda.log" || status=1
    done
  done
  timeout 90 "$bin/flux_block_swap_bench-cuda" --backend cuda --side 64 --passes 3 2>&1 |
    tee "$out/flux-block-swap-cuda.log" || status=1
  clip=cuda:0
  if [ "$gpus" -gt 1 ]; then clip=cuda:1; fi
  DISTORCH_CACHE_DIR=/tmp/distorch-gpu-check timeout 120 "$bin/distorch-cuda" generate image \
    --prompt "a red fox in the snow" --steps 4 --width 256 --height 256 \
    --unet-compute-device cuda:0 --unet-virtual-vram-gb 1 --unet-donor-device cpu \
    --clip-compute-device "$clip" --out "$out/generate-cuda.png" 2>&1 |
    tee "$out/generate-cuda.log" || status=1
  DISTORCH_CACHE_DIR=/tmp/distorch-gpu-check timeout 60 "$bin/distorch-cuda" generate flux \
    --prompt "a red fox in the snow" --steps 4 --width 256 --height 256 \
    --unet-compute-device cuda:0 --blocks-to-swap 1 --single-blocks-to-swap 2 \
    --swap-device cpu --out "$out/flux-cuda.png" 2>&1 | tee "$out/flux-cuda.log" || status=1
  DISTORCH_CACHE_DIR=/tmp/distorch-gpu-check timeout 120 "$bin/auto_bench-cuda" --backend cuda \
    --latent 64 --passes 5 2>&1 | tee "$out/auto-cuda.log" || status=1
  DISTORCH_CACHE_DIR=/tmp/distorch-gpu-check timeout 60 "$bin/auto_bench-cuda" --backend cuda \
    --model stack --latent 32 --passes 5 2>&1 | tee "$out/auto-stack-cuda.log" || status=1
  exit "$status"
  ;;
*)
  echo "usage: tools/gpu-check.sh build|run" >&2
  exit 2
  ;;
esac
