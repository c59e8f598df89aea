# lol-rl: the two commands of the README, and the benchmark.
PYTHON ?= python
# torch is pinned to the CPU build; letting pip choose would pull a multi-GB CUDA build
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test bench-embedded bench-ppo

install:
	$(PYTHON) -m pip install -q "$(TORCH)" -e '.[dev]'

demo: install          ## install, then the whole chain on the embedded task (about 4 min on 2 cores)
	lol-rl train

test: install          ## install, then the test suite (what CI runs)
	WANDB_MODE=disabled $(PYTHON) -m pytest -q tests

bench-embedded: install  ## seeds 1-3 of the default chain with NLL, NLL on A>0 rows and A-LOL
	$(PYTHON) scripts/bench_embedded.py

bench-ppo: install       ## seeds 1-3: online PPO next to A-LOL (test reward, length, distinct-n, time per 1000 sequences)
	$(PYTHON) scripts/bench_ppo.py
