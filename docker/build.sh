#!/usr/bin/env bash
# Build the imgclf image from the repository (CPU by default).
#
#   docker/build.sh                    # CPU image, tagged imgclf:latest
#   docker/build.sh --cuda             # CUDA base image and CUDA wheels of torch
#   docker/build.sh --tag me/imgclf:1  # another tag; other arguments go to `docker build`
#   docker/build.sh --pip-cert /etc/ssl/certs/corp.pem --build-arg PIP_INDEX_URL=https://mirror/simple
#
# --pip-cert FILE: a CA bundle for pip (a proxy that inspects TLS); --pip-conf FILE: a pip.conf
# (an index with credentials). Both reach the build as secrets, never a layer of the image.
# IMGCLF_CUDA_BASE and IMGCLF_CUDA_TORCH_INDEX choose the CUDA base and wheel index;
# IMGCLF_ENGINE=podman builds with podman (docker/_engine.sh).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=_engine.sh
source "${repo_root}/docker/_engine.sh"
tag="${IMGCLF_IMAGE:-imgclf:latest}"
cuda_base="${IMGCLF_CUDA_BASE:-nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04}"
cuda_index="${IMGCLF_CUDA_TORCH_INDEX:-https://download.pytorch.org/whl/cu126}"
build_args=()

secret() {  # secret ID FILE: a build secret, checked here so a typo is one clear line
    [[ -f "$2" ]] || { echo "build.sh: $2: no such file (for the $1 secret)" >&2; exit 2; }
    build_args+=(--secret "id=$1,src=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")")
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --cuda)
            build_args+=(--build-arg "BASE_IMAGE=${cuda_base}" --build-arg "TORCH_INDEX_URL=${cuda_index}")
            shift
            ;;
        --tag | --pip-cert | --pip-conf)
            [[ $# -ge 2 ]] || { echo "build.sh: $1 needs a value" >&2; exit 2; }
            case "$1" in
                --tag) tag="$2" ;;
                --pip-cert) secret pip_cert "$2" ;;
                --pip-conf) secret pip_conf "$2" ;;
            esac
            shift 2
            ;;
        -h | --help)
            sed -n '2,12p' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *)
            break
            ;;
    esac
done

engine_build --file "${repo_root}/docker/Dockerfile" --tag "${tag}" \
    ${build_args[@]+"${build_args[@]}"} "$@" "${repo_root}"
