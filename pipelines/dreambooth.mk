# DreamBooth from photos to a model and samples, as file targets in OUT/:
#
#   make -f pipelines/dreambooth.mk MODEL=sd15 PHOTOS=photos/ TOKEN=sks CLASS=dog [OUT=run] [-j4]
#
#   OUT/instance.dbt          db-prep of PHOTOS
#   OUT/class.dbt             db-prior, as PRIOR_SHARDS shards OUT/class-I.dbt (--shard I/N) merged by cat
#   OUT/run/.done             db-train -o OUT/run (checkpoints in OUT/run/ckpt-NNNNNN)
#   OUT/model.safetensors     db-ckpt export of the newest checkpoint
#   OUT/samples/grid.png      db-sample into OUT/samples/ with a contact sheet
#
# Each stage's options are kept in OUT/.STAGE.args (the stage's arguments, as
# the shell sees them), rewritten only when they change, so changing a
# variable reruns that stage and the stages after it, and nothing else.  An
# interrupted make resumes: db-prior shards continue their files, db-train
# continues OUT/run from its newest checkpoint.  See man/dreambooth.7.

OUT ?= run
STEPS ?= 800
LR ?= 1e-6
NPRIOR ?= 200
SIZE ?= 512
PRIOR_SHARDS ?= 4
PRIOR_STEPS ?= 50
SAVE_EVERY ?= 200
NSAMPLES ?= 4
SAMPLE_STEPS ?= 50
SEED ?= 0
INSTANCE_PROMPT ?= a photo of $(TOKEN) $(CLASS)
CLASS_PROMPT ?= a photo of a $(CLASS)
SAMPLE_PROMPT ?= a photo of $(TOKEN) $(CLASS)
PREP_FLAGS ?=
PRIOR_FLAGS ?=
TRAIN_FLAGS ?=
EXPORT_FLAGS ?=
SAMPLE_FLAGS ?=
# runtime only (not recorded: changing them reruns nothing)
THREADS ?= 0
QUIET ?=
BIN ?=

.DELETE_ON_ERROR:
.SUFFIXES:
.PHONY: all prep prior train model samples clean

DB := $(if $(BIN),$(patsubst %/,%,$(BIN))/)
q = '$(subst ','\'',$(1))'
RT := --threads $(THREADS) $(if $(QUIET),-q)

ifeq ($(filter clean,$(MAKECMDGOALS)),)
$(foreach v,MODEL PHOTOS TOKEN CLASS,$(if $($(v)),,$(error $(v) is not set; usage: make -f pipelines/dreambooth.mk MODEL=M PHOTOS=DIR TOKEN=ID CLASS=NOUN [OUT=run] (see man/dreambooth.7))))
ifneq ($(shell mkdir -p $(call q,$(OUT)) && echo ok),ok)
$(error cannot create OUT=$(OUT))
endif
endif

# --- each stage's arguments (recorded in OUT/.STAGE.args) ---------------------
PREP_ARGS := --model $(call q,$(MODEL)) --size $(SIZE) --caption $(call q,$(INSTANCE_PROMPT)) $(PREP_FLAGS) \
    $(call q,$(PHOTOS))
PRIOR_ARGS := --model $(call q,$(MODEL)) --prompt $(call q,$(CLASS_PROMPT)) -n $(NPRIOR) --steps $(PRIOR_STEPS) \
    --width $(SIZE) --height $(SIZE) --seed $(SEED) $(PRIOR_FLAGS) --shard I/$(PRIOR_SHARDS)
TRAIN_ARGS := --model $(call q,$(abspath $(MODEL))) --instance $(call q,$(abspath $(OUT)/instance.dbt)) \
    --class $(call q,$(abspath $(OUT)/class.dbt)) --steps $(STEPS) --lr $(LR) --seed $(SEED) \
    --save-every $(SAVE_EVERY) $(TRAIN_FLAGS)
EXPORT_ARGS := $(EXPORT_FLAGS)
SAMPLE_ARGS := --prompt $(call q,$(SAMPLE_PROMPT)) -n $(NSAMPLES) --steps $(SAMPLE_STEPS) --width $(SIZE) \
    --height $(SIZE) --seed $(SEED) $(SAMPLE_FLAGS)

