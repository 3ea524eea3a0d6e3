import sys, time, os
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
import numpy as np, cv2
import providers as P
from core.vision.detector import Detector
from core.vision.postprocess import letterbox_batch
from core.vision.images import decode
files = P.image_files(P.Path(".ortgpu/data"))
imgs = [decode(f.read_bytes(), P.LIMITS) for f in files][:32]
def t(fn, n=5):
    fn(); ts=[]
    for _ in range(n):
        s=time.perf_counter(); fn(); ts.append((time.perf_counter()-s)*1000)
    return np.median(ts)
print("cv2 threads", cv2.getNumThreads(), "cpus", os.cpu_count())
print("letterbox32 no session: %.1f ms" % t(lambda: letterbox_batch(imgs, 416)))
b, _ = letterbox_batch(imgs, 416)
print("astype f16 32: %.1f ms" % t(lambda: b.astype(np.float16)))
f16 = P.to_fp16(P.Path("models/qrsight-qr-v3.onnx"), P.Path("/tmp"))
for name, model, prov, intra in [("cpu", "models/qrsight-qr-v3.onnx", ["CPUExecutionProvider"], 0),
                                 ("cuda", "models/qrsight-qr-v3.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"], 0),
                                 ("cuda-intra1", "models/qrsight-qr-v3.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"], 1),
                                 ("cuda-fp16", f16, ["CUDAExecutionProvider", "CPUExecutionProvider"], 0),
                                 ("cuda-fp16-intra1", f16, ["CUDAExecutionProvider", "CPUExecutionProvider"], 1)]:
    d = Detector(model, providers=prov, intra_threads=intra)
    x, _ = d.preprocess(imgs)
    same = t(lambda: d.infer(x))
    fresh = t(lambda: d.infer(x.copy()))
    lb_after = t(lambda: letterbox_batch(imgs, 416))
    pre = t(lambda: d.preprocess(imgs))
    full = t(lambda: d.infer(d.preprocess(imgs)[0]))
    print(f"{name:17s} infer same {same:.1f} fresh {fresh:.1f} | letterbox after {lb_after:.1f} preprocess {pre:.1f} | pre+infer {full:.1f} ms (batch 32)", flush=True)
    for bs in (1, 2, 5, 7, 8):
        xb = x[:bs]
        s0 = time.perf_counter(); d.infer(xb); first = (time.perf_counter() - s0) * 1000
        print(f"   batch {bs}: first run {first:.1f} ms then {t(lambda: d.infer(xb)):.1f}", flush=True)
