"""qrsight core, in two parts:

- ``core.runtime``: how a process runs (settings, errors, logs, telemetry, Kafka configs,
  GPU placement, retry policy, result records);
- ``core.vision``: what it computes on pixels (images, detector, NMS, verifier, payloads,
  the batch pipeline).

Nothing here imports Kafka clients or Flask; adapters (consumer, api, producer_tools)
wire these pieces to the outside world.
"""
