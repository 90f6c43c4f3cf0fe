#!/usr/bin/env bash
# Build, push and save the operator and trainer images with the container engine this machine
# has (docker, podman or buildah), tagged with the chart's appVersion.
#
#   scripts/images.sh build [--torch cpu] [operator|trainer]...   both images when none is named
#   scripts/images.sh push REGISTRY [--torch cpu]    tag as REGISTRY/operator, REGISTRY/trainer and push
#   scripts/images.sh save DIR [--torch cpu]         write operator.tar and trainer.tar (for
#                                                    `kind load image-archive`, `k3d image import`)
#   scripts/images.sh engine                         print the engine after the set-up below
#   scripts/images.sh name operator|trainer [--torch cpu]   print an image's local name
#   scripts/images.sh install                        install buildah, podman and runc (root, apt)
#   scripts/images.sh prune                          podman/buildah: remove the layer cache and the
#                                                    working containers of interrupted builds
#
# Images are named as the chart's defaults (ghcr.io/chatbot-training/operator:<appVersion>,
# .../trainer:<appVersion>), so a cluster that loads them runs the chart unchanged.
# `--torch cpu` builds the trainer with a CPU build of torch (tag <appVersion>-cpu): a local
# wheel torch-<pin>+cpu from pip's find-links (PIP_FIND_LINKS, pip.conf), else PyTorch's CPU
# index. A llama-cpp-python wheel cached by scripts/bootstrap.sh --llama is used instead of
# compiling it again in the image.
#
# podman and buildah get the project's own configuration (CONTAINERS_CONF,
# CONTAINERS_STORAGE_CONF), with the image store in ~/.cache/chatbot-training/containers:
# the runc runtime, cgroupfs, no default ulimits (containers inside unprivileged sandboxes
# cannot raise them), chroot isolation for builds, overlay storage where the kernel mounts it,
# vfs otherwise. CHATBOT_CONTAINERS_CONFIG=system keeps the engine's own configuration.
#
# Base image: the Dockerfiles build on docker.io/library/python:3.11-slim-bookworm. When no
# registry can be reached, a local image of the same Debian release and Python minor version is
# made once with debootstrap (root; ~6 min) from the Debian mirror apt uses, and the builds use
# it (--build-arg BASE_IMAGE). CHATBOT_BASE_IMAGE=IMAGE picks any other base.
#
# Environment: CHATBOT_CONTAINER_ENGINE (docker|podman|buildah), CHATBOT_IMAGE_PREFIX
# (default ghcr.io/chatbot-training), CHATBOT_BASE_IMAGE, CHATBOT_CONTAINERS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${CHATBOT_CACHE_DIR:-$HOME/.cache/chatbot-training}
STATE=${CHATBOT_CONTAINERS_DIR:-$CACHE/containers}
VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' helm/chatbot-training/Chart.yaml)
PREFIX=${CHATBOT_IMAGE_PREFIX:-ghcr.io/chatbot-training}
PYTHON_MINOR=3.11
DEBIAN_RELEASE=bookworm
PUBLIC_BASE=docker.io/library/python:$PYTHON_MINOR-slim-$DEBIAN_RELEASE
LOCAL_BASE=localhost/chatbot-training/python:$PYTHON_MINOR-$DEBIAN_RELEASE
TORCH_VERSION=$(sed -n 's/^torch==//p' trainer-image/constraints.txt)
LLAMA_VERSION=$(sed -n 's/^llama-cpp-python==//p' trainer-image/constraints.txt)
NICE=${CHATBOT_NICE-nice -n 10}

