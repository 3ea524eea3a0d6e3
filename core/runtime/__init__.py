"""How a qrsight process runs, whatever it computes: settings, errors, logs, telemetry,
Kafka client configs, GPU placement, retry policy and the result records it publishes.

Imports nothing of ``core.vision``.
"""
