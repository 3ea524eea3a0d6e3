#!/usr/bin/env bash
# GPU end to end on a GPU machine without network: Kafka broker + qrsight workers on one GPU.
#
#   bash bench/gpu_e2e.sh stash           copy the carried part(s) of .gpucarry/ to $STASH
#   bash bench/gpu_e2e.sh run [ARGS...]   stash, check and unpack every part, start nothing
#                                         else first: preflight, then bench.gpu_e2e
#                                         (ARGS go to it), results under $OUT
#   bash bench/gpu_e2e.sh run --dry-run   the same on a machine without a GPU: the local
#                                         Python and its packages, the CPU provider
#
# The parts come from `python -m bench.gpu_carry` (see bench/README.md, "GPU end to end"):
# at most 64 MiB can be copied to the machine at a time, so each step brings one folder
# .gpucarry/pN into the checkout; the steps before the last run `stash`, the last `run`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STASH="${STASH:-/tmp/qrsight-carry}"
UNPACK="${UNPACK:-/tmp/qrsight}"
OUT="${OUT:-$ROOT/runs/gpu-e2e}"
mkdir -p "$OUT"
say() { echo "[gpu_e2e.sh $(date +%H:%M:%S)] $*"; }

stash() {
  mkdir -p "$STASH"
  local found=0
  for dir in "$ROOT"/.gpucarry/p*/; do
    [[ -f "$dir/MANIFEST" ]] || continue
    cp "$dir"/carry.part* "$STASH/"
    cp "$dir/MANIFEST" "$STASH/MANIFEST.$(basename "$dir")"
    found=1
  done
  [[ $found == 1 ]] || say "no .gpucarry/pN here (nothing carried in this call)"
  say "stash $STASH: $(cd "$STASH" && echo *)"
}

unpack() {
  local manifests found parts have
  manifests=("$STASH"/MANIFEST.*)
  found=("$STASH"/carry.part*)
  [[ -f "${manifests[0]}" ]] || { say "nothing stashed in $STASH"; exit 3; }
  parts="$(awk '$1 == "parts" {print $2}' "${manifests[0]}")"
  have="${#found[@]}"
  if [[ "$have" != "$parts" ]]; then
    say "have $have of $parts parts: carry the missing .gpucarry/pN in earlier calls (stash)"
    exit 3
  fi
  # every part against its SHA-256 (each call's MANIFEST lists its own)
  (cd "$STASH" && cat MANIFEST.* | grep -v '^parts\|^archive' | sha256sum -c --quiet -) || exit 4
  mkdir -p "$UNPACK"
  cat "$STASH"/carry.part* | xz -d -T0 | tar x -C "$UNPACK"
  rm -f "$UNPACK/site/nvidia/__init__.py"  # a namespace package, merged with the machine's
  say "unpacked into $UNPACK: $(du -sh "$UNPACK" | cut -f1)"
}

java_ok() {
  command -v java >/dev/null 2>&1 || return 1
  local major
  major="$(java -version 2>&1 | head -n1 | sed -E 's/.*version "([0-9]+).*/\1/')"
  [[ "$major" =~ ^[0-9]+$ && "$major" -ge 17 ]]
}

environment() {  # $1 = dry-run (1) or not
  export PYTHONUNBUFFERED=1
  if [[ "$1" == 1 ]]; then
    export KAFKA_LIB_DIR="${KAFKA_LIB_DIR:-$UNPACK/kafka-lib}"
    [[ -d "$KAFKA_LIB_DIR" ]] || export KAFKA_LIB_DIR="$ROOT/.kafka/lib"
    return
  fi
  export PYTHONPATH="$UNPACK/site${PYTHONPATH:+:$PYTHONPATH}"
  export KAFKA_LIB_DIR="$UNPACK/kafka-lib"
  java_ok || export JAVA_HOME="$UNPACK/jre" PATH="$UNPACK/jre/bin:$PATH"
  local sp libs
  sp="$(python3 -c 'import site; print(site.getsitepackages()[0])')"
  # CUDA 13 and cuDNN 9 from the machine's PyTorch wheels, nvJPEG from the carried wheel
  libs="$( { find "$sp/nvidia" "$UNPACK/site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null || true; } \
    | sort -u | tr '\n' ':')"
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
  export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms1g -Xmx2g}"
}

run() {
  local dry=0 args=()
  for a in "$@"; do [[ "$a" == --dry-run ]] && dry=1; args+=("$a"); done
  local start=$SECONDS
  stash
  unpack
  environment "$dry"
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    echo "cores $(nproc)"; python3 --version; java -version 2>&1 | head -n1
    python3 -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())"
  } 2>&1 | tee "$OUT/machine.txt"
  cd "$ROOT"
  set +e
  python3 -m bench.gpu_e2e --out "$OUT" --ref-model "$UNPACK/models/yolov8n-sized.onnx" \
    "${args[@]}" 2>&1 | grep -v 'Purging .* unserved events' | tee "$OUT/run.log"
  local code=${PIPESTATUS[0]}
  set -e
  say "bench.gpu_e2e exited $code after $((SECONDS - start)) s; results in $OUT"
  return "$code"
}

case "${1:-}" in
  stash) stash ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 stash | run [--dry-run] [bench/gpu_e2e.py args]" >&2; exit 2 ;;
esac
