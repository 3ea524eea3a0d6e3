"""The wire contract of qrsight: Avro schemas, topic and header names, the codec."""
