import sys, time
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
import numpy as np
import providers as P
from core.vision.detector import Detector
from core.vision.pipeline import ImageJob, Pipeline
from core.runtime.settings import load_settings
files = P.image_files(P.Path(".ortgpu/data"))
blobs = [f.read_bytes() for f in files]
jobs = [ImageJob(f"p-{i}", b) for i, b in enumerate(blobs)]
M = "models/qrsight-qr-v3.onnx"
for name, prov in [("cpu", ["CPUExecutionProvider"]), ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])]:
    for payloads in (True, False):
        st = load_settings(model_path=M, max_batch=8, decode_payloads=payloads, read_whole_image=payloads)
        d = Detector(M, providers=prov)
        pre_t, inf_t, shapes = [], [], []
        orig_pre, orig_inf = d.preprocess, d.infer
        def pre(imgs, _o=orig_pre):
            s = time.perf_counter(); r = _o(imgs); pre_t.append((time.perf_counter() - s) * 1000); shapes.append(r[0].shape); return r
        def inf(b, _o=orig_inf):
            s = time.perf_counter(); r = _o(b); inf_t.append((time.perf_counter() - s) * 1000); return r
        d.preprocess, d.infer = pre, inf
        with Pipeline(st, d) as p:
            for rnd in range(3):
                pre_t.clear(); inf_t.clear(); shapes.clear()
                s = time.perf_counter(); out = p.run(jobs); el = time.perf_counter() - s
                ok = sum(r["status"] == "OK" for r in out)
                print(f"{name} payloads={payloads} round {rnd}: {len(jobs)/el:.1f} img/s ok={ok} batches={len(inf_t)} "
                      f"pre med {np.median(pre_t):.1f} max {max(pre_t):.1f} | infer med {np.median(inf_t):.1f} max {max(inf_t):.1f} sum {sum(inf_t):.0f} ms | shapes {sorted(set(shapes))}", flush=True)