log() { echo "images: $*" >&2; }
die() { echo "images: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------ engine

configure_containers() {
  # The project's configuration for podman and buildah (see the header).
  [ "${CHATBOT_CONTAINERS_CONFIG:-}" = system ] && return 0
  local driver=${CHATBOT_STORAGE_DRIVER:-}
  mkdir -p "$STATE"
  if [ -z "$driver" ]; then
    if [ -f "$STATE/driver" ]; then
      driver=$(cat "$STATE/driver")
    else
      driver=vfs
      local probe
      probe=$(mktemp -d "$STATE/.probe.XXXXXX")
      mkdir -p "$probe"/{lower,upper,work,merged}
      if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
          "$probe/merged" 2>/dev/null; then
        umount "$probe/merged"
        driver=overlay
      fi
      rm -rf "$probe"
      echo "$driver" > "$STATE/driver"
    fi
  fi
  cat > "$STATE/storage.conf" <<EOF
[storage]
driver = "$driver"
graphroot = "$STATE/storage-$driver"
runroot = "$STATE/run-$driver"
EOF
  {
    echo '[containers]'
    echo 'default_ulimits = []'
    echo '[engine]'
    echo 'cgroup_manager = "cgroupfs"'
    echo 'events_logger = "file"'
    if command -v runc >/dev/null; then echo 'runtime = "runc"'; fi
  } > "$STATE/containers.conf"
  export CONTAINERS_STORAGE_CONF=$STATE/storage.conf CONTAINERS_CONF=$STATE/containers.conf
  export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
}

pick_engine() {
  local engine=${CHATBOT_CONTAINER_ENGINE:-}
  if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
    elif command -v podman >/dev/null; then engine=podman
    elif command -v buildah >/dev/null; then engine=buildah
    else
      die "no container engine: install docker, podman or buildah (as root on Debian/Ubuntu: scripts/images.sh install)"
    fi
  fi
  case $engine in
    docker) ;;
    podman|buildah) configure_containers ;;
    *) die "CHATBOT_CONTAINER_ENGINE=$engine: use docker, podman or buildah" ;;
  esac
  ENGINE=$engine
}

install_engine() {
  [ "$(id -u)" = 0 ] || die "installing needs root"
  command -v apt-get >/dev/null || die "installing needs apt-get (Debian/Ubuntu)"
  log "installing buildah, podman, runc and debootstrap with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    buildah podman runc debootstrap >&2
}

image_exists() {
  case $ENGINE in
    docker) docker image inspect "$1" >/dev/null 2>&1 ;;
    podman) podman image exists "$1" ;;
    buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
  esac
}

# ------------------------------------------------------------------------------ base image

registry_reachable() {
  # Docker Hub answers /v2/ with 401 when it can be reached.
  python3 - <<'EOF' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen("https://registry-1.docker.io/v2/", timeout=10)
except urllib.error.HTTPError as exc:
    sys.exit(0 if exc.code == 401 else 1)
except Exception:
    sys.exit(1)
EOF
}

debian_mirror() {
  # The Debian mirror apt is configured with (deb822 .sources or one-line lists).
  local mirror
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '/^URIs:/ {uri=$2} /^Suites:/ && / '"$DEBIAN_RELEASE"'( |$)/ {print uri; exit}')
  [ -n "$mirror" ] || mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '$1 == "deb" && $3 == "'"$DEBIAN_RELEASE"'" {print $2; exit}')
  echo "${mirror:-http://deb.debian.org/debian}"
}

