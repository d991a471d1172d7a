#!/usr/bin/env bash
# Run one imgclf command in the image; with no command, the offline demo.
#
#   docker/run.sh                                   # imgclf demo -> ./imgclf_output/demo_output
#   docker/run.sh predict --model /app/weights/fashion_mnist_mobilenet_v3_small.pt /work/shoe.png
#   docker/run.sh --help                            # imgclf's own help
#
# The host folder IMGCLF_OUT (default ./imgclf_output) is /work in the container, so
# outputs land there, owned by you. IMGCLF_GPUS=all passes GPUs (needs a --cuda image and
# the NVIDIA container toolkit); IMGCLF_IMAGE picks the image (default imgclf:latest);
# IMGCLF_ENGINE picks docker, podman or buildah (docker/_engine.sh).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=_engine.sh
source "$(dirname "${BASH_SOURCE[0]}")/_engine.sh"
image="${IMGCLF_IMAGE:-imgclf:latest}"
out_dir="${IMGCLF_OUT:-${PWD}/imgclf_output}"
mkdir -p "${out_dir}"
out_dir="$(cd "${out_dir}" && pwd)"

# --shm-size: PyTorch DataLoader workers share batches through /dev/shm (64 MB by default).
run_args=(--rm --shm-size 2g --user "$(id -u):$(id -g)" --env HOME=/tmp
          --volume "${out_dir}:/work")
if [[ -t 0 && -t 1 ]]; then
    run_args+=(--interactive --tty)
fi
if [[ -n "${IMGCLF_GPUS:-}" ]]; then
    run_args+=(--gpus "${IMGCLF_GPUS}")
fi

engine_run "${image}" "${run_args[@]}" -- "$@"
