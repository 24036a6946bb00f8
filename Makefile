# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv proto lint bench clean fuzz

venv: $(STAMP)

# torch is installed first and pinned: a CPU-only 2.13.0 wheel is served locally,
# any other version would pull the CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[ml,report,keras,dev,privacy,cluster,simulation]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/enclavefl run examples/digits/job.yaml

test: $(STAMP)
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m mypy

# Every fuzz target for FUZZ_SECONDS each: coverage-guided with atheris if the
# fuzz extra is installed (pip install -e '.[fuzz]'), else hypothesis.
FUZZ_SECONDS ?= 30
fuzz: $(STAMP)
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS)

# Regenerates the committed gRPC stubs from the .proto file.
proto: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -I src --python_out=src --grpc_python_out=src --mypy_out=src \
		src/enclavefl/proto/federation.proto

clean:
	rm -rf $(VENV) build dist src/*.egg-info
