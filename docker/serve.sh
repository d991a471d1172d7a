#!/usr/bin/env bash
# Serve a model over HTTP from the image: the page at http://127.0.0.1:PORT/, the API at /predict.
#
#   docker/serve.sh                         # the weights shipped in the image, port 8000
#   docker/serve.sh 9000                    # the shipped weights on port 9000
#   docker/serve.sh runs/fashion 9000       # a host run directory (or checkpoint, or .onnx file)
#   docker/serve.sh model.onnx 8000 --allow-private-urls   # further arguments go to `imgclf serve`
#
# The port is published on 127.0.0.1 only; IMGCLF_PUBLISH=0.0.0.0 publishes it on every
# interface. The image's HEALTHCHECK asks the server for /health. IMGCLF_GPUS, IMGCLF_IMAGE
# and IMGCLF_ENGINE work as in run.sh; with IMGCLF_ENGINE=buildah the server shares the
# host's network and listens on IMGCLF_PUBLISH:PORT itself.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=_engine.sh
source "$(dirname "${BASH_SOURCE[0]}")/_engine.sh"
image="${IMGCLF_IMAGE:-imgclf:latest}"
model="/app/weights/fashion_mnist_mobilenet_v3_small.pt"
port=8000
publish="${IMGCLF_PUBLISH:-127.0.0.1}"
run_args=(--rm --init --user "$(id -u):$(id -g)" --env HOME=/tmp)

# The first argument is the model, unless it is an option or a port number (and no such file).
if [[ $# -ge 1 && "$1" != -* ]] && ! [[ "$1" =~ ^[0-9]+$ && ! -e "$1" ]]; then
    [[ -e "$1" ]] || { echo "serve.sh: $1: no such run directory or model file" >&2; exit 2; }
    host_path="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
    if [[ -d "${host_path}" ]]; then
        run_args+=(--volume "${host_path}:/model:ro")
        model=/model
    else
        run_args+=(--volume "$(dirname "${host_path}"):/model:ro")
        model="/model/$(basename "${host_path}")"
    fi
    shift
fi
if [[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]]; then
    port="$1"
    shift
fi
if [[ -n "${IMGCLF_GPUS:-}" ]]; then
    run_args+=(--gpus "${IMGCLF_GPUS}")
fi

if [[ "${imgclf_engine}" == buildah ]]; then
    listen=(--host "${publish}" --port "${port}")
else
    run_args+=(--publish "${publish}:${port}:8000")
    listen=(--host 0.0.0.0 --port 8000)
fi

echo "serving ${model} on http://${publish}:${port}/ (Ctrl-C stops)" >&2
engine_run "${image}" "${run_args[@]}" -- serve --model "${model}" "${listen[@]}" "$@"
