#!/usr/bin/env bash
# Build the CPU image for real and run it, without a Docker engine or a registry (make docker-smoke).
#
#   docker/smoke.sh            # 20-70 minutes; removes what it made at the end
#   docker/smoke.sh --keep     # keep the image, the base and the build cache for the next run
#
# Needs root, podman, buildah, mmdebstrap, python3 and curl (make docker-smoke installs the first
# three). Steps: a Debian bookworm base made by mmdebstrap and imported with podman; the image
# built from docker/Dockerfile by docker/build.sh (podman, chroot isolation, build arguments
# only), its packages from this machine's pip registries (docker/host_pip.py); then, through
# docker/run.sh, run_volume.sh and serve.sh with IMGCLF_ENGINE=buildah: --help, the demo,
# predict with the shipped weights, evaluate on a bind-mounted DATA_DIR, and serve answering
# /health, /predict and the image's HEALTHCHECK. Prints a table of each step's result and time.
# Everything lives in IMGCLF_SMOKE_DIR (default /var/tmp/imgclf-docker-smoke), its own
# container storage included (overlay, else vfs), so no other image or container is touched.
#
# The steps are functions that step() calls by name, which shellcheck does not see:
# shellcheck disable=SC2317
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${IMGCLF_SMOKE_DIR:-/var/tmp/imgclf-docker-smoke}"
keep=0
case "${1:-}" in
    --keep) keep=1 ;;
    "") ;;
    *) sed -n '2,15p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac
for tool in podman buildah mmdebstrap python3 curl; do
    if ! command -v "${tool}" >/dev/null; then
        echo "smoke.sh: ${tool} not found (make docker-smoke installs podman, buildah and mmdebstrap)" >&2
        exit 2
    fi
done
[[ "$(id -u)" == 0 ]] || { echo "smoke.sh: run it as root (podman and buildah need it here)" >&2; exit 2; }

base=localhost/imgclf-base:bookworm
image=localhost/imgclf:smoke
weights=/app/weights/fashion_mnist_mobilenet_v3_small.pt
out="${work}/out"
mkdir -p "${work}/tmp" "${out}"
# Podman's and buildah's own storage and state for this run: nothing shared with other users.
export CONTAINERS_STORAGE_CONF="${work}/storage.conf" CONTAINERS_CONF="${work}/containers.conf"
export BUILDAH_ISOLATION=chroot  # this sandbox refuses the OCI runtime's setrlimit
export IMGCLF_IMAGE="${image}" IMGCLF_OUT="${out}" IMGCLF_ENGINE=buildah

cleanup() {
    if [[ ${keep} == 1 ]]; then
        echo "kept in ${work}: CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF} CONTAINERS_CONF=${CONTAINERS_CONF} podman images" >&2
        return
    fi
    buildah rm --all >/dev/null 2>&1 || true
    podman rmi --all --force >/dev/null 2>&1 || true
    # whatever podman left mounted under the storage, deepest first, before the folder goes
    findmnt -rn -o TARGET | grep "^${work}/" | sort -r | xargs -r umount -l || true
    rm -rf "${work}"
}
trap cleanup EXIT

