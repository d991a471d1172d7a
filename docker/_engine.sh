# shellcheck shell=bash
# Sourced by build.sh, run.sh, run_volume.sh and serve.sh: which tool builds and runs the image.
#
#   IMGCLF_ENGINE=docker   the default when `docker` is on PATH
#   IMGCLF_ENGINE=podman   the same commands and flags (the default when only podman is there);
#                          builds with --format docker, so the image keeps its HEALTHCHECK
#   IMGCLF_ENGINE=buildah  runs without a container engine: `buildah from`, `buildah run`, `buildah rm`,
#                          isolation BUILDAH_ISOLATION (default chroot), the host's network.
#                          For machines where `podman run` cannot start a container (a sandbox
#                          that refuses setrlimit); builds still go through podman.
# Podman and buildah read their storage from CONTAINERS_STORAGE_CONF like any other run.

imgclf_engine="${IMGCLF_ENGINE:-}"
if [[ -z "${imgclf_engine}" ]]; then
    if command -v docker >/dev/null 2>&1; then
        imgclf_engine=docker
    elif command -v podman >/dev/null 2>&1; then
        imgclf_engine=podman
    else
        echo "${0##*/}: neither docker nor podman is on PATH (IMGCLF_ENGINE picks one)" >&2
        exit 2
    fi
fi
case "${imgclf_engine}" in
    docker | podman | buildah) ;;
    *)
        echo "${0##*/}: IMGCLF_ENGINE=${imgclf_engine}: expected docker, podman or buildah" >&2
        exit 2
        ;;
esac

# The command that builds: buildah mode builds with podman (docker's flags, --secret included).
engine_build() {
    if [[ "${imgclf_engine}" == docker ]]; then
        docker build "$@"
    else
        podman build --format docker "$@"
    fi
}

# engine_run IMAGE [docker run options...] -- [imgclf arguments...]
# Runs the image with docker's or podman's `run`, or translates the options for buildah.
engine_run() {
    local image="$1" options=()
    shift
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        options+=("$1")
        shift
    done
    [[ $# -gt 0 ]] && shift
    if [[ "${imgclf_engine}" != buildah ]]; then  # exec: signals reach docker's client, which passes them on
        exec "${imgclf_engine}" run "${options[@]}" "${image}" "$@"
    fi
    _buildah_run "${image}" "${options[@]}" -- "$@"
}

_buildah_run() {
    local image="$1" args=() container status=0
    shift
    while [[ "$1" != "--" ]]; do
        case "$1" in
            --user | --env | --volume) args+=("$1" "$2"); shift 2 ;;
            --tty) args+=(--tty); shift ;;
            # one process, removed at the end anyway; buildah has no port mapping (host network)
            --rm | --init | --interactive) shift ;;
            --shm-size | --publish) shift 2 ;;
            --gpus)
                echo "${0##*/}: IMGCLF_ENGINE=buildah cannot pass GPUs; use docker or podman" >&2
                exit 2
                ;;
            *)
                echo "${0##*/}: IMGCLF_ENGINE=buildah: unexpected option $1" >&2
                exit 2
                ;;
        esac
    done
    shift
    # `buildah run` runs the command it is given, not the image's ENTRYPOINT and CMD: spell
    # them out (docker/Dockerfile: entrypoint imgclf, default command the demo).
    if [[ $# -eq 0 ]]; then
        set -- demo --out /work/demo_output
    fi
    # named after this script's process, so that its caller can find it (docker/smoke.sh does)
    container="$(buildah from --pull-never --quiet --name "imgclf-run-$$" "${image}")"
    # In the background so that a SIGTERM to this script is handled now, not after the command
    # ends: buildah passes it on to the command, and the container is removed either way.
    _imgclf_interrupted=0
    trap '_imgclf_interrupted=1; kill -TERM "${_imgclf_run_pid}" 2>/dev/null' TERM INT
    buildah run --isolation "${BUILDAH_ISOLATION:-chroot}" "${args[@]}" "${container}" -- imgclf "$@" <&0 &
    _imgclf_run_pid=$!
    wait "${_imgclf_run_pid}" || status=$?
    if [[ "${_imgclf_interrupted}" == 1 ]]; then  # the signal ended the wait, not the command
        status=0
        wait "${_imgclf_run_pid}" || status=$?
    fi
    trap - TERM INT
    buildah rm "${container}" >/dev/null
    return "${status}"
}
