# qrsight: the commands a newcomer types. `make up` runs it all; `make test` tests it all.
PYTHON ?= python3
# The local broker's port; tests never read this (they use QRSIGHT_KAFKA_BOOTSTRAP if set,
# else start their own broker on a free port).
QRSIGHT_KAFKA_PORT ?= 9092
LOCAL_BOOTSTRAP = $${QRSIGHT_KAFKA_BOOTSTRAP:-127.0.0.1:$(QRSIGHT_KAFKA_PORT)}
export QRSIGHT_KAFKA_PORT
# `make kafka-up KAFKA_SECURITY=sasl_ssl`: TLS, SASL/SCRAM and ACLs, each role's client
# settings in .kafka/clients/<role>.env (README, "Running on a secured Kafka");
# `make cluster-up KAFKA_SECURITY=sasl_ssl` the same for the three-node cluster, its
# client settings in .kafka/cluster/clients/<role>.env.
KAFKA_SECURITY ?= plaintext
export KAFKA_SECURITY

.PHONY: install lint format unit integration test kafka-up kafka-down up down demo \
        train train-smoke train-verifier bench eval chaos chaos-ci soak lock audit

install: .installed  ## install qrsight's runtime (editable): what `make up` needs, no more

# One marker per install, each re-run when pyproject.toml changes, so every target works
# from a clean clone and installs only what it needs: `make up` the runtime (no torch,
# no test or plotting tools); `make test` the dev extra and the train extra (torch, for the
# training smoke test); `make train` the train extra; `make bench`/`make eval` the bench
# extra (gevent for the seed's design, matplotlib for the plots) and the train extra (the
# YOLOv8n-sized graph is exported with torch). The runtime's exact versions come from
# requirements.lock, checked against its hashes (as in the images); qrsight itself goes on top.
.installed: pyproject.toml requirements.lock
	$(PYTHON) -m pip install -q --require-hashes --no-deps -r requirements.lock
	$(PYTHON) -m pip install -q --no-deps -e .
	touch $@

.installed-dev: pyproject.toml
	$(PYTHON) -m pip install -q -e '.[dev,train]'
	touch $@

.installed-train: pyproject.toml
	$(PYTHON) -m pip install -q -e '.[train]'
	touch $@

.installed-bench: pyproject.toml
	$(PYTHON) -m pip install -q -e '.[bench,train]'
	touch $@

lint: .installed-dev  ## ruff (lint + format check) and mypy
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

unit: .installed-dev  ## tests that start nothing
	$(PYTHON) -m pytest tests/unit

integration: .installed-dev  ## tests on a real Kafka broker (QRSIGHT_KAFKA_BOOTSTRAP if set, else one started here)
	$(PYTHON) -m pytest tests/integration

test: .test-tools lint unit integration chaos-ci  ## everything CI runs

chaos-ci: .installed-dev  ## the chaos suite at CI size (1,000 images per scenario, ~3.5 min)
	$(PYTHON) -m pytest tests/chaos

chaos: .installed-dev  ## the chaos suite at full size (10,000 images per scenario); prints the table
	CHAOS_IMAGES=$${CHAOS_IMAGES:-10000} CHAOS_REPORT=runs/chaos.md \
	  $(PYTHON) -m pytest tests/chaos --timeout 3600 -p no:cacheprovider

soak: .installed-dev  ## workers at 80 % of capacity, mixed input, SOAK_MINUTES (5); plot in runs/soak
	$(PYTHON) -m tests.chaos.soak --minutes $${SOAK_MINUTES:-5} --out runs/soak

# requirements.lock: the runtime's dependencies (no extras) at exact versions with the
# hashes of every file PyPI has for them, for every platform and Python >= 3.11.
lock: .installed-lock  ## regenerate requirements.lock from pyproject.toml (uv pip compile --generate-hashes)
	$(PYTHON) -m uv pip compile pyproject.toml --generate-hashes --universal --python-version 3.11 \
	  --custom-compile-command "make lock" -o requirements.lock

