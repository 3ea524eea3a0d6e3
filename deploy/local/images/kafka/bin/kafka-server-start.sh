#!/usr/bin/env bash
# kafka-server-start.sh <server.properties>: the broker, with the release script's 1 GiB heap.
export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}"
export KAFKA_LOG4J_CONFIG=/opt/kafka/config/log4j2.properties
exec "$(dirname "$0")/kafka-run-class.sh" kafka.Kafka "$@"
