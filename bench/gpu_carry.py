"""Pack what ``bench/gpu_e2e.sh`` needs on a GPU machine that reaches no network.

    python -m bench.gpu_carry [--out .gpucarry] [--cuda-arch 90] [--part-mib 56]

The GPU machine it targets has no network and Python 3.12 with PyTorch, CUDA 13 and cuDNN 9
libraries, NumPy, OpenCV and scikit-image, but no Java, no Kafka, no onnxruntime-gpu and
none of qrsight's own dependencies; at most 64 MiB can be copied to it at a time.
This builds, on a machine with pip's index, Java 17 (``jlink``) and the train extra:

- ``site/``: the Python wheels (CPython 3.12, manylinux x86-64) unpacked: onnxruntime-gpu
  1.31.1 (CUDA 13), with the GPU code of every architecture but ``--cuda-arch`` zeroed in
  its CUDA provider (a 284 MB library; the kept cubins, for an H200 sm_90, are what the
  driver loads; the zeroed ones compress to nothing), nvImageCodec (CPython 3.12 and the
  nvJPEG extension only) with nvJPEG, confluent-kafka, fastavro, pydantic (+ core),
  zxing-cpp, segno;
- ``jre/``: a Java 17 runtime cut down with ``jlink`` to the modules the broker uses;
- ``kafka-lib/``: the broker's jars (``deploy/local/kafka.sh fetch``), without the native
  libraries of other platforms;
- ``models/yolov8n-sized.onnx``: the YOLOv8n-sized graph of ``training/yolov8n_ref.py``
  (as ``bench/serving.py`` exports it), its weights zeroed (:func:`build_models`).

All of it goes into one ``carry.tar.xz``, split into parts of at most ``--part-mib`` MiB,
one part per folder ``<out>/p1``, ``<out>/p2``, …, each with ``MANIFEST`` (the parts'
SHA-256 and the whole archive's). ``bench/README.md`` (*GPU end to end*) gives the steps
on the GPU machine: each brings one folder; the last runs the benchmark.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


PY = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# what qrsight's workers and the benchmark import that the device image lacks
WHEELS = (
    "onnxruntime-gpu==1.31.1",
    "nvidia-nvimgcodec-cu13==0.9.0.20",
    "nvidia-nvjpeg==13.2.3.58",
    "confluent-kafka==2.16.1",
    "fastavro==1.13.1",
    "pydantic==2.13.4",
    "pydantic-core==2.46.4",
    "annotated-types==0.7.0",
    "typing-inspection==0.4.2",
    "typing-extensions==4.16.0",  # pydantic-core needs a recent one; the device's may be older
    "zxing-cpp==3.1.1",
    "segno==1.6.6",
)
JRE_MODULES = (
    "java.base,java.desktop,java.logging,java.management,java.naming,java.security.jgss,"
    "java.security.sasl,java.sql,java.xml,java.scripting,java.net.http,jdk.unsupported,"
    "jdk.management,jdk.crypto.ec,jdk.zipfs,jdk.naming.dns"
)
FATBIN_MAGIC = 0xBA55ED50
# nvImageCodec: the CPython 3.12 binding, the core library and the JPEG extensions
NVIMGCODEC_KEEP = ("nvimgcodec_impl.cpython-312-", "libnvimgcodec.so", "extensions/libnvjpeg_ext.")
# onnxruntime's Python tools (model conversion, quantization) that inference never imports
ORT_SKIP = ("onnxruntime/transformers/", "onnxruntime/quantization/", "onnxruntime/tools/")
# not loaded by the broker (scala-logging needs it only to compile its macros): a broker
# without it formatted, started, ran transactions and a consumer group here
KAFKA_SKIP = ("scala-reflect-",)


def say(message: str) -> None:
    print(f"[carry {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- pieces ----------------------------------------------------------------------------------
def download(wheels: Path) -> list[Path]:
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        PY,
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(wheels),
        *WHEELS,
    ]
    say(f"pip download {len(WHEELS)} wheels for CPython {PY}")
    subprocess.run(cmd, check=True)
    return sorted(wheels.glob("*.whl"))


def elf_section(path: Path, name: str) -> tuple[int, int]:
    """(file offset, size) of section ``name`` of a little-endian ELF64 file."""
    with path.open("rb") as f:
        head = f.read(64)
        (shoff,) = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        f.seek(sections[shstrndx][4])
        names = f.read(sections[shstrndx][5])
    for sh_name, _type, _flags, _addr, offset, size in sections:
        if names[sh_name : names.index(b"\0", sh_name)].decode() == name:
            return offset, size
    raise SystemExit(f"{path} has no {name} section")


def prune_fatbins(library: Path, keep_arch: int) -> tuple[int, int]:
    """Zero the payload of every cubin/PTX whose architecture is not ``keep_arch`` in the
    ``.nv_fatbin`` section of ``library`` (sizes and headers unchanged). Returns (kept,
    zeroed) bytes. The CUDA driver picks the entry of the device's architecture; the others
    are never read."""
    offset, size = elf_section(library, ".nv_fatbin")
    kept = zeroed = 0
    with library.open("r+b") as f:
        f.seek(offset)
        sec = bytearray(f.read(size))
        pos = 0
        while pos + 16 <= len(sec):
            magic, _version, header, fat = struct.unpack_from("<IHHQ", sec, pos)
            if magic != FATBIN_MAGIC:
                pos += 8
                continue
            entry, end = pos + header, pos + header + fat
            while entry < end:
                _kind, _v, ehead, payload = struct.unpack_from("<HHIQ", sec, entry)
                (arch,) = struct.unpack_from("<I", sec, entry + 28)
                if arch == keep_arch:
                    kept += payload
                else:
                    sec[entry + ehead : entry + ehead + payload] = bytes(payload)
                    zeroed += payload
                entry += ehead + payload
            pos = end
        f.seek(offset)
        f.write(sec)
    return kept, zeroed


def build_site(wheels: list[Path], site: Path, arch: int) -> None:
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            names = [n for n in names if not n.startswith(ORT_SKIP)]
            if wheel.name.startswith("nvidia_nvimgcodec"):
                names = [
                    n
                    for n in names
                    if "/nvimgcodec/" not in n
                    or n.endswith(".py")
                    or any(k in n for k in NVIMGCODEC_KEEP)
                ]
            zf.extractall(site, names)
    (site / "nvidia" / "__init__.py").unlink(missing_ok=True)  # keep `nvidia` a namespace
    cuda = site / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so"
    if arch == 0:
        say("onnxruntime CUDA provider kept whole (--cuda-arch 0): more parts to carry")
        return
    kept, zeroed = prune_fatbins(cuda, arch)
    say(
        f"onnxruntime CUDA provider: kept sm_{arch} GPU code {kept / 1e6:.0f} MB, "
        f"zeroed {zeroed / 1e6:.0f} MB of other architectures"
    )


def build_jre(jre: Path) -> None:
    say(f"jlink: {JRE_MODULES}")
    subprocess.run(
        [
            "jlink",
            "--add-modules",
            JRE_MODULES,
            "--strip-debug",
            "--no-header-files",
            "--no-man-pages",
            "--compress=0",
            "--output",
            str(jre),
        ],
        check=True,
    )


def slim_jar(src: Path, dest: Path) -> None:
    """The jar re-stored without compression (xz compresses the whole carry better) and
    without native libraries for other platforms than Linux x86-64."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            name = item.filename
            native = name.endswith((".so", ".dll", ".dylib", ".jnilib", ".a"))
            if native and not ("linux/amd64" in name or "Linux/x86_64" in name):
                continue
            zout.writestr(item.filename, zin.read(item), compress_type=zipfile.ZIP_STORED)


