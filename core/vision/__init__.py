"""What qrsight computes on pixels: image intake, the detector (letterbox → ONNX → NMS),
the crop verifier, payload reading and the pipeline that chains them for a batch.

Builds on ``core.runtime`` (settings, errors, stage timings); never the other way.
"""