# Rewrite OUT/.$1.args when its content is not $2 (at parse time, so that
# make compares the stamps' times with those of the targets).  The old
# content is read into a variable first (the $$ defers $(file) to the eval,
# so the content itself is never parsed).  With $(file <) inside the
# $(call same,...) argument, GNU make 4.3 found identical content unequal
# for some lengths of the strings around it (seen as .train.args rewritten,
# and the run retrained, when only SAMPLE_PROMPT changed, in a checkout
# whose path had another length: tests/t1600-pipeline.sh).
same = $(and $(findstring x$(1)x,x$(2)x),$(findstring x$(2)x,x$(1)x))
settings = $(eval db_old_args := $$(file <$(OUT)/.$(1).args))$(if $(call same,$(db_old_args),$(1): $(strip $(2))),,$(file >$(OUT)/.$(1).args,$(1): $(strip $(2))))
ifeq ($(filter clean,$(MAKECMDGOALS)),)
$(call settings,prep,$(PREP_ARGS))
$(call settings,prior,$(PRIOR_ARGS))
$(call settings,train,$(TRAIN_ARGS))
$(call settings,export,$(EXPORT_ARGS))
$(call settings,sample,$(SAMPLE_ARGS))
endif

SHARDS := $(foreach i,$(shell seq 0 $$(($(PRIOR_SHARDS) - 1))),$(OUT)/class-$(i).dbt)
GRID := $(OUT)/samples/grid.png
# a MODEL that is one file is a prerequisite too (a folder's time means little)
MODEL_FILE := $(if $(wildcard $(MODEL)/.),,$(wildcard $(MODEL)))
PHOTO_FILES := $(wildcard $(PHOTOS)/*)

all: $(GRID)
prep: $(OUT)/instance.dbt
prior: $(OUT)/class.dbt
train: $(OUT)/run/.done
model: $(OUT)/model.safetensors
samples: $(GRID)
clean:
	rm -rf $(call q,$(OUT))

# --- prep ---------------------------------------------------------------------
$(OUT)/instance.dbt: $(OUT)/.prep.args $(PHOTOS) $(PHOTO_FILES) $(MODEL_FILE)
	$(DB)db-prep $(PREP_ARGS) $(RT) -o $@

# --- prior: shards, each resumable, merged -------------------------------------
# A shard's db-prior writes $@.work (which it resumes after a kill, as long as
# the settings in $@.work.args are the same), renamed to $@ when complete.
.SECONDARY: $(SHARDS)
$(OUT)/class-%.dbt: $(OUT)/.prior.args $(MODEL_FILE)
	@cmp -s $< $@.work.args || { rm -f $@.work $@.work.part; cp $< $@.work.args; }
	$(DB)db-prior $(subst --shard I/,--shard $*/,$(PRIOR_ARGS)) $(RT) -o $@.work
	mv $@.work $@ && rm -f $@.work.args

$(OUT)/class.dbt: $(SHARDS)
	cat $^ > $@.tmp && mv $@.tmp $@
	rm -f $^

# --- train: a new run, or a resume of the same one ------------------------------
# OUT/.run.id names what OUT/run is a run of: the training arguments and the
# inputs' checksums.  If they are the same and OUT/run has a checkpoint, the
# run resumes; otherwise OUT/run is removed and a new run starts.
$(OUT)/run/.done: $(OUT)/.train.args $(OUT)/instance.dbt $(OUT)/class.dbt $(MODEL_FILE)
	@id="$$(cat $(OUT)/.train.args; cksum < $(OUT)/instance.dbt; cksum < $(OUT)/class.dbt)"; \
	if [ -n "$$(ls -d $(OUT)/run/ckpt-[0-9]* 2>/dev/null)" ] && [ "$$id" = "$$(cat $(OUT)/.run.id 2>/dev/null)" ]; then \
	    echo "$(DB)db-train --resume $(OUT)/run $(RT)"; \
	    $(DB)db-train --resume $(OUT)/run $(RT); \
	else \
	    rm -rf $(OUT)/run $(OUT)/.run.id && printf '%s\n' "$$id" > $(OUT)/.run.id && \
	    echo "$(DB)db-train $(subst ",\",$(TRAIN_ARGS)) $(RT) -o $(OUT)/run" && \
	    $(DB)db-train $(TRAIN_ARGS) $(RT) -o $(OUT)/run; \
	fi
	touch $@

# --- export, sample -----------------------------------------------------------
$(OUT)/model.safetensors: $(OUT)/.export.args $(OUT)/run/.done
	rm -f $@
	$(DB)db-ckpt export $(EXPORT_ARGS) $(OUT)/run $@

$(GRID): $(OUT)/.sample.args $(OUT)/model.safetensors
	rm -rf $(OUT)/samples.tmp && mkdir $(OUT)/samples.tmp
	$(DB)db-sample --model $(OUT)/model.safetensors $(SAMPLE_ARGS) $(RT) -o $(OUT)/samples.tmp/sample-%02d.png \
	    --grid $(OUT)/samples.tmp/grid.png
	rm -rf $(OUT)/samples && mv $(OUT)/samples.tmp $(OUT)/samples
	@echo "dreambooth: model $(OUT)/model.safetensors, samples in $(OUT)/samples/, contact sheet $(GRID)"
