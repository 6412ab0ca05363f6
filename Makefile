# merg: `make demo` runs the main job end to end on the embedded default; `make test` runs the tests.
# Both install everything into .venv first (once; again only when pyproject.toml or the setup changes).
VENV ?= .venv
MERG := $(VENV)/bin/merg
STAMP := $(VENV)/.merg-installed
DEMO_DIR ?= data/demo
DEMO_DIALOGUES ?= 12
PYTEST_ARGS ?=

.PHONY: install demo meld-text test test-fast clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml infra/setup.sh
	bash infra/setup.sh

demo: $(STAMP)
	bash infra/check_system.sh tools
	$(MERG) data synth --out $(DEMO_DIR)/mini-meld --dialogues $(DEMO_DIALOGUES) --seed 0 --faults
	$(MERG) data summary --meld-root $(DEMO_DIR)/mini-meld
	$(MERG) preprocess --meld-root $(DEMO_DIR)/mini-meld --store $(DEMO_DIR)/store
	$(MERG) store stats --store $(DEMO_DIR)/store
	$(MERG) store query --store $(DEMO_DIR)/store --emotion joy,surprise --limit 5
	$(MERG) targets build --store $(DEMO_DIR)/store --kind next_utterance
	$(MERG) targets build --store $(DEMO_DIR)/store --kind teacher
	$(MERG) train -c configs/train/smollm2-demo.yaml --store $(DEMO_DIR)/store --set paths.runs=$(DEMO_DIR)/runs --resume
	$(MERG) train -c configs/train/smollm2-demo.yaml --store $(DEMO_DIR)/store --set paths.runs=$(DEMO_DIR)/runs --resume \
		--modality text --name smollm2-text
	$(MERG) evaluate train-emotion-classifier || echo "no MELD text: emotion scores use the NRC lexicon"
	$(MERG) sweep -c configs/sweeps/demo.yaml --store $(DEMO_DIR)/store
	$(MERG) probe --store $(DEMO_DIR)/store
	$(MERG) report -c configs/sweeps/demo.yaml --store $(DEMO_DIR)/store --out $(DEMO_DIR)/report
	@clip=$$($(VENV)/bin/python -c 'import json; rows = [json.loads(l) for l in open("$(DEMO_DIR)/mini-meld/ground_truth.jsonl")]; \
		print(next("$(DEMO_DIR)/mini-meld/" + r["clip"] for r in rows if r["split"] == "test" and not r["fault"] and r["has_audio"]))'); \
	reply="$(MERG) reply --run $(DEMO_DIR)/runs/smollm2-audio+video --clip $$clip --history 'Ross: I got the job!\nRachel: You did?' --speaker Ross"; \
	echo "$$reply"; eval "$$reply" && \
	echo "try it:  $$reply" && \
	echo "explore: $(MERG) explore --store $(DEMO_DIR)/store --runs $(DEMO_DIR)/runs --report $(DEMO_DIR)/report   (then open http://127.0.0.1:8765/)"

# The full real-MELD text sweep (README "Real MELD"): every step reads configs/sweeps/meld-text.yaml.
MELD_TEXT := configs/sweeps/meld-text.yaml
meld-text: $(STAMP)
	$(MERG) preprocess -c $(MELD_TEXT)
	$(MERG) targets build -c $(MELD_TEXT)
	$(MERG) train -c $(MELD_TEXT) --resume
	$(MERG) models install-vllm
	$(MERG) sweep -c $(MELD_TEXT)
	$(MERG) report -c $(MELD_TEXT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