def build_kafka_lib(dest: Path) -> None:
    lib = Path(os.environ.get("KAFKA_LIB_DIR", ROOT / ".kafka" / "lib"))
    if not (lib / "VERSION").is_file():
        subprocess.run([str(ROOT / "deploy" / "local" / "kafka.sh"), "fetch"], check=True)
    dest.mkdir(parents=True)
    for jar in sorted(lib.glob("*.jar")):
        if not jar.name.startswith(KAFKA_SKIP):
            slim_jar(jar, dest / jar.name)
    shutil.copy(lib / "VERSION", dest / "VERSION")
    say(f"Kafka {(lib / 'VERSION').read_text().strip()}: {len(list(dest.glob('*.jar')))} jars")


def build_models(dest: Path, cache: Path) -> None:
    """The YOLOv8n-sized graph with every weight set to zero: the same layers, shapes and
    GPU cost as ``bench/serving.py``'s random weights (dense cuDNN kernels do not look at
    the values), in a few kilobytes instead of 12 MB of incompressible floats. Its class
    scores are all 0.5, so ``bench/gpu_e2e.py``'s threshold (0.9) keeps no box, as with the
    random weights."""
    import onnx
    from onnx import numpy_helper

    from bench.serving import reference_model

    model = onnx.load(str(reference_model(cache)))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f":
            init.CopyFrom(numpy_helper.from_array(array * 0, init.name))
    onnx.helper.set_model_props(
        model,
        {**{p.key: p.value for p in model.metadata_props}, "weights": "zeroed (cost only)"},
    )
    dest.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest / "yolov8n-sized.onnx"))


