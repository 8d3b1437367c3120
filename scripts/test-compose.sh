#!/usr/bin/env bash
# `make test-compose`: the compose deployment built and run on this machine, the CPU stack end to end.
#
#   1. docker, compose and debootstrap installed from Debian when missing (docker.io, docker-compose,
#      debootstrap); a docker daemon started when none answers (and only that one stopped at the end).
#   2. The cpu image built with BuildKit. With no reachable registry, its base is made from Debian's
#      archive (debootstrap | docker import, as local/debian:bookworm). pip's CA bundle on this host, if
#      it names one, goes in as the build secret pip_ca; a torch 2.13.0+cpu wheel in pip's find-links
#      folders is served to the build over the docker bridge (TORCH_INDEX), with no reachable PyTorch
#      index needed. BASE_IMAGE, TORCH_INDEX, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and PIP_TRUSTED_HOST
#      from the environment are passed as build arguments, PIP_CA as the CA secret.
#   3. Every compose file set validated with every profile (`config`), the gpu one included.
#   4. The cpu profile brought up four times: align-serve on a tiny Qwen2-VL and align-train running
#      ALIGN_MAX_STEPS GRPO steps against it over the compose network, weights pushed over http, tcp and
#      shm; then with compose.replicas.yaml (two servers). Each time: the trainer exits 0, every server
#      is healthy and serves weight_version = steps + 1; then `down -v`.
#   5. The build and run times and the image sizes printed.
#
# Images are kept (a second run reuses them); KEEP_IMAGES=0 removes them. Needs root on a fresh machine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TAG=${ALIGN_IMAGE_TAG:-0.1.0}
IMAGE=vlm-align/cpu:$TAG
PROJECT=${TEST_COMPOSE_PROJECT:-vlm-align-test}
STEPS=${ALIGN_MAX_STEPS:-3}
KEEP_IMAGES=${KEEP_IMAGES:-1}
WHEEL_PORT=${TORCH_WHEEL_PORT:-8765}  # fixed: the build argument naming it is part of the layer cache key
LOCAL_BASE=local/debian:bookworm
WORK=$(mktemp -d /tmp/vlm-align-compose.XXXXXX)
DOCKERD_PID="" WHEEL_PID="" UP=()

say() { printf '== %s\n' "$*"; }
fail() { printf 'test-compose: FAILED: %s\n' "$*" >&2; exit 1; }
elapsed() { echo $(( $(date +%s) - $1 )); }

