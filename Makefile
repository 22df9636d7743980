# make demo: environment + synthetic data + a short CPU training run + evaluation.
# make test: environment + the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo_sthv2
DEMO_RUN := logs_demo/VanillaVAE_demo
DEMO_ARGS ?=         # extra training arguments, e.g. DEMO_ARGS="--set trainer_params.max_epochs=2"
DEMO_DATA_ARGS ?=    # extra make_demo_data.py arguments, e.g. DEMO_DATA_ARGS="--videos 64"

.PHONY: demo ablation-demo minigrid-control minigrid-downstream atari-control test test-fast venv venv-dev venv-sim \
	clean-demo

venv: $(VENV)/.runtime            # what the scripts need
venv-dev: $(VENV)/.dev            # + what the tests need
venv-sim: $(VENV)/.sim            # + the simulators (record_episodes.py)

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing requirements.txt into $(VENV) (torch, torchvision, lpips, ...: about 2 GB, a few minutes)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.sim: $(VENV)/.runtime requirements-sim.txt
	$(PY) -m pip install -q -r requirements-sim.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt requirements-sim.txt
	@echo "installing requirements-dev.txt into $(VENV) (pytest, pythae, wandb, ...: about a minute)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

$(DEMO_DATA)/something-something-v2-train.json: make_demo_data.py | venv
	rm -rf $(DEMO_DATA) $(DEMO_RUN)     # new data: the old demo run no longer matches it
	$(PY) make_demo_data.py --out $(DEMO_DATA) $(DEMO_DATA_ARGS)

demo: venv $(DEMO_DATA)/something-something-v2-train.json
	$(PY) train_single_gpu.py --config configs/demo.yaml --resume auto --device cpu $(DEMO_ARGS)
	$(PY) evaluate.py --checkpoint $(DEMO_RUN)/checkpoints/vae_final.pt --output $(DEMO_RUN)/eval \
		--data-path $(DEMO_DATA) --lpips-net none --fid none --device cpu --save-reconstructions
	@echo
	@echo "TensorBoard logs:  $(VENV)/bin/tensorboard --logdir $(DEMO_RUN)"
	@echo "Checkpoints:       $(DEMO_RUN)/checkpoints/"
	@echo "Training pictures: $(DEMO_RUN)/images/"
	@echo "Evaluation:        $(DEMO_RUN)/eval/metrics.json, $(DEMO_RUN)/eval/reconstructions/"
	@echo "In a new shell, run 'source $(VENV)/bin/activate' before the README's python commands."

# docs/latent_actions.md's demo ablation: six latent action models (architecture x bottleneck x
# refill), two trainings at a time on one thread each (about 7 minutes), then one comparison.
ABLATION := logs_ablation
ABLATION_RUNS := laq_nsvq laq_gaussian laq_nsvq_lapa corrected_nsvq laq_none corrected_gaussian
TRAIN_LAM = OMP_NUM_THREADS=1 $(PY) train_single_gpu.py --config configs/latent_action_demo.yaml \
	--device cpu --resume auto --set logging_params.save_dir=$(ABLATION) --set data_params.num_workers=0
ablation-demo: venv $(DEMO_DATA)/something-something-v2-train.json
	($(TRAIN_LAM) --set logging_params.name=laq_nsvq && \
	 $(TRAIN_LAM) --set logging_params.name=laq_gaussian --set model_params.bottleneck=gaussian && \
	 $(TRAIN_LAM) --set logging_params.name=laq_nsvq_lapa --set model_params.code_refill=lapa) & \
	($(TRAIN_LAM) --set logging_params.name=corrected_nsvq --set model_params.architecture=corrected && \
	 $(TRAIN_LAM) --set logging_params.name=laq_none --set model_params.bottleneck=none && \
	 $(TRAIN_LAM) --set logging_params.name=corrected_gaussian --set model_params.architecture=corrected \
	    --set model_params.bottleneck=gaussian) & \
	wait
	OMP_NUM_THREADS=2 $(PY) compare_with_laq.py $(foreach r,$(ABLATION_RUNS),--model $(ABLATION)/$(r)/checkpoints/vae_final.pt) \
		--data-path $(DEMO_DATA) --offset 3 --pairs exact --num-pairs 256 --probe --probe-pairs 1500 \
		--lpips-net none --fid none --device cpu --output compare_ablation

