#!/usr/bin/env bash
# Build the CPU and GPU images from scratch on a private Docker engine and run them, then put the machine
# back as it was. Needs root (dockerd, debootstrap). No registry is reachable here, so the base image, shared
# by both builds, is made with debootstrap and `docker import`.
#   CPU image: healthy, classifies an image, stops cleanly on SIGTERM.
#   GPU image (there is no GPU here): every CUDA library onnxruntime loads is found but the driver's; with
#   CUDA required it refuses to start, naming the missing device; with VIT_PROVIDERS=cpu it serves.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/vit-container.XXXXXX)
socket="unix://$work/docker.sock"
docker=(docker -H "$socket")
started=$SECONDS
say() { printf '[container %3ds] %s\n' "$((SECONDS - started))" "$*"; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# dockerd rewrites iptables (FORWARD policy, NAT rules) and adds docker0: note them, restore on exit.
iptables-save > "$work/iptables.before"
had_docker0=$(ip link show docker0 >/dev/null 2>&1 && echo yes || echo no)

cleanup() {
    local status=$?
    "${docker[@]}" rm -f vit-ci vit-gpu-strict vit-gpu-cpu >/dev/null 2>&1 || true
    if [ -n "${dockerd_pid:-}" ]; then
        kill "$dockerd_pid" 2>/dev/null || true
        for _ in $(seq 150); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
    fi
    if [ -s "$work/iptables.before" ]; then
        iptables-restore < "$work/iptables.before" || true
    else
        # Nothing was loaded before dockerd (iptables-save printed nothing): remove all it added.
        for table in filter nat; do iptables -t "$table" -F; iptables -t "$table" -X; done
        iptables -P FORWARD ACCEPT
    fi
    [ "$had_docker0" = yes ] || ip link delete docker0 2>/dev/null || true
    # dockerd leaves mounts (netns, overlay) under its roots: unmount them, deepest first.
    awk -v root="$work" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

say "starting dockerd on $socket"
dockerd --host "$socket" --data-root "$work/data" --exec-root "$work/exec" --pidfile "$work/dockerd.pid" \
    > "$work/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 120); do "${docker[@]}" info >/dev/null 2>&1 && break; sleep 0.5; done
if ! "${docker[@]}" info >/dev/null 2>&1; then
    say "FAILED: the Docker engine did not start"; tail -n 30 "$work/dockerd.log"; exit 1
fi

image_mb() { echo $(($("${docker[@]}" image inspect --format '{{.Size}}' "$1") / 1000000)); }

mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
say "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" "$mirror" \
    > "$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log"; exit 1; }
# pip inside the build must trust the same certificate authorities as this machine.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$work/rootfs/usr/local/share/ca-certificates/"
fi
chroot "$work/rootfs" update-ca-certificates >/dev/null
tar -C "$work/rootfs" -c . | "${docker[@]}" import - vit-base:bookworm >/dev/null

say "building the CPU image"
cpu_started=$SECONDS
"${docker[@]}" build --quiet --network host --build-arg BASE_IMAGE=vit-base:bookworm -t vit-serve:ci "$repo" >/dev/null
say "CPU image built in $((SECONDS - cpu_started)) s, $(image_mb vit-serve:ci) MB"
if "${docker[@]}" run --rm --entrypoint python3 vit-serve:ci -c "import torch" 2>/dev/null; then
    say "FAILED: torch is in the runtime image"; exit 1
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_healthy() {
    local health=starting
    for _ in $(seq 150); do
        health=$("${docker[@]}" inspect --format '{{.State.Health.Status}}' "$1")
        [ "$health" = healthy ] && return 0
        [ "$("${docker[@]}" inspect --format '{{.State.Running}}' "$1")" = true ] || break
        sleep 1
    done
    say "FAILED: $1 is $health"; "${docker[@]}" logs "$1" 2>&1 | tail -n 30; return 1
}

# Posts the first Fashion-MNIST test trouser as a PNG to /classify on 127.0.0.1:$1; $2 names the image.
classify() {
    python3 - "$1" "$2" <<'PY'
import gzip, io, json, sys, urllib.request, uuid, zlib, struct

def png(pixels: bytes, side: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = b"".join(b"\x00" + pixels[row * side:(row + 1) * side] for row in range(side))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")

root = "/usr/share/datasets/fashion-mnist/"
images = gzip.open(root + "t10k-images-idx3-ubyte.gz").read()[16:]
labels = gzip.open(root + "t10k-labels-idx1-ubyte.gz").read()[8:]
names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
index = labels.index(1)  # the first trouser: an easy, unambiguous class
boundary = uuid.uuid4().hex
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.png\"\r\n"
        "Content-Type: image/png\r\n\r\n").encode() + png(images[index * 784:(index + 1) * 784], 28) + f"\r\n--{boundary}--\r\n".encode()
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/classify", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
answer = json.load(urllib.request.urlopen(request, timeout=30))
label = answer["results"][0]["predictions"][0]["label"]
print(f"  {sys.argv[2]}: expected {names[labels[index]]!r}, got {label!r}")
sys.exit(0 if label == names[labels[index]] else 1)
PY
}

port=$(free_port)
say "running it on 127.0.0.1:$port (2 CPUs, 1 GiB, read-only root)"
"${docker[@]}" run -d --name vit-ci --cpus 2 --memory 1g --read-only --tmpfs /tmp \
    -p "127.0.0.1:$port:8000" vit-serve:ci >/dev/null
wait_healthy vit-ci

say "classifying a Fashion-MNIST image through it"
classify "$port" "CPU image"

say "stopping it with SIGTERM"
stop_started=$SECONDS
"${docker[@]}" stop -t 40 vit-ci >/dev/null
code=$("${docker[@]}" inspect --format '{{.State.ExitCode}}' vit-ci)
took=$((SECONDS - stop_started))
if [ "$code" != 0 ] || [ "$took" -ge 30 ]; then
    say "FAILED: exit code $code after ${took}s (want 0 within the 30 s grace)"; "${docker[@]}" logs vit-ci | tail -n 20; exit 1
fi
say "passed: built, healthy, classified, stopped cleanly (exit 0 in ${took}s)"

# The GPU image, on the same engine and base. There is no GPU here: what can be proven is that every
# library comes from the image but the driver's, and that both provider settings do what they say.
say "building the GPU image"
gpu_started=$SECONDS
"${docker[@]}" build --quiet --network host --build-arg BASE_IMAGE=vit-base:bookworm -f "$repo/docker/Dockerfile.gpu" \
    -t vit-serve:gpu-ci "$repo" >/dev/null
say "GPU image built in $((SECONDS - gpu_started)) s, $(image_mb vit-serve:gpu-ci) MB"

say "loading onnxruntime's CUDA libraries by name, as onnxruntime does"
"${docker[@]}" run --rm -i --entrypoint python3 vit-serve:gpu-ci - <<'PY'
import ctypes, importlib.util, pathlib, sys

import onnxruntime

if importlib.util.find_spec("torch"):
    sys.exit("  torch is in the GPU image")
# What the CUDA provider links, and the cuDNN it opens at run time: each must resolve by its bare name.
for name in ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcudnn.so.9"):
    ctypes.CDLL(name)
provider = pathlib.Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
try:
    ctypes.CDLL(str(provider))
    sys.exit("  the CUDA provider loaded, yet there is no GPU driver here")
except OSError as error:
    # The loader names the first library it cannot find, in link order; the driver's comes last.
    missing = str(error).split(":")[0]
print(f"  CUDA provider: every library found but the driver's ({missing})")
sys.exit(0 if missing == "libcuda.so.1" else 1)
PY

say "starting it with CUDA required (the image's default)"
"${docker[@]}" run -d --name vit-gpu-strict --cpus 2 --memory 1g --read-only --tmpfs /tmp vit-serve:gpu-ci >/dev/null
if ! code=$(timeout 120 "${docker[@]}" wait vit-gpu-strict); then
    say "FAILED: still running after 120 s"; "${docker[@]}" logs vit-gpu-strict 2>&1 | tail -n 30; exit 1
fi
reason=$("${docker[@]}" logs vit-gpu-strict 2>&1 | grep -o 'CUDA was requested but the session runs on CPUExecutionProvider[^"\\]*' | head -n 1 || true)
if [ "$code" = 0 ] || [ -z "$reason" ]; then
    say "FAILED: exit code $code, and no line naming the missing device"; "${docker[@]}" logs vit-gpu-strict 2>&1 | tail -n 30; exit 1
fi
say "refused to start (exit $code): $reason"

port=$(free_port)
# 1.5 CPUs: a quota, as a Kubernetes limit is, which the container's CPU affinity does not show.
say "running it with VIT_PROVIDERS=cpu on 127.0.0.1:$port (1.5 CPUs, 1 GiB, read-only root)"
"${docker[@]}" run -d --name vit-gpu-cpu --cpus 1.5 --memory 1g --read-only --tmpfs /tmp \
    -e VIT_PROVIDERS=cpu -e VIT_REQUIRE_REQUESTED_PROVIDER=false -p "127.0.0.1:$port:8000" vit-serve:gpu-ci >/dev/null
wait_healthy vit-gpu-cpu
classify "$port" "GPU image on CPU"
python3 - "$port" <<'PY'
import json, sys, urllib.request
batching = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/models", timeout=30))["models"][0]["batching"]
print(f"  sized by a 1.5-CPU quota: {batching['frontend_processes']} front-end(s), {batching['session_workers']} session(s)")
PY
say "passed: GPU image in $((SECONDS - gpu_started)) s, all of its checks included"
