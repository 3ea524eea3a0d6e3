#!/usr/bin/env bash
# kafka-run-class.sh of the local apache/kafka stand-in: java with the image's jars, Kafka's
# default JVM flags and Log4j 2 writing to the console (the release scripts' defaults).
set -euo pipefail
# shellcheck disable=SC2206
heap=(${KAFKA_HEAP_OPTS:--Xmx256m})
# shellcheck disable=SC2206
perf=(${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true})
# shellcheck disable=SC2206
opts=(${KAFKA_OPTS:-})
exec java "${heap[@]}" "${perf[@]}" "${opts[@]}" \
  "-Dlog4j2.configurationFile=${KAFKA_LOG4J_CONFIG:-/opt/kafka/config/tools-log4j2.properties}" \
  -cp '/opt/kafka/libs/*' "$@"
