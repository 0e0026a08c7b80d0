#!/usr/bin/env bash
# Build the CPU image from scratch on a private Docker engine, run it, classify an image through
# it and stop it, then put the machine back as it was. Needs root (dockerd, debootstrap).
# No registry is reachable here, so the base image is made with debootstrap and `docker import`.
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
    "${docker[@]}" rm -f vit-ci >/dev/null 2>&1 || true
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

say "building the image"
"${docker[@]}" build --quiet --network host --build-arg BASE_IMAGE=vit-base:bookworm -t vit-serve:ci "$repo" >/dev/null
if "${docker[@]}" run --rm --entrypoint python3 vit-serve:ci -c "import torch" 2>/dev/null; then
    say "FAILED: torch is in the runtime image"; exit 1
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "running it on 127.0.0.1:$port (2 CPUs, 1 GiB, read-only root)"
"${docker[@]}" run -d --name vit-ci --cpus 2 --memory 1g --read-only --tmpfs /tmp \
    -p "127.0.0.1:$port:8000" vit-serve:ci >/dev/null
for _ in $(seq 120); do
    health=$("${docker[@]}" inspect --format '{{.State.Health.Status}}' vit-ci)
    [ "$health" = healthy ] && break
    [ "$("${docker[@]}" inspect --format '{{.State.Running}}' vit-ci)" = true ] || break
    sleep 1
done
if [ "$health" != healthy ]; then
    say "FAILED: container is $health"; "${docker[@]}" logs vit-ci | tail -n 30; exit 1
fi

say "classifying a Fashion-MNIST image through it"
python3 - "$port" <<'PY'
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
print(f"  expected {names[labels[index]]!r}, got {label!r}")
sys.exit(0 if label == names[labels[index]] else 1)
PY

say "stopping it with SIGTERM"
stop_started=$SECONDS
"${docker[@]}" stop -t 40 vit-ci >/dev/null
code=$("${docker[@]}" inspect --format '{{.State.ExitCode}}' vit-ci)
took=$((SECONDS - stop_started))
if [ "$code" != 0 ] || [ "$took" -ge 30 ]; then
    say "FAILED: exit code $code after ${took}s (want 0 within the 30 s grace)"; "${docker[@]}" logs vit-ci | tail -n 20; exit 1
fi
say "passed: built, healthy, classified, stopped cleanly (exit 0 in ${took}s)"
