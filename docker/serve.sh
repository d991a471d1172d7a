#!/usr/bin/env bash
# Serve a model over HTTP from the image: the page at http://127.0.0.1:PORT/, the API at /predict.
#
#   docker/serve.sh                         # the weights shipped in the image, port 8000
#   docker/serve.sh runs/fashion 9000       # a host run directory (or checkpoint, or .onnx file)
#   docker/serve.sh model.onnx 8000 --allow-private-urls   # further arguments go to `imgclf serve`
#
# The port is published on 127.0.0.1 only; IMGCLF_PUBLISH=0.0.0.0 publishes it on every
# interface. IMGCLF_GPUS and IMGCLF_IMAGE work as in run.sh.
set -euo pipefail

image="${IMGCLF_IMAGE:-imgclf:latest}"
model="/app/weights/fashion_mnist_mobilenet_v3_small.pt"
port=8000
docker_args=(--rm --init --user "$(id -u):$(id -g)" --env HOME=/tmp)

if [[ $# -ge 1 && "$1" != -* ]]; then
    [[ -e "$1" ]] || { echo "serve.sh: $1: no such run directory or model file" >&2; exit 2; }
    host_path="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
    if [[ -d "${host_path}" ]]; then
        docker_args+=(--volume "${host_path}:/model:ro")
        model=/model
    else
        docker_args+=(--volume "$(dirname "${host_path}"):/model:ro")
        model="/model/$(basename "${host_path}")"
    fi
    shift
fi
if [[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]]; then
    port="$1"
    shift
fi
if [[ -n "${IMGCLF_GPUS:-}" ]]; then
    docker_args+=(--gpus "${IMGCLF_GPUS}")
fi

docker_args+=(--publish "${IMGCLF_PUBLISH:-127.0.0.1}:${port}:8000"
              --health-cmd "python -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health')\""
              --health-interval 30s)

echo "serving ${model} on http://${IMGCLF_PUBLISH:-127.0.0.1}:${port}/ (Ctrl-C stops)" >&2
exec docker run "${docker_args[@]}" "${image}" serve --model "${model}" --host 0.0.0.0 --port 8000 "$@"
