#!/bin/bash
# device check: onnxruntime-gpu (carried in parts) + bench/providers.py on the real photos
set -u
REPO=$(pwd)
mkdir -p /tmp/ort && cp .ortgpu/part.03 /tmp/ort/ && ls -la /tmp/ort
cat /tmp/ort/part.00 /tmp/ort/part.01 /tmp/ort/part.02 /tmp/ort/part.03 > /tmp/ort/ort.tar.xz
(cd /tmp/ort && sed 's#/tmp/ortgpu/ort.tar.xz#ort.tar.xz#' "$REPO/.ortgpu/sha" | sha256sum -c -) || exit 3
mkdir -p /tmp/site && tar xJf /tmp/ort/ort.tar.xz -C /tmp/site || exit 4
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 5
export PYTHONPATH=/tmp/site
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
export LD_LIBRARY_PATH=$(find "$SP/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' ':')${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
nproc; python3 --version
python3 -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())"
export PYTHONUNBUFFERED=1
python3 bench/providers.py .ortgpu/data --out /tmp/prov 2>&1 | tee "$OUT/providers.log"
cp /tmp/prov/providers.md /tmp/prov/providers.json "$OUT/" 2>/dev/null
ls -la /tmp/prov
