#!/usr/bin/env bash
# Build the imgclf image from the repository (CPU by default).
#
#   docker/build.sh                    # CPU image, tagged imgclf:latest
#   docker/build.sh --cuda             # CUDA base image and CUDA wheels of torch
#   docker/build.sh --tag me/imgclf:1  # another tag; further arguments go to `docker build`
#
# IMGCLF_CUDA_BASE and IMGCLF_CUDA_TORCH_INDEX choose the CUDA base and wheel index.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="${IMGCLF_IMAGE:-imgclf:latest}"
cuda_base="${IMGCLF_CUDA_BASE:-nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04}"
cuda_index="${IMGCLF_CUDA_TORCH_INDEX:-https://download.pytorch.org/whl/cu126}"
build_args=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --cuda)
            build_args+=(--build-arg "BASE_IMAGE=${cuda_base}" --build-arg "TORCH_INDEX_URL=${cuda_index}")
            shift
            ;;
        --tag)
            [[ $# -ge 2 ]] || { echo "build.sh: --tag needs a value" >&2; exit 2; }
            tag="$2"
            shift 2
            ;;
        -h | --help)
            sed -n '2,9p' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *)
            break
            ;;
    esac
done

exec docker build --file "${repo_root}/docker/Dockerfile" --tag "${tag}" \
    ${build_args[@]+"${build_args[@]}"} "$@" "${repo_root}"