# docs/latent_actions.md's positive control: MiniGrid episodes with their true actions, the
# discrete and continuous latent action models and their no-action twin (two trainings at a time
# on one thread each), then the comparison with the true-action probe. atari-control: the same
# on Breakout with random actions, a harder row.
MINIGRID := data/minigrid
CONTROL := logs_minigrid
CONTROL_NAME := minigrid
TRAIN_CONTROL = OMP_NUM_THREADS=1 $(PY) train_single_gpu.py --config configs/latent_action_minigrid.yaml \
	--device cpu --resume auto --set data_params.num_workers=0 --set logging_params.save_dir=$(CONTROL) \
	--set data_params.data_path=$(CONTROL_DATA) $(CONTROL_SET)
CONTROL_MODELS = $(foreach b,nsvq gaussian none,--model $(CONTROL)/$(CONTROL_NAME)_$(b)/checkpoints/vae_final.pt)
CONTROL_ARGS = --offset 1 --pairs exact --num-pairs 1024 --lpips-net none --fid none --device cpu

minigrid-control: venv-sim
	$(PY) record_episodes.py --env minigrid:MiniGrid-Empty-Random-6x6-v0 --episodes 1000 \
		--epsilon 0.25 --image-size 48 -j 2 --out $(MINIGRID)
	$(MAKE) control-runs CONTROL_DATA=$(MINIGRID)
	OMP_NUM_THREADS=2 $(PY) compare_with_laq.py $(CONTROL_MODELS) --data-path $(MINIGRID) \
		--actions $(MINIGRID)/actions.json $(CONTROL_ARGS) --output compare_minigrid

# docs/latent_actions.md's "Downstream" (after minigrid-control): a VAE of the demo's size on
# the same episodes, then downstream.py over the three latent action models and the VAE.
minigrid-downstream: venv-sim
	OMP_NUM_THREADS=2 $(PY) train_single_gpu.py --config configs/demo.yaml --device cpu --resume auto \
		--set data_params.num_workers=0 --set logging_params.save_dir=$(CONTROL) \
		--set logging_params.name=minigrid_vae --set data_params.data_path=$(MINIGRID) \
		--set model_params.image_size=48 --set data_params.image_size=48 --set exp_params.hflip=false
	OMP_NUM_THREADS=2 $(PY) downstream.py --episodes $(MINIGRID) --env minigrid:MiniGrid-Empty-Random-6x6-v0 \
		$(CONTROL_MODELS) --vae $(CONTROL)/minigrid_vae/checkpoints/vae_final.pt \
		--labels 16 64 256 --rollouts 100 -j 2 --device cpu --output downstream_minigrid

BREAKOUT := data/breakout
atari-control: CONTROL := logs_atari
atari-control: CONTROL_NAME := breakout
atari-control: venv-sim
	$(PY) record_episodes.py --env atari:Breakout --episodes 240 --max-steps 100 --sticky 0.5 \
		--image-size 64 -j 2 --out $(BREAKOUT)
	$(MAKE) control-runs CONTROL=$(CONTROL) CONTROL_NAME=$(CONTROL_NAME) CONTROL_DATA=$(BREAKOUT) CONTROL_SET="--set model_params.image_size=64 \
		--set data_params.image_size=64 --set trainer_params.max_steps=1000"
	OMP_NUM_THREADS=2 $(PY) compare_with_laq.py $(CONTROL_MODELS) --data-path $(BREAKOUT) \
		--actions $(BREAKOUT)/actions.json $(CONTROL_ARGS) --output compare_atari

control-runs:
	($(TRAIN_CONTROL) --set logging_params.name=$(CONTROL_NAME)_nsvq && \
	 $(TRAIN_CONTROL) --set logging_params.name=$(CONTROL_NAME)_none --set model_params.bottleneck=none) & \
	($(TRAIN_CONTROL) --set logging_params.name=$(CONTROL_NAME)_gaussian --set model_params.bottleneck=gaussian) & \
	wait

test: venv-dev
	$(PY) -m pytest -q -n 2 --dist worksteal tests

test-fast: venv-dev               # the edit loop: every test not marked slow, under a minute
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

clean-demo:                       # what make demo and the README's demo commands write
	rm -rf $(DEMO_DATA) logs_demo eval_demo demo_laq compare_demo report_out $(ABLATION) \
		compare_ablation $(MINIGRID) $(CONTROL) compare_minigrid downstream_minigrid* $(BREAKOUT) logs_atari compare_atari