# --- packing ---------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(stage: Path, out: Path, part_bytes: int) -> list[Path]:
    archive = stage.parent / "carry.tar.xz"
    say("tar + xz (a few minutes on two cores)")
    with tarfile.open(stage.parent / "carry.tar", "w") as tar:
        for child in sorted(stage.iterdir()):
            tar.add(child, arcname=child.name)
    threads = str(min(4, os.cpu_count() or 1))
    with archive.open("wb") as f:
        subprocess.run(
            ["xz", "-6", "-T", threads, "-c", str(stage.parent / "carry.tar")], check=True, stdout=f
        )
    whole = sha256(archive)
    shutil.rmtree(out, ignore_errors=True)
    count = -(-archive.stat().st_size // part_bytes)
    part_bytes = -(-archive.stat().st_size // count)  # as even as possible
    parts: list[Path] = []
    with archive.open("rb") as f:
        for index, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
            folder = out / f"p{index + 1}"
            folder.mkdir(parents=True)
            part = folder / f"carry.part{index:02d}"
            part.write_bytes(block)
            parts.append(part)
    for part in parts:
        lines = [f"parts {len(parts)}", f"archive {whole}", f"{sha256(part)}  {part.name}"]
        (part.parent / "MANIFEST").write_text("\n".join(lines) + "\n")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpucarry")
    parser.add_argument(
        "--cuda-arch", type=int, default=90, help="GPU code kept (H200: 90; 0 = all)"
    )
    parser.add_argument(
        "--part-mib", type=float, default=57.0, help="largest part, MiB (a call: 64 MiB in all)"
    )
    parser.add_argument("--wheels", type=Path, default=None, help="wheel cache folder")
    parser.add_argument(
        "--models-cache", type=Path, default=ROOT / "runs" / "models", help="exported graphs"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qrsight-carry-") as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        wheels = download(args.wheels or Path(tmp) / "wheels")
        build_site(wheels, stage / "site", args.cuda_arch)
        build_jre(stage / "jre")
        build_kafka_lib(stage / "kafka-lib")
        build_models(stage / "models", args.models_cache)
        parts = pack(stage, args.out, int(args.part_mib * 1024 * 1024))
    total = sum(p.stat().st_size for p in parts)
    say(
        f"{len(parts)} part(s), {total / 2**20:.1f} MiB in {args.out}: "
        + ", ".join(f"{p.parent.name} {p.stat().st_size / 2**20:.1f} MiB" for p in parts)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