make_local_base() {
  image_exists "$LOCAL_BASE" && return 0
  [ "$(id -u)" = 0 ] || die "no registry reachable and not root: cannot make a local base image (set CHATBOT_BASE_IMAGE)"
  command -v debootstrap >/dev/null || install_engine
  local dir=$STATE/base rootfs=$STATE/base/rootfs
  mkdir -p "$dir"
  if [ ! -f "$rootfs.complete" ]; then
    local mirror
    mirror=$(debian_mirror)
    log "no registry reachable: making a local $DEBIAN_RELEASE + Python $PYTHON_MINOR base with debootstrap from $mirror (~6 min)"
    rm -rf "$rootfs"
    $NICE debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
      "$DEBIAN_RELEASE" "$rootfs" "$mirror" > "$dir/debootstrap.log" 2>&1 \
      || die "debootstrap failed, see $dir/debootstrap.log"
    touch "$rootfs.complete"
  fi
  local python
  python=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$python" = "$PYTHON_MINOR" ] || die "the local base has Python $python, not $PYTHON_MINOR"
  # Certificates this machine trusts beyond Debian's (e.g. a TLS-inspecting proxy), so that
  # pip in the build reaches PyPI as it does on the host.
  if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 \
      || cat /usr/local/share/ca-certificates/*.crt >> "$rootfs/etc/ssl/certs/ca-certificates.crt"
  fi
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  log "importing the local base image $LOCAL_BASE"
  local tarball=$dir/rootfs.tar
  tar -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "$tarball" .
  local env_path=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  case $ENGINE in
    docker)
      docker import --change "ENV $env_path" --change "ENV LANG=C.UTF-8" \
        --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" --change 'CMD ["python3"]' \
        "$tarball" "$LOCAL_BASE" >/dev/null ;;
    podman|buildah)
      local ctr
      ctr=$(buildah from scratch)
      buildah add --quiet "$ctr" "$tarball" / >/dev/null
      buildah config --env "$env_path" --env LANG=C.UTF-8 \
        --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --cmd python3 "$ctr"
      buildah commit --quiet "$ctr" "$LOCAL_BASE" >/dev/null
      buildah rm "$ctr" >/dev/null ;;
  esac
  rm -f "$tarball"
}

base_image() {
  # Prints the BASE_IMAGE build argument; empty means the Dockerfiles' default (the public one).
  if [ -n "${CHATBOT_BASE_IMAGE:-}" ]; then echo "$CHATBOT_BASE_IMAGE"; return; fi
  if image_exists "$PUBLIC_BASE" || registry_reachable; then return; fi
  make_local_base
  echo "$LOCAL_BASE"
}

# ------------------------------------------------------------------------------ build

image_name() {  # image_name operator|trainer → local name
  local tag=$VERSION
  [ "$1" = trainer ] && [ "$TORCH" = cpu ] && tag=$VERSION-cpu
  echo "$PREFIX/$1:$tag"
}

stage_wheels() {
  # trainer-image/wheels/torch/: a CPU torch wheel; trainer-image/wheels/llama-cpp-python/: the
  # cached llama-cpp-python wheel (each in its own folder: one changing keeps the other's layers).
  local dest=trainer-image/wheels
  find "$dest" -name '*.whl' -delete
  if [ "$TORCH" = cpu ]; then
    local links dir wheel=""
    links="${PIP_FIND_LINKS:-} $(pip3 config get global.find-links 2>/dev/null || true)"
    for dir in $links; do
      dir=${dir#file://}
      [ -d "$dir" ] || continue
      wheel=$(ls "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-cp311-*linux*_"$(uname -m)".whl 2>/dev/null | head -n1 || true)
      [ -n "$wheel" ] && break
    done
    if [ -n "$wheel" ]; then
      log "torch: local CPU wheel $(basename "$wheel")"
      ln "$wheel" "$dest/torch/" 2>/dev/null || cp "$wheel" "$dest/torch/"
    else
      log "torch: PyTorch's CPU index"
      BUILD_ARGS+=(--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)
    fi
  fi
  local llama
  llama=$(ls "$CACHE"/wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$llama" ]; then
    log "llama-cpp-python: cached wheel $(basename "$llama")"
    ln "$llama" "$dest/llama-cpp-python/" 2>/dev/null || cp "$llama" "$dest/llama-cpp-python/"
  fi
  if find "$dest" -name '*.whl' | grep -q .; then BUILD_ARGS+=(--build-arg LOCAL_WHEELS=1); fi
}

build_one() {
  local which=$1 dockerfile name
  case $which in
    operator) dockerfile=operator/Dockerfile ;;
    trainer) dockerfile=trainer-image/Dockerfile ;;
    *) die "unknown image $which (operator or trainer)" ;;
  esac
  name=$(image_name "$which")
  BUILD_ARGS=()
  [ -n "$BASE" ] && BUILD_ARGS+=(--build-arg "BASE_IMAGE=$BASE")
  if [ "$which" = trainer ]; then
    trap 'find "$REPO/trainer-image/wheels" -name "*.whl" -delete' EXIT
    stage_wheels
  fi
  log "building $name with $ENGINE (${BASE:-public base})"
  local start=$SECONDS
  case $ENGINE in
    docker) $NICE docker build -f "$dockerfile" -t "$name" "${BUILD_ARGS[@]}" . ;;
    podman) $NICE podman build --layers --isolation chroot -f "$dockerfile" -t "$name" "${BUILD_ARGS[@]}" . ;;
    buildah) $NICE buildah bud --layers --isolation chroot -f "$dockerfile" -t "$name" "${BUILD_ARGS[@]}" . ;;
  esac
  [ "$which" = trainer ] && find trainer-image/wheels -name '*.whl' -delete
  log "built $name in $((SECONDS - start)) s ($(image_size "$name"))"
}

image_size() {
  local bytes
  case $ENGINE in
    docker) bytes=$(docker image inspect -f '{{.Size}}' "$1") ;;
    podman) bytes=$(podman image inspect -f '{{.Size}}' "$1") ;;
    buildah) bytes=$(buildah inspect --type image "$1" | python3 -c \
               'import json, sys; print(sum(json.load(sys.stdin)["Docker"]["rootfs"].get("sizes", [0])))' 2>/dev/null || echo 0) ;;
  esac
  echo "$((bytes / 1000000)) MB"
}

cmd_build() {
  local images=()
  for arg in "$@"; do images+=("$arg"); done
  [ ${#images[@]} -gt 0 ] || images=(operator trainer)
  BASE=$(base_image)
  for which in "${images[@]}"; do build_one "$which"; done
}

cmd_push() {
  local registry=${1:-}
  [ -n "$registry" ] || die "usage: scripts/images.sh push REGISTRY (e.g. ghcr.io/you, localhost:5000)"
  registry=${registry%/}
  for which in operator trainer; do
    local name target
    name=$(image_name "$which")
    target=$registry/$which:${name##*:}
    image_exists "$name" || die "$name is not built: make images first"
    log "pushing $target"
    case $ENGINE in
      docker) docker tag "$name" "$target" && docker push "$target" ;;
      podman) podman tag "$name" "$target" && podman push "$target" ;;
      buildah) buildah tag "$name" "$target" && buildah push "$target" ;;
    esac
  done
}

cmd_save() {
  local dir=${1:-}
  [ -n "$dir" ] || die "usage: scripts/images.sh save DIR"
  mkdir -p "$dir"
  for which in operator trainer; do
    local name
    name=$(image_name "$which")
    log "saving $name to $dir/$which.tar"
    case $ENGINE in
      docker) docker save -o "$dir/$which.tar" "$name" ;;
      podman) podman save --format docker-archive -o "$dir/$which.tar" "$name" ;;
      buildah) buildah push "$name" "docker-archive:$dir/$which.tar:$name" ;;
    esac
  done
}

TORCH=cuda
ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --torch) TORCH=${2:?--torch cpu|cuda}; shift 2 ;;
    --torch=*) TORCH=${1#--torch=}; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
case $TORCH in cpu|cuda) ;; *) die "--torch $TORCH: use cpu or cuda" ;; esac
set -- "${ARGS[@]+"${ARGS[@]}"}"
command=${1:-build}
[ $# -gt 0 ] && shift

case $command in
  install) install_engine ;;
  engine) pick_engine; echo "$ENGINE" ;;
  name) echo "$(image_name "${1:?operator or trainer}")" ;;
  build) pick_engine; cmd_build "$@" ;;
  push) pick_engine; cmd_push "$@" ;;
  save) pick_engine; cmd_save "$@" ;;
  base) pick_engine; base_image ;;
  env) pick_engine; echo "ENGINE=$ENGINE"; [ -n "${CONTAINERS_CONF:-}" ] \
        && echo "CONTAINERS_CONF=$CONTAINERS_CONF" && echo "CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF" \
        && echo "BUILDAH_ISOLATION=$BUILDAH_ISOLATION"; true ;;
  prune) pick_engine
         case $ENGINE in
           docker) die "docker keeps its own store: docker builder prune" ;;
           *) buildah rm --all >/dev/null; buildah rmi --prune >/dev/null; du -sh "$STATE" ;;
         esac ;;
  *) die "unknown command $command (build, push, save, engine, env, base, name, install, prune)" ;;
esac