cleanup() {
  local code=$?
  if [ ${#UP[@]} -gt 0 ]; then
    [ $code -ne 0 ] && "${UP[@]}" logs --no-color --tail 40 >&2 2>&1 || true
    "${UP[@]}" down -v $([ "$KEEP_IMAGES" = 0 ] && echo --rmi all) >/dev/null 2>&1 || true
  fi
  [ -n "$WHEEL_PID" ] && kill "$WHEEL_PID" 2>/dev/null || true
  if [ -n "$DOCKERD_PID" ]; then
    say "stopping the docker daemon this run started (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  fi
  rm -rf "$WORK"
  exit $code
}
trap cleanup EXIT

# ---- 1. tools and daemon --------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || fail "install ${missing[*]} (Debian/Ubuntu package names)"
  say "installing ${missing[*]} from the distribution"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A client that builds with BuildKit: docker 23+ does it through its buildx plugin; 20.10 (Debian 12's)
# has it built in. A newer client without the plugin refuses DOCKER_BUILDKIT=1.
DOCKER=""
for c in $(type -ap docker) /usr/bin/docker; do
  major=$("$c" --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
  if [ -n "$major" ] && { [ "$major" -lt 23 ] || "$c" buildx version >/dev/null 2>&1; }; then DOCKER=$c; break; fi
done
[ -n "$DOCKER" ] || fail "no docker client that builds with BuildKit (docker 23+ needs its buildx plugin)"
export DOCKER_BUILDKIT=1

if ! "$DOCKER" info >/dev/null 2>&1; then
  say "no docker daemon answers: starting dockerd (log: $WORK/dockerd.log)"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; fail "dockerd did not start"; }
fi

if "$DOCKER" compose version >/dev/null 2>&1; then
  COMPOSE=("$DOCKER" compose)
else
  COMPOSE=(docker-compose)
fi
say "docker: $("$DOCKER" --version); compose: $("${COMPOSE[@]}" version --short)"

# ---- 2. the cpu image --------------------------------------------------------------------------------
build_args=()
default_base=$(sed -n 's/^ARG BASE_IMAGE=//p' docker/Dockerfile.cpu)
if [ -n "${BASE_IMAGE:-}" ]; then
  build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
elif ! "$DOCKER" image inspect "$default_base" >/dev/null 2>&1 \
     && ! timeout 300 "$DOCKER" pull -q "$default_base" >/dev/null 2>&1; then
  if ! "$DOCKER" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    say "no registry serves $default_base: making $LOCAL_BASE from Debian's archive (debootstrap)"
    start=$(date +%s)
    # shellcheck disable=SC2086  # DEBIAN_MIRROR: a mirror URL, or empty for debootstrap's default
    debootstrap --variant=minbase bookworm "$WORK/rootfs" ${DEBIAN_MIRROR:-} >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    tar -C "$WORK/rootfs" -c . | "$DOCKER" import - "$LOCAL_BASE" >/dev/null
    rm -rf "$WORK/rootfs"
    say "made $LOCAL_BASE in $(elapsed "$start") s"
  fi
  build_args+=(--build-arg "BASE_IMAGE=$LOCAL_BASE")
fi

# The CA bundle pip uses on this host (PIP_CA overrides): a TLS-inspecting proxy's CA reaches the build.
host_pip() { python3 -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p"; }
ca=${PIP_CA:-${PIP_CERT:-$(host_pip cert | head -1)}}
if [ -n "$ca" ]; then
  [ -r "$ca" ] || fail "CA bundle $ca is not readable"
  build_args+=(--secret "id=pip_ca,src=$ca")
fi

trusted=${PIP_TRUSTED_HOST:-}
if [ -z "${TORCH_INDEX:-}" ]; then
  torch=$(sed -n 's/^ *torch=torch==\([^ ]*\)$/\1/p' scripts/install-deps.sh)
  wheel=""
  for dir in ${PIP_FIND_LINKS:-} $(host_pip find-links); do
    for w in "$dir"/torch-"$torch"-cp311-*linux*_x86_64.whl; do [ -f "$w" ] && wheel=$w && break 2; done
  done
  if [ -n "$wheel" ]; then
    bridge=$("$DOCKER" network inspect bridge --format '{{(index .IPAM.Config 0).Gateway}}')
    mkdir -p "$WORK/torch-index/torch"
    ln -s "$wheel" "$WORK/torch-index/torch/"
    python3 -m http.server --bind "$bridge" --directory "$WORK/torch-index" "$WHEEL_PORT" >"$WORK/wheel-server.log" 2>&1 &
    WHEEL_PID=$!
    for _ in $(seq 20); do python3 -c "import urllib.request as r; r.urlopen('http://$bridge:$WHEEL_PORT/torch/')" \
      2>/dev/null && break; sleep 0.5; done
    kill -0 "$WHEEL_PID" 2>/dev/null || fail "cannot serve $wheel on $bridge:$WHEEL_PORT (TORCH_WHEEL_PORT): $(cat "$WORK/wheel-server.log")"
    say "serving $(basename "$wheel") to the build at http://$bridge:$WHEEL_PORT/ (TORCH_INDEX)"
    build_args+=(--build-arg "TORCH_INDEX=http://$bridge:$WHEEL_PORT/")
    trusted="$trusted $bridge"
  fi
else
  build_args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
fi
[ -n "${trusted// /}" ] && build_args+=(--build-arg "PIP_TRUSTED_HOST=${trusted# }")
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  [ -n "${!var:-}" ] && build_args+=(--build-arg "$var=${!var}")
done

say "building $IMAGE (log: $WORK/build.log): docker build -f docker/Dockerfile.cpu ${build_args[*]}"
start=$(date +%s)
"$DOCKER" build --progress=plain -f docker/Dockerfile.cpu -t "$IMAGE" "${build_args[@]}" . >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; fail "docker build"; }
build_s=$(elapsed "$start")
cached=$(grep -c '^#[0-9]* CACHED' "$WORK/build.log" || true)
say "built $IMAGE in $build_s s ($cached steps from the layer cache)"

# ---- 3. every compose file set validates ---------------------------------------------------------------
mkdir -p "$WORK/models" "$WORK/data" "$WORK/outputs" "$WORK/secrets"
chmod 0777 "$WORK/models" "$WORK/data" "$WORK/outputs"  # the image's user (uid 1000) writes there
python3 -c "import secrets; print(secrets.token_hex(16))" >"$WORK/secrets/align_api_key"
key=$(cat "$WORK/secrets/align_api_key")
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
ALIGN_PORT=$(free_port) ALIGN_PORT_2=$(free_port)
export ALIGN_MODELS_DIR="$WORK/models" ALIGN_DATA_DIR="$WORK/data" ALIGN_OUTPUT_DIR="$WORK/outputs" \
  ALIGN_API_KEY_SECRET="$WORK/secrets/align_api_key" ALIGN_DATASET=grpo.jsonl ALIGN_MAX_STEPS="$STEPS" \
  ALIGN_IMAGE_TAG="$TAG" ALIGN_PORT ALIGN_PORT_2
BASE=(-f docker/compose.yaml)
REPLICAS=(-f docker/compose.yaml -f docker/compose.replicas.yaml)
for files in "${BASE[*]}" "${REPLICAS[*]}"; do
  # shellcheck disable=SC2086  # the file flags, split on purpose
  "${COMPOSE[@]}" -p "$PROJECT" $files --profile gpu --profile cpu --profile demo config -q \
    || fail "compose $files config"
done
say "compose config: compose.yaml and compose.replicas.yaml valid with the gpu, cpu and demo profiles"

# ---- 4. the cpu stack ---------------------------------------------------------------------------------------
say "a tiny Qwen2-VL and the colour dataset, made in the image"
"$DOCKER" run --rm -v "$WORK/models:/models" "$IMAGE" align-tiny-model /models/policy --arch qwen2_vl >/dev/null 2>&1 \
  || fail "align-tiny-model in $IMAGE"
"$DOCKER" run --rm -v "$WORK/data:/data" "$IMAGE" \
  python -c "from examples.demo import make_dataset; make_dataset('/data', 32)" || fail "make_dataset in $IMAGE"

ready() {  # weight_version of the server published on port $1, or nothing
  python3 -c "import json, sys, urllib.request as r; req = r.Request('http://127.0.0.1:$1/ready', headers={'Authorization': 'Bearer $key'}); print(json.load(r.urlopen(req, timeout=10))['weight_version'])" 2>/dev/null || true
}

declare -A run_s
run_stack() {  # NAME TRANSPORT FILES...
  local name=$1 transport=$2 start code servers=(cpu-server) ports=("$ALIGN_PORT")
  shift 2
  [[ " $* " == *compose.replicas.yaml* ]] && servers+=(cpu-server-2) ports+=("$ALIGN_PORT_2")
  UP=("${COMPOSE[@]}" -p "$PROJECT" "$@" --profile cpu)
  say "run '$name': ${#servers[@]} server(s), align-train grpo $STEPS steps, --weight-transport=$transport"
  start=$(date +%s)
  ALIGN_WEIGHT_TRANSPORT=$transport ALIGN_RUN_NAME=$name "${UP[@]}" up -d --no-build >"$WORK/$name-up.log" 2>&1 \
    || { cat "$WORK/$name-up.log" >&2; fail "$name: compose up"; }
  code=$(timeout 900 "$DOCKER" wait "$("${UP[@]}" ps -q cpu-trainer)") || fail "$name: the trainer did not end within 900 s"
  "${UP[@]}" logs --no-color cpu-trainer >"$WORK/$name-trainer.log" 2>&1
  grep -E "rollouts from|pushed weights|align-train grpo:|Error|error:" "$WORK/$name-trainer.log" | sed 's/^/   /' || true
  [ "$code" = 0 ] || { tail -30 "$WORK/$name-trainer.log" >&2; fail "$name: align-train exited $code"; }
  for i in "${!servers[@]}"; do
    local version health
    version=$(ready "${ports[$i]}")
    health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$("${UP[@]}" ps -q "${servers[$i]}")")
    [ "$version" = $((STEPS + 1)) ] || fail "$name: ${servers[$i]} serves weight_version '$version', expected $((STEPS + 1))"
    [ "$health" = healthy ] || fail "$name: ${servers[$i]} is $health"
    say "$name: ${servers[$i]} $health, weight_version $version (= $STEPS steps + the initial push)"
  done
  "${UP[@]}" down -v >/dev/null 2>&1
  UP=()
  run_s[$name]=$(elapsed "$start")
  say "run '$name' passed in ${run_s[$name]} s (up, train, checks, down)"
}

run_stack http http "${BASE[@]}"
run_stack tcp tcp "${BASE[@]}"
run_stack shm shm "${BASE[@]}"  # across containers: the trainer joins the server's IPC namespace
run_stack replicas auto "${REPLICAS[@]}"

# ---- 5. numbers ------------------------------------------------------------------------------------------
size() { "$DOCKER" image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'; }
say "summary"
echo "   build of $IMAGE: $build_s s ($cached steps cached)"
for name in http tcp shm replicas; do echo "   run '$name': ${run_s[$name]} s"; done
echo "   $IMAGE: $(size "$IMAGE")"
"$DOCKER" image inspect "$LOCAL_BASE" >/dev/null 2>&1 && echo "   $LOCAL_BASE: $(size "$LOCAL_BASE")"
say "test-compose passed"
