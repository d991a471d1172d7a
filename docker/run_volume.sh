#!/usr/bin/env bash
# Run an imgclf command with a host data folder mounted at /data.
#
#   docker/run_volume.sh DATA_DIR                   # imgclf train --data /data --out /work/runs/docker
#   docker/run_volume.sh ~/lists download /data/urls.csv --out /data/images
#   docker/run_volume.sh ~/images evaluate --model /work/runs/docker --data /data
#
# DATA_DIR is any host folder (created if missing); it is mounted read-write so `download`
# can write into it. Outputs go to IMGCLF_OUT (default ./imgclf_output), mounted at /work.
# IMGCLF_GPUS, IMGCLF_IMAGE and IMGCLF_ENGINE work as in run.sh.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,10p' "${BASH_SOURCE[0]}" >&2
    exit 2
fi

# shellcheck source-path=SCRIPTDIR source=_engine.sh
source "$(dirname "${BASH_SOURCE[0]}")/_engine.sh"
image="${IMGCLF_IMAGE:-imgclf:latest}"
mkdir -p "$1"
data_dir="$(cd "$1" && pwd)"
shift
out_dir="${IMGCLF_OUT:-${PWD}/imgclf_output}"
mkdir -p "${out_dir}"
out_dir="$(cd "${out_dir}" && pwd)"

if [[ $# -eq 0 ]]; then
    set -- train --data /data --out /work/runs/docker
fi

run_args=(--rm --shm-size 2g --user "$(id -u):$(id -g)" --env HOME=/tmp
          --volume "${data_dir}:/data" --volume "${out_dir}:/work")
if [[ -t 0 && -t 1 ]]; then
    run_args+=(--interactive --tty)
fi
if [[ -n "${IMGCLF_GPUS:-}" ]]; then
    run_args+=(--gpus "${IMGCLF_GPUS}")
fi

engine_run "${image}" "${run_args[@]}" -- "$@"