# uv only resolves the lock (a maintainer's tool, not a dependency of qrsight).
.installed-lock:
	$(PYTHON) -m pip install -q 'uv>=0.5'
	touch $@

audit: .installed-dev  ## requirements.lock against PyPI's vulnerability advisories (pip-audit); says what it could not check
	$(PYTHON) deploy/local/audit_lock.py requirements.lock

# Chromium, docker-compose and kustomize for the browser and deploy checks (once).
.test-tools: deploy/local/test-tools.sh
	deploy/local/test-tools.sh
	touch $@

kafka-up:  ## fetch (once) and start a local single-node Apache Kafka (KRaft); KAFKA_SECURITY=sasl_ssl secures it
	deploy/local/kafka.sh up

kafka-down:
	deploy/local/kafka.sh down

.PHONY: cluster-up cluster-down chaos-cluster
cluster-up:  ## a local three-node Kafka cluster (KRaft, replication 3); KAFKA_SECURITY=sasl_ssl secures it; again: restarts nodes that are down
	deploy/local/kafka.sh cluster-up

cluster-down:  ## stop the three-node cluster (its data stays in .kafka/cluster)
	deploy/local/kafka.sh cluster-down

chaos-cluster: .installed-dev  ## broker failover under load on a three-node cluster, every scenario at full size; prints the table
	CHAOS_CLUSTER_SIZE=full CHAOS_REPORT=runs/chaos-cluster.md \
	  $(PYTHON) -m pytest tests/chaos/test_cluster.py --timeout 7200 -p no:cacheprovider

up: .installed  ## the whole local stack in the foreground: Kafka, topics, workers, API (Ctrl-C stops it)
	QRSIGHT_KAFKA_BOOTSTRAP=$(LOCAL_BOOTSTRAP) $(PYTHON) -m producer_tools.stack

down:
	deploy/local/kafka.sh down

demo:  ## with `make up` running: publish the samples and print their detections
	QRSIGHT_KAFKA_BOOTSTRAP=$(LOCAL_BOOTSTRAP) $(PYTHON) -m producer_tools.publish samples/ --wait --compact

train: .installed-train  ## reproduce the shipped detector and its crop verifier from scratch (seeded)
	$(PYTHON) -m training.train --out models/

train-smoke: .installed-train
	$(PYTHON) -m training.train --smoke --out runs/smoke

train-verifier: .installed-train  ## only the crop verifier and its calibration, for the shipped detector (~20 min)
	$(PYTHON) -m training.verify --detector models/qrsight-qr-v3.onnx --out models/

eval: .installed-bench  ## evaluate the shipped detector on a manifest: make eval DATA=../shared/data/qr-real-dev
	$(PYTHON) -m training.eval.detector $(DATA)

# SIZE=quick: a few minutes, to check that it all runs; SIZE=full (default): the figures.
SIZE ?= full
bench: .installed-bench  ## the benchmark suite (P1-P3, sweep, scaling): writes bench/RESULTS.md
	$(PYTHON) -m bench.suite --size $(SIZE)

.PHONY: compose-test cuda-image-test
# Containers without Docker: podman builds the images (local stand-ins for the base images
# where no registry is reachable) and docker-compose runs the stack (README, "Docker Compose").
compose-test: .installed-dev  ## build the CPU image and test docker-compose.yml end to end (podman)
	PYTHON=$(PYTHON) deploy/local/containers.sh prepare
	$(PYTHON) -m pytest tests/compose/test_compose_stack.py

cuda-image-test: .installed-dev  ## build the CUDA image and check it on the CPU provider (no GPU needed)
	PYTHON=$(PYTHON) deploy/local/containers.sh setup
	PYTHON=$(PYTHON) deploy/local/containers.sh build-cuda
	$(PYTHON) -m pytest tests/compose/test_cuda_image.py

.PHONY: soak-api
SOAK_API_S ?= 300
soak-api: .installed-dev  ## API soak: mixed 200/400/401/413/429/503/504 traffic for SOAK_API_S seconds (default 300); plot in runs/soak-api/
	$(PYTHON) -m tests.chaos.soak_api --duration $(SOAK_API_S)
