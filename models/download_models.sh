#!/usr/bin/env bash
# Download the official Stable Cascade weights from the Hugging Face repo stabilityai/StableWurst
# (and the saliency network from the official GitHub repository Stability-AI/StableCascade)
# into this folder (the paths the configs in configs/ expect). Never run by the tests.
#
#   bash models/download_models.sh                      # essential + big Stage C + big Stage B (bf16)
#   bash models/download_models.sh essential c-lite b-lite
#   bash models/download_models.sh all --fp32
#   bash models/download_models.sh saliency             # only the saliency network (451 kB)
#
# Groups: essential (stage_a, previewer, effnet_encoder, saliency_model.pt), c-big, c-lite, b-big,
#         b-lite, controlnet, lora, saliency, all. Weights are bf16 unless --fp32 (only bfloat16 or
#         float32 work; fp16 overflows).
# Uses `huggingface-cli download` when installed (resumable, honours HF_TOKEN / HF_HOME), else curl.
set -euo pipefail

REPO="stabilityai/StableWurst"
HERE="$(cd "$(dirname "$0")" && pwd)"
SUFFIX="_bf16"
GROUPS_WANTED=()
for arg in "$@"; do
  case "$arg" in
    --fp32) SUFFIX="" ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    essential|c-big|c-lite|b-big|b-lite|controlnet|lora|saliency|all) GROUPS_WANTED+=("$arg") ;;
    *) echo "error: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#GROUPS_WANTED[@]} -eq 0 ] && GROUPS_WANTED=(essential c-big b-big)

files_of() {
  case "$1" in
    essential)  echo "stage_a.safetensors previewer.safetensors effnet_encoder.safetensors" ;;
    c-big)      echo "stage_c${SUFFIX}.safetensors" ;;
    c-lite)     echo "stage_c_lite${SUFFIX}.safetensors" ;;
    b-big)      echo "stage_b${SUFFIX}.safetensors" ;;
    b-lite)     echo "stage_b_lite${SUFFIX}.safetensors" ;;
    controlnet) echo "controlnet/canny.safetensors controlnet/inpainting.safetensors controlnet/super_resolution.safetensors" ;;
    lora)       echo "lora/lora_fernando_10k.safetensors" ;;
    saliency)   echo "" ;;  # fetch_saliency (GitHub, not Hugging Face)
    all)        for g in essential c-big c-lite b-big b-lite controlnet lora; do files_of "$g"; done ;;
  esac
}

fetch() {  # $1 = path in the repo; saved as models/<basename>
  local src="$1" name dst
  name="$(basename "$src")"
  dst="$HERE/$name"
  if [ -s "$dst" ]; then echo "have $name"; return; fi
  echo "downloading $name"
  if command -v huggingface-cli >/dev/null 2>&1; then
    huggingface-cli download "$REPO" "$src" --local-dir "$HERE/.hf" >/dev/null
    mv "$HERE/.hf/$src" "$dst"
  else
    curl -fL --retry 3 -C - -o "$dst.part" "https://huggingface.co/$REPO/resolve/main/$src"
    mv "$dst.part" "$dst"
  fi
}

# The saliency network (MicroResNet) of SmartCrop (crop: smart) and the InpaintFilter masks: shipped
# in-tree by the official repository (not on Hugging Face); a torch pickle of a plain state dict.
SALIENCY_URL="https://raw.githubusercontent.com/Stability-AI/StableCascade/master/modules/cnet_modules/inpainting/saliency_model.pt"
SALIENCY_BYTES=451123

fetch_saliency() {
  local dst="$HERE/saliency_model.pt"
  if [ -s "$dst" ]; then echo "have saliency_model.pt"; return; fi
  echo "downloading saliency_model.pt"
  curl -fL --retry 3 -o "$dst.part" "$SALIENCY_URL"
  local size
  size=$(wc -c < "$dst.part" | tr -d ' ')
  if [ "$size" != "$SALIENCY_BYTES" ]; then
    echo "error: saliency_model.pt has $size bytes, expected $SALIENCY_BYTES (kept as $dst.part)" >&2; exit 1
  fi
  mv "$dst.part" "$dst"
}

for group in "${GROUPS_WANTED[@]}"; do
  case "$group" in essential|saliency|all) fetch_saliency ;; esac
  for f in $(files_of "$group"); do fetch "$f"; done
done
echo "done: weights are in $HERE (see models/README.md)"