results=()
failed=0
# step NAME COMMAND...: run it, time it, record it in the table; its output is in $work/NAME.log.
# Never call it under `if`, `||` or `&&`: bash turns `set -e` off inside such calls, and the
# steps rely on it. The command runs in its own process, in the background for the same reason.
# A step whose buildah or podman failed to re-execute itself ("sealing memfd copy: Device or
# resource busy": containers/storage copies its own binary into a sealed memfd, and this kernel
# refuses the seal now and then under load, before any command runs) is run again, twice at most.
reexec_failure="sealing memfd copy: Device or resource busy"
step() {
    local name="$1" start took status attempt note=""
    shift
    start=$(date +%s)
    echo "== ${name}" >&2
    for attempt in 1 2 3; do
        status=0
        "$@" >"${work}/${name}.log" 2>&1 &
        wait $! || status=$?
        if [[ ${status} == 0 ]] || ! grep -q "${reexec_failure}" "${work}/${name}.log"; then
            break
        fi
        echo "${name}: ${reexec_failure} (buildah's re-exec), run again" >&2
        note=" after ${attempt} re-exec failure(s)"
    done
    took=$(($(date +%s) - start))
    if [[ ${status} == 0 ]]; then
        results+=("$(printf '| %s | ok%s | %d s | %s |' "${name}" "${note}" "${took}" "$(tail -n 1 "${work}/${name}.log")")")
    else
        failed=1
        results+=("$(printf '| %s | FAIL (exit %d) | %d s | see %s |' "${name}" "${status}" "${took}" "${work}/${name}.log")")
        tail -n 30 "${work}/${name}.log" >&2
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

json_field() {  # json_field FILE KEY: a number from a JSON file, 3 decimals
    python3 -c 'import json, sys; print(round(json.load(open(sys.argv[1]))[sys.argv[2]], 3))' "$1" "$2"
}

# --- storage: overlay where the kernel allows it, else vfs (which copies every layer in full)
write_storage_conf() {
    printf '[storage]\ndriver = "%s"\ngraphroot = "%s/storage"\nrunroot = "%s/run"\n' \
        "$1" "${work}" "${work}" >"${CONTAINERS_STORAGE_CONF}"
}
# image_copy_tmp_dir: a commit stages its layer there (GBs here; /var/tmp by default)
printf '[engine]\ntmp_dir = "%s/tmp"\nimage_copy_tmp_dir = "%s/tmp"\n' "${work}" "${work}" >"${CONTAINERS_CONF}"
if [[ ! -f "${CONTAINERS_STORAGE_CONF}" ]]; then
    write_storage_conf overlay
    podman info >/dev/null 2>&1 || write_storage_conf vfs
fi

make_base() {
    if podman image exists "${base}"; then
        echo "${base}: kept from an earlier run"
        return
    fi
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "${work}/base.tar"
    podman import "${work}/base.tar" "${base}"
    rm -f "${work}/base.tar"
    podman image inspect --format "${base}: {{.Size}} bytes" "${base}"
}

build_image() {  # runs in its own process (step): mirror_pid is not local, the EXIT trap reads it
    local port args
    mirror_pid=""
    trap '[[ -z "${mirror_pid}" ]] || kill "${mirror_pid}"' EXIT
    # the same port every run when it is free: the index URLs are build arguments, part of the
    # build cache's key, so a --keep rerun reuses the torch layer
    port="${IMGCLF_SMOKE_MIRROR_PORT:-38517}"
    python3 -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "${port}" \
        2>/dev/null || port="$(free_port)"
    rm -rf "${work}/mirror"
    mapfile -t args < <(python3 "${repo_root}/docker/host_pip.py" "${work}/mirror" "${port}")
    echo "pip as on this machine: ${args[*]}"
    if [[ -d "${work}/mirror" ]]; then  # local folders among this machine's registries
        python3 -m http.server "${port}" --bind 127.0.0.1 --directory "${work}/mirror" >"${work}/mirror.log" 2>&1 &
        mirror_pid=$!
    fi
    IMGCLF_ENGINE=podman "${repo_root}/docker/build.sh" --tag "${image}" "${args[@]}" \
        --build-arg "BASE_IMAGE=${base}" --network host --pull=never
    podman image inspect --format "${image}: {{.Size}} bytes" "${image}"
}

inspect_image() {  # non-root, health check, entrypoint; no compiler, no build leftovers, weights
    local config container
    config="$(podman image inspect --format \
        '{{.Config.User}} {{json .Config.Healthcheck.Test}} {{json .Config.Entrypoint}}' "${image}")"
    echo "${config}"
    [[ "${config}" == '10001 ["CMD","python","/app/healthcheck.py"] ["imgclf"]' ]]
    container="$(buildah from --pull-never --quiet "${image}")"
    # shellcheck disable=SC2016  # expanded by the image's shell
    buildah run "${container}" -- sh -c '
        set -e
        test "$(id -u)" = 10001 && touch /work/probe    # the image user can write its /work
        ! command -v gcc && ! command -v cc             # no compiler
        test ! -e /root/.cache && test ! -e /src        # no pip cache, no build folder
        test -s /app/weights/fashion_mnist_mobilenet_v3_small.pt
        cd /opt/venv/lib/python3*/site-packages && du -sh /opt/venv torch nvidia triton   # where the size is
        echo "user $(id -u), /work writable, no compiler, no build leftovers, weights $(du -h /app/weights/*.pt | cut -f1)"'
    buildah rm "${container}" >/dev/null
}

run_help() {
    "${repo_root}/docker/run.sh" --help | tee "${out}/help.txt"
    local command  # every stage listed, whatever else the help lists beside them
    for command in download audit train evaluate predict export serve demo; do
        grep -q "^    ${command} " "${out}/help.txt" || { echo "imgclf --help does not list ${command}" >&2; return 1; }
    done
    echo "imgclf --help: $(wc -l <"${out}/help.txt") lines"
}

run_demo() {
    # README's 40-second look: 600 training images, 10 epochs
    "${repo_root}/docker/run.sh" demo --limit 60 --no-progress --out /work/demo_output trainer.epochs=10
    echo "demo --limit 60 trainer.epochs=10: test F1-macro $(json_field "${out}/demo_output/run/metrics.json" f1_macro)"
}

run_predict() {
    cp "${repo_root}/src/imgclf/demo_data/fashion_mnist/test/Trouser/t10k_05499.png" "${out}/trouser.png"
    "${repo_root}/docker/run.sh" predict --model "${weights}" --no-progress /work/trouser.png | tee "${out}/predict.csv"
    grep -q '^/work/trouser.png,ok,,Trouser,' "${out}/predict.csv"
    echo "predict a bundled Trouser: $(tail -n 1 "${out}/predict.csv" | cut -d, -f4,5)"
}

run_volume() {  # the demo's DATA_DIR, bind-mounted at /data: read from there and written to
    local data="${out}/demo_output/data" f1
    "${repo_root}/docker/run_volume.sh" "${data}" evaluate --model "${weights}" --data /data
    f1="$(json_field "${data}/evaluations/fashion_mnist_mobilenet_v3_small-test/metrics.json" f1_macro)"
    python3 -c 'import sys; sys.exit(float(sys.argv[1]) < 0.8)' "${f1}"
    echo "evaluate --model (shipped) --data /data: F1-macro ${f1}, written to DATA_DIR/evaluations/ on the host"
}

run_serve() {  # runs in its own process (step): serve_pid is not local, the EXIT trap reads it
    local port container server health frozen i
    port="$(free_port)"
    "${repo_root}/docker/serve.sh" "${port}" &
    serve_pid=$!
    trap '[[ -z "${serve_pid}" ]] || kill "${serve_pid}"' EXIT
    container="imgclf-run-${serve_pid}"  # _engine.sh names its container after serve.sh's process
    for i in $(seq 180); do
        health="$(curl -sf "http://127.0.0.1:${port}/health")" && break
        kill -0 "${serve_pid}"  # the server died: fail now
        [[ ${i} -lt 180 ]] && sleep 1
    done
    echo "GET /health after ${i} s: ${health}"
    curl -sf -F "file=@${out}/trouser.png" "http://127.0.0.1:${port}/predict" | tee "${out}/serve.json"
    echo
    grep -q '"Trouser"' "${out}/serve.json"
    # the image's HEALTHCHECK, in the server's container, as the server's user (as Docker runs it)
    buildah run --user "$(id -u):$(id -g)" "${container}" -- python /app/healthcheck.py
    # a server that stops answering is unhealthy: freeze it, check, thaw it
    server="$(pgrep -f -- "^/opt/venv/bin/python[0-9.]* /opt/venv/bin/imgclf serve .*--port ${port}")"
    kill -STOP "${server}"
    if frozen="$(buildah run --user "$(id -u):$(id -g)" "${container}" -- python /app/healthcheck.py 2>&1)"; then
        kill -CONT "${server}"
        echo "a frozen server was reported healthy: ${frozen}"
        return 1
    fi
    kill -CONT "${server}"
    echo "${frozen}"
    grep -q "^unhealthy: http://127.0.0.1:${port}/health: .*timed out" <<<"${frozen}"  # the check's own verdict
    kill -TERM "${serve_pid}"
    wait "${serve_pid}" || true
    serve_pid=""
    if buildah containers --quiet --filter "name=${container}" | grep -q .; then
        echo "${container} is left after serve.sh stopped"
        return 1
    fi
    echo "serve: /health, /predict and the HEALTHCHECK answered; a frozen server was unhealthy; stopped, container removed"
}

started=$(date +%s)
step base make_base
if [[ ${failed} == 0 ]]; then
    step build build_image
fi
if [[ ${failed} == 0 ]]; then  # an image to run
    step inspect inspect_image
    step help run_help
    step demo run_demo
    step predict run_predict
    step run_volume run_volume
    step serve run_serve
fi

echo
echo "docker/smoke.sh on $(date -u +%Y-%m-%d): $(nproc) CPU cores, storage $(podman info --format '{{.Store.GraphDriverName}}'), total $(($(date +%s) - started)) s"
if podman image exists "${image}"; then
    echo "image ${image}: $(podman image inspect --format '{{.Size}}' "${image}" | awk '{printf "%.2f GB", $1 / 1e9}')"
fi
echo "| step | result | time | last line of its log |"
echo "|---|---|---:|---|"
printf '%s\n' "${results[@]}"
exit "${failed}"
