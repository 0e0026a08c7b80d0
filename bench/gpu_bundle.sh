#!/usr/bin/env bash
# The GPU checks on a host with no network (README, "Tests on a GPU host").
#
#   bench/gpu_bundle.sh pack DIR    here, with pip's index: every wheel the checks need that such a
#                                   host's PyTorch image lacks (onnxruntime-gpu, the serving stack),
#                                   built for its Python, and the Fashion-MNIST test split, as a tar
#                                   cut into parts of at most PART_MIB (56), one folder per part:
#                                   DIR/1, DIR/2, ..., so each part can travel on its own.
#   bench/gpu_bundle.sh run DIR OUT there, from the repository's root once every part is in DIR:
#                                   unpacks the bundle beside the host's torch and CUDA libraries,
#                                   then runs the checks in order of worth, each under its own
#                                   timeout, writing what it finds to OUT as it goes.
#   bench/gpu_bundle.sh unpack DIR WORK
#                                   what run does first: checks the parts, joins them into WORK and
#                                   installs the wheels into WORK/site (tests/bench tries it here).
#
# PYTHON_VERSION (3.12) is the host's; PYTHON (python3) the interpreter there that holds torch.
set -euo pipefail

# The serving stack as constraints.txt pins it (the versions CI tests), but numpy and protobuf, which
# the host's torch and onnx were built against, and the CPU onnxruntime that onnxruntime-gpu replaces.
# The host image has the rest (torch, onnx, httpx, pytest).
HOST_KEEPS='^(numpy|protobuf|onnxruntime)=='
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64)
FASHION_MNIST=/usr/share/datasets/fashion-mnist

pack() {
  local dir=$1 stage
  stage=$(mktemp -d)
  mkdir -p "$stage/wheels" "$stage/fashion-mnist"
  mapfile -t pins < <(grep -v '^#' constraints.txt | grep -viE "$HOST_KEEPS")
  python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "${PYTHON_VERSION:-3.12}" "${PLATFORMS[@]}" -d "$stage/wheels" "${pins[@]}"
  cp "$FASHION_MNIST"/t10k-* "$stage/fashion-mnist/"
  rm -rf "$dir" && mkdir -p "$dir"
  tar -C "$stage" -cf - . | split -b "${PART_MIB:-56}M" -d -a 2 - "$dir/bundle.tar."
  rm -rf "$stage"
  # Each part in a folder of its own, and in each the list of all, in joining order, by path in DIR.
  local part moved=()
  for part in "$dir"/bundle.tar.*; do
    moved+=("$((${#moved[@]} + 1))/${part##*/}")
    mkdir "$dir/${#moved[@]}" && mv "$part" "$dir/${moved[-1]}"
  done
  (cd "$dir" && sha256sum "${moved[@]}" >parts.sha256)
  for part in "${moved[@]}"; do cp "$dir/parts.sha256" "$dir/${part%/*}/"; done
  rm "$dir/parts.sha256"
  echo "${#moved[@]} parts in $dir:" && du -sh "$dir"/*/
}

# One check: its output to OUT/NAME.log, its status to OUT/checks.txt; a failure stops nothing.
check() {
  local name=$1 seconds=$2
  shift 2
  local started=$SECONDS status=0
  # SIGINT, so Python unwinds and the bench's context managers stop the servers they started.
  timeout -s INT -k 20 "$seconds" "$@" >"$OUT/$name.log" 2>&1 || status=$?
  echo "$name: exit $status after $((SECONDS - started)) s" | tee -a "$OUT/checks.txt"
}

unpack() {
  local dir=$1 work=$2
  mkdir -p "$work"
  local lists=("$dir"/*/parts.sha256)
  # Every part present and whole, or nothing runs: a missing one means a transfer went wrong.
  (cd "$dir" && sha256sum -c --quiet) <"${lists[0]}"
  mapfile -t parts < <(awk '{print $2}' "${lists[0]}")
  (cd "$dir" && cat "${parts[@]}") | tar -x -C "$work"
  "${PYTHON:-python3}" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$work/site" \
    "$work"/wheels/*.whl
}

run() {
  local dir=$1 work=/tmp/gpu-bundle
  OUT=$2
  mkdir -p "$OUT"
  unpack "$dir" "$work"
  local site=$work/site python=${PYTHON:-python3}
  if [ ! -d "$FASHION_MNIST" ]; then mkdir -p "$FASHION_MNIST" && cp "$work"/fashion-mnist/* "$FASHION_MNIST/"; fi
  # The wheels shadow the host's CPU onnxruntime; the repository is imported from where it stands.
  export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1
  # onnxruntime-gpu loads CUDA 13 and cuDNN 9 by name: from the host's nvidia-* wheels (torch's).
  local libs
  libs=$("$python" -c 'import pathlib, site
print(":".join(sorted({str(p.parent) for r in site.getsitepackages() for p in pathlib.Path(r, "nvidia").glob("**/lib*.so*")})))')
  export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  {
    nvidia-smi || true
    "$python" -c 'import onnxruntime as o, sys; print(sys.version); print(o.__file__, o.__version__, o.get_available_providers())' || true
  } >"$OUT/env.txt" 2>&1
  check gpu-tests "${GPU_TESTS_S:-180}" "$python" -m pytest -m gpu -p no:cacheprovider -q tests/service/test_gpu.py
  check reproduce "${REPRODUCE_S:-330}" "$python" -m bench.cli reproduce --device cuda --concurrency 1,16,64,256 \
    --out "$work/reproduce"
  # The figures, not the exported models: what comes back from such a host is usually limited.
  (cd "$work/reproduce" && find . \( -name '*.json' -o -name '*.md' -o -name '*.png' \) -print0 |
    tar -czf "$OUT/reproduce.tar.gz" --null -T -) || true
}

case ${1:-} in
pack) pack "$2" ;;
unpack) unpack "$2" "$3" ;;
run) run "$2" "$3" ;;
*)
  sed -n '2,17p' "$0"
  exit 2
  ;;
esac
