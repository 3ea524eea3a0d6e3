"""qrsight core: settings, errors, image intake, the detector and payload decoding.

Nothing here imports Kafka clients or Flask; adapters (consumer, api, producer_tools)
wire these pieces to the outside world.
"""
