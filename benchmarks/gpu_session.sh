#!/usr/bin/env bash
# One GPU session, end to end: the benchmark (docs/performance.md), then the ADNI-size demo set, a
# `base` VQModel, a class-conditional `base` UNet, the evaluation and the pictures (docs/results.md).
# (The `base` VQModel is (32,64,128,256) since 2026-11-26; the runs of 2026-11-25 used what is now `wide`.)
# Every figure in those docs that says "H100" comes from this script; run it from the repo root:
#
#     bash benchmarks/gpu_session.sh RUN_DIR          # RUN_DIR default: gpu_run (git-ignored)
#
# Training length is a time budget, not a step count: the step counts are computed from the
# training-step rates that the benchmark measured a few minutes earlier in the same session
# (VQ_SECONDS / UNET_SECONDS of training at those rates, with a margin). Each training command also
# has a hard time limit (VQ_LIMIT / UNET_LIMIT); if it is hit, the run is finished from its last
# checkpoint (nothing is lost). Each stage also has about 3 minutes of fixed costs on an H100 (start-up,
# JPEG decoding, the latent cache, compilation: measured 2026-11-25), which the limits must leave room for;
# since then `--compile` on CUDA compiles in a child process first (adni_diffusers/compile_probe.py); on CPU
# inductor's cache then served the training process's compile (0-31% more in all, docs/performance.md), on a
# GPU not measured: + 480 s leaves room for a whole second compile (about 2 minutes on the H100, 2026-11-25).
# FORCE_VQ_STEPS / FORCE_UNET_STEPS set the step counts directly (e.g. with SKIP_BENCHMARK=1).
# PLAN_ONLY=1 logs every stage's command (the START lines of session.log) and runs none: read what a lease
# would run before it costs device time (tests/test_benchmarks.py parses each one as its program would).
# Step 1 alone is about 25 minutes on an H100 (estimated from the 2026-11-25 rates and compile times,
# not measured): in a 30-minute device lease run BENCH_ONLY=1 (step 1) or SKIP_BENCHMARK=1 (the rest).
# QUICK=train: for a 15-minute lease, one call (a short VQModel, then a whole train_unet run with CUDA graphs;
# see the block below). RUN_DIR outside $OUT (30,000 JPEGs); bring back logs and metrics:
#     QUICK=train timeout 560 bash benchmarks/gpu_session.sh /tmp/next; tar czf "$OUT/train.tgz" -C /tmp/next \
#         --exclude AD_NC --exclude '*.safetensors' --exclude 'checkpoint-*' .
# VQ_COMPILE: the VQ stage's compile flag alone (default: COMPILE's; QUICK=train: none, eager)
# QUICK=1: the plan for a 15-minute lease, one device call of at most QUICK_SECONDS (560) s: the UNet rows that
# decide recommendation A at batch 256, the `wide` vs `base` VQ step (recommendation C), batch 512
# in what time is left, then stop. Write RUN_DIR under $OUT so its JSON and markdown come back:
#     QUICK=1 bash benchmarks/gpu_session.sh "$OUT/quick"
set -uo pipefail

R=${1:-gpu_run}
VQ_SECONDS=${VQ_SECONDS:-180}
UNET_SECONDS=${UNET_SECONDS:-180}
SUBJECTS=${SUBJECTS:-1500}
EVAL_SAMPLES=${EVAL_SAMPLES:-1000}
ABLATION_SAMPLES=${ABLATION_SAMPLES:-128}
SKIP_BENCHMARK=${SKIP_BENCHMARK:-0}
BENCH_ONLY=${BENCH_ONLY:-0}
QUICK=${QUICK:-0}
if [ "$QUICK" = train ]; then
  # One device call: the data, a short VQModel, then a whole train_unet run with --compile_mode reduce-overhead
  # (300 steps): does it run compiled with CUDA graphs, how fast. The VQModel is only there for the UNet to
  # train on: 100 eager steps (its quality was measured on 2026-11-26: 1,860 compiled steps, 33.05 dB; the
  # UNet's speed does not depend on it), which saves the VQ compile check (80 s) and most of its steps.
  # The UNet checkpoints every 100 steps, so a stage cut by its limit is finished from a checkpoint. Run it
  # under `timeout` so that the call's files come back whatever happens. (Until 2026-11-26 QUICK=train was two
  # calls, VQ_ONLY=1 then SKIP_VQ=1, with 1,860 then 1,000 compiled VQ steps; both still work.)
  # H100, 2026-11-26 (git d96b5d7; 547 s in all): data 29 s, VQ stage 128 s (200 steps; the process exited 2 s
  # after its metrics), and the UNet stage's 360 s limit hit before its first training step: the compile check's
  # child took 154 s, the compile here 100 s, and the first step compiled everything again (the probe's input was
  # NCHW, the step's channels_last: fixed since). So the VQModel trains 100 steps (its 37 s of steps were the
  # part that shrinks) and the UNet stage has 400 s; TORCH_LOGS=recompiles names the input behind any compile
  # after the probe.
  SKIP_BENCHMARK=1; TRAIN_ONLY=1; export TORCH_LOGS=${TORCH_LOGS:-recompiles}
  FORCE_VQ_STEPS=${FORCE_VQ_STEPS:-100}; VQ_COMPILE=${VQ_COMPILE-}; VQ_LIMIT=${VQ_LIMIT:-200}
  FORCE_UNET_STEPS=${FORCE_UNET_STEPS:-300}; UNET_LIMIT=${UNET_LIMIT:-400}; DATA_LIMIT=${DATA_LIMIT:-60}
  UNET_EXTRA=${UNET_EXTRA:---checkpointing_steps 100}
  # The stage limits add up to more than the call's `timeout 560`: every stage (and the finish from a checkpoint)
  # is cut to what is left of DEADLINE_SECONDS, so the script ends itself, offload check included, before the
  # outer timeout (which kills bash alone: a stage's python, in its own process group, would run on while tar
  # reads its files). The stages' own limits stay the ceiling.
  # The UNet stage (and its finish) leaves RESERVE_AFTER_UNET of that for the offload check.
  DEADLINE_SECONDS=${DEADLINE_SECONDS:-540}; RESERVE_AFTER_UNET=${RESERVE_AFTER_UNET:-45}
fi
SKIP_VQ=${SKIP_VQ:-0}  # 1: reuse RUN_DIR's demo set and VQModel (from an earlier call), train the UNet only
# a CPU dry run of the plumbing: PRESET=tiny MP=no COMPILE= VQ_BATCH=4 UNET_BATCH=8 MIN_STEPS=4 SKIP_BENCHMARK=1
#   SAMPLE_STEPS=2 ...
# SAMPLE_STEPS: DDIM steps of the UNet's sample grids and samples.png (on the CPU the plan's 50 took 80 s of a tiny run)
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
PRESET=${PRESET:-base}
# VQ_PRESET: the first stage's size alone, e.g. the seed's size (`wide`, docs/performance.md recommendation C):
#   VQ_PRESET=wide BENCH_ONLY=1 ...            its compiled training step, after the base rows
#   VQ_PRESET=wide SKIP_BENCHMARK=1 VQ_ONLY=1 FORCE_VQ_STEPS=1034 ...   its PSNR/SSIM (vq/metrics.json)
VQ_PRESET=${VQ_PRESET:-$PRESET}
VQ_ONLY=${VQ_ONLY:-0}
TRAIN_ONLY=${TRAIN_ONLY:-0}  # stop after the two training stages (no evaluation, no pictures)
PLAN_ONLY=${PLAN_ONLY:-0}  # 1: log every stage's command (START lines in session.log), run none of them
# the UNet stage's compile mode: CUDA graphs were +55% for the benchmark's UNet step (H200, 2026-11-26), and a
# whole train_unet run in this mode trained at 57 ms a step (H200, 2026-12-04, docs/performance.md); train_unet's
# own default on one GPU since then, passed here so that the log says it
UNET_COMPILE_MODE=${UNET_COMPILE_MODE:-reduce-overhead}
MP=${MP:-bf16}
COMPILE=${COMPILE---compile}
VQ_BATCH=${VQ_BATCH:-32}
UNET_BATCH=${UNET_BATCH:-256}
MIN_STEPS=${MIN_STEPS:-200}
# the device reaches no network: offline unless a test points HF_ENDPOINT somewhere (a dead port, for a failing push)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$R"
LOG="$R/session.log"
log() { echo "[$(date -u +%FT%TZ)] $*" | tee -a "$LOG"; }
time_left() {  # time_left LIMIT: LIMIT, or less when DEADLINE_SECONDS (from the script's start) less RESERVE leaves less
  local limit=$1 left
  if [ -n "${DEADLINE_SECONDS:-}" ]; then
    left=$((DEADLINE_SECONDS - SECONDS - ${RESERVE:-0}))
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "$limit"
}
shown() {  # the command as one line a shell reads back: a word with spaces, quotes, $ or globs is single-quoted
  local a words=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then words+=("$a"); else words+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${words[*]}"
}
phase() {  # phase NAME TIMEOUT_S CMD...: run, log its output and wall time
  local name=$1 limit; limit=$(time_left "$2"); shift 2
  if [ "$limit" -lt 20 ]; then log "SKIP $name: ${limit} s left of DEADLINE_SECONDS=${DEADLINE_SECONDS}"; return 124; fi
  touch "$R/.phase_started"  # finish_from_checkpoint tells this phase's products from older ones
  log "START $name: $(shown "$@")"
  if [ "$PLAN_ONLY" = 1 ]; then log "END $name (PLAN_ONLY=1: not run)"; return 0; fi
  local t0=$SECONDS
  timeout --signal=TERM "$limit" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  PHASE_END=$(date +%s)
  log "END $name rc=$rc seconds=$((SECONDS - t0))"
  tail -3 "$R/$name.log" | sed 's/^/    /' | tee -a "$LOG"
  return $rc
}

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null); $(nproc) cores"
# torch's own version string (it names the CUDA build); the others' from their metadata: importing
# diffusers, accelerate and datasets here too cost 6 s of every call (a plan, which runs nothing, skips it)
[ "$PLAN_ONLY" = 1 ] || log "software: $(python -c 'import sys, torch; from importlib.metadata import version as v; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, " + ", ".join(f"{p} {v(p)}" for p in ("diffusers", "accelerate", "datasets")))')"
log "git: ${GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"

if [ "$QUICK" = 1 ]; then
  ROWS=(--steps 20 --warmup 5 --repeats 2)
  T0=$SECONDS
  # (ran on an H200, 2026-11-26, with two more rows: then over its 300 s before the reduce-overhead row)
  phase bench_unet 300 python benchmarks/run.py --device cuda --compile --profile --sections unet --batch-sizes 256 \
    --variants "example style" "+ torch.compile (= ours)" "ours, compile mode reduce-overhead" "ours, no channels_last" \
    "${ROWS[@]}" --out "$R/bench_unet.json" --markdown "$R/bench_unet.md"
  phase bench_vq 120 python benchmarks/run.py --device cuda --compile --sections vq --vq-preset base \
    --vq-batch-sizes 32 --variants "ours + compile" "${ROWS[@]}" --out "$R/bench_vq.json" --markdown "$R/bench_vq.md"
  phase bench_vq_candidate 120 python benchmarks/run.py --device cuda --compile --sections vq \
    --vq-preset wide --vq-batch-sizes 32 --variants "ours + compile" "${ROWS[@]}" \
    --out "$R/bench_vq_candidate.json" --markdown "$R/bench_vq_candidate.md"
  # what is left of QUICK_SECONDS: batch 512 in a process of its own (the compiler crashed there once, facts.md)
  LEFT=$(( ${QUICK_SECONDS:-560} - (SECONDS - T0) ))
  if [ "$LEFT" -ge 90 ]; then
    phase bench_unet512 "$LEFT" python benchmarks/run.py --device cuda --compile --sections unet --batch-sizes 512 \
      --variants "+ torch.compile (= ours)" "ours, compile mode reduce-overhead" "${ROWS[@]}" \
      --out "$R/bench_unet512.json" --markdown "$R/bench_unet512.md"
  else
    log "bench_unet512 skipped: ${LEFT} s left of QUICK_SECONDS"
  fi
  log "DONE (QUICK)"; exit 0
fi

# 1. the benchmark, one section per process so a section that runs long (or crashes) loses only itself
# (sizes trimmed to fit a 30-minute device lease: UNet batch 256, VQ batch 32, two samplers at batch 256;
# --profile: where the time of the "ours" rows goes, docs/performance.md recommendation A)
# (a killed section keeps its finished rows in bench_*.partial.json)
if [ "$SKIP_BENCHMARK" != 1 ]; then
  ROWS=(--steps 20 --warmup 5 --repeats 3)
  phase bench_unet 720 python benchmarks/run.py --device cuda --compile --profile --sections unet --batch-sizes 256 \
    "${ROWS[@]}" --out "$R/bench_unet.json" --markdown "$R/bench_unet.md"
  # batch 512 in a process of its own: the compiler crashed there once (facts.md)
  phase bench_unet512 360 python benchmarks/run.py --device cuda --compile --sections unet --batch-sizes 512 \
    --variants "+ torch.compile (= ours)" "ours, compile mode reduce-overhead" "${ROWS[@]}" \
    --out "$R/bench_unet512.json" --markdown "$R/bench_unet512.md"
  phase bench_vq 480 python benchmarks/run.py --device cuda --compile --profile --sections vq latent_cache \
    --vq-preset "$PRESET" --vq-batch-sizes 32 "${ROWS[@]}" --out "$R/bench_vq.json" --markdown "$R/bench_vq.md"
  if [ "$VQ_PRESET" != "$PRESET" ]; then  # the candidate first stage, in the same session as the rows above
    phase bench_vq_candidate 300 python benchmarks/run.py --device cuda --compile --sections vq --vq-preset "$VQ_PRESET" \
      --vq-batch-sizes 32 --variants "ours + compile" "ours" "${ROWS[@]}" --out "$R/bench_vq_candidate.json" \
      --markdown "$R/bench_vq_candidate.md"
  fi
  phase bench_sampling 240 python benchmarks/run.py --device cuda --compile --sections sampling \
    --sampling-paths pipeline --sample-batch-sizes 256 --samplers ddpm dpm++ --out "$R/bench_sampling.json" \
    --markdown "$R/bench_sampling.md"
  # the generate command's own path (a CPU generator per image, PNGs, guidance 2 for a class): a section of its own,
  # so that it cannot cost the pipeline rows above their JSON
  phase bench_sampling_generate 240 python benchmarks/run.py --device cuda --sections sampling \
    --sampling-paths generate --generate-batch-sizes 256 --samplers ddpm dpm++ \
    --out "$R/bench_sampling_generate.json" --markdown "$R/bench_sampling_generate.md"
fi
if [ "$BENCH_ONLY" = 1 ]; then log "DONE (BENCH_ONLY)"; exit 0; fi

# 2. an ADNI-size demo set (1,500 subjects x 20 slices)
if [ "$SKIP_VQ" = 1 ]; then
  [ -f "$R/vq/metrics.json" ] && [ -d "$R/AD_NC" ] || { log "SKIP_VQ=1 needs $R/AD_NC and a finished $R/vq"; exit 1; }
  log "SKIP_VQ=1: reusing $R/AD_NC and $R/vq"
else
  phase demo_data "${DATA_LIMIT:-300}" python -m adni_diffusers.cli demo-data "$R/AD_NC" --subjects "$SUBJECTS" \
    --overwrite --contact-sheet "$R/AD_NC_contact_sheet.png"
fi

# training steps from the measured rates (compiled rows where compilation worked)
# (a VQ_PRESET other than PRESET: its own rate, from bench_vq_candidate.json; base's would overrun VQ_SECONDS)
VQ_BENCH=bench_vq.json; [ "$VQ_PRESET" != "$PRESET" ] && VQ_BENCH=bench_vq_candidate.json
read -r VQ_STEPS UNET_STEPS < <(python - "$R" "$VQ_SECONDS" "$UNET_SECONDS" "$VQ_BATCH" "$UNET_BATCH" "$MIN_STEPS" \
  "$VQ_BENCH" <<'EOF'
import json, sys
from pathlib import Path
r, vq_s, unet_s = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
vq_batch, unet_batch, min_steps = (int(a) for a in sys.argv[4:7])
vq_bench = sys.argv[7]
def rate(file, ok, default):
    try:
        rows = [x for x in json.loads((r / file).read_text())[file.split("_")[1].split(".")[0]]["rows"] if "error" not in x]
        return max(x["images_per_s"] for x in rows if ok(x))
    except Exception:
        return default
vq = rate(vq_bench, lambda x: x["batch_size"] == vq_batch and x["variant"] in ("ours", "ours + compile"), 150.0)
unet = rate("bench_unet.json", lambda x: x["batch_size"] == unet_batch and x["config"]["data"] == "loader" and x["config"]["ema"] == "package", 2000.0)
# 0.8: logging, sample grids and data loading that the benchmark's step does not have
print(max(min_steps, min(10000, int(0.8 * vq_s * vq / vq_batch))),
      max(min_steps, min(30000, int(0.8 * unet_s * unet / unet_batch))))
EOF
)
VQ_STEPS=${FORCE_VQ_STEPS:-$VQ_STEPS}; UNET_STEPS=${FORCE_UNET_STEPS:-$UNET_STEPS}  # or set the steps yourself
log "VQ: $VQ_STEPS steps of $VQ_BATCH; UNet: $UNET_STEPS steps of $UNET_BATCH"

written_by_this_phase() { [ -f "$1" ] && [ "$1" -nt "$R/.phase_started" ]; }

train_stage() {  # train_stage NAME LIMIT SCRIPT OUT PRODUCT STEPS ARGS...: train; if it failed or was cut, finish it
  local name=$1 limit=$2 script=$3 out=$4 product=$5 steps=$6; shift 6
  phase "$name" "$limit" python "$script" "$@" --output_dir "$out" --max_train_steps "$steps"
  local rc=$?
  # how long the process lived after writing its final metrics: for the VQ stage the model card and the exit
  # (24 s on the H200, 2026-11-26; its data workers are stopped since), for the UNet also its final sample grid
  if written_by_this_phase "$out/$product"; then
    log "$product written $((PHASE_END - $(stat -c %Y "$out/$product"))) s before the stage's process ended"
  fi
  [ "$rc" = 0 ] || finish_from_checkpoint "$script" "$out" "$product" "$@"
}

finish_from_checkpoint() {  # the time limit hit: finish the run from its last checkpoint
  local script=$1 out=$2 product=$3; shift 3
  # A run whose limit hit after it wrote its metrics (its exit was cut, 2026-11-26) is finished: "finishing" it
  # from an older checkpoint would replace the trained model with that checkpoint's.
  if written_by_this_phase "$out/$product"; then log "$out has its final metrics from this stage (only the exit failed or was cut): nothing to finish"; return 0; fi
  local last; last=$(ls -d "$out"/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
  [ -n "$last" ] || { log "no checkpoint in $out"; return 1; }
  log "finishing $out from $last"
  local args=() a skip=0
  for a in "$@"; do  # no step left to train: nothing to compile (drop --compile and --compile_mode M)
    if [ "$skip" = 1 ]; then skip=0; elif [ "$a" = --compile_mode ]; then skip=1; elif [ "$a" != --compile ]; then args+=("$a"); fi
  done
  local limit; limit=$(time_left 600)
  if [ "$limit" -lt 20 ]; then log "no time left to finish $out (${limit} s)"; return 124; fi
  timeout --signal=TERM "$limit" python "$script" "${args[@]}" --output_dir "$out" --resume_from_checkpoint "$last" \
    --max_train_steps "${last##*-}" >> "$R/$(basename "$out")_finish.log" 2>&1
}

# 3. the VQModel (base preset: 4x32x32 latents, 8192 codes), default loss (MSE + 0.5 SSIM)
# VQ_EXTRA / UNET_EXTRA: more flags for a stage, last (so they override), e.g. UNET_EXTRA="--cudnn_benchmark" (UNET_COMPILE_MODE: the UNet's --compile_mode)
VQ_ARGS=(--train_data_dir "$R/AD_NC" --preset "$VQ_PRESET" --seed 0 --mixed_precision "$MP" --allow_tf32 --channels_last
         ${VQ_COMPILE-$COMPILE} --train_batch_size "$VQ_BATCH" --learning_rate 4e-4 --lr_warmup_steps 200 --dataloader_num_workers 4
         --save_images_steps 500 --checkpointing_steps 400 --checkpoints_total_limit 2 --report_to tensorboard ${VQ_EXTRA:-})
if [ "$SKIP_VQ" != 1 ]; then
  train_stage train_vqmodel "${VQ_LIMIT:-$((VQ_SECONDS + 480))}" train_vqmodel.py "$R/vq" metrics.json "$VQ_STEPS" \
    "${VQ_ARGS[@]}"
fi
if [ "$VQ_ONLY" = 1 ]; then log "DONE (VQ_ONLY): $(cat "$R/vq/metrics.json" 2>/dev/null | tr -d '\n ')"; exit 0; fi

# 4. the class-conditional UNet on the cached latents: v-prediction, Min-SNR-5, EMA
UNET_ARGS=(--vqmodel "$R/vq" --train_data_dir "$R/AD_NC" --preset "$PRESET" --seed 0 --conditional
           --prediction_type v_prediction --snr_gamma 5 --use_ema --ema_max_decay 0.999 --mixed_precision "$MP"
           --allow_tf32 --channels_last --latents_on_device $COMPILE ${COMPILE:+--compile_mode "$UNET_COMPILE_MODE"}
           --train_batch_size "$UNET_BATCH" --learning_rate 4e-4 --lr_warmup_steps 200
           --eval_batch_size 256 --save_images_epochs 10 --sample_inference_steps "$SAMPLE_STEPS"
           --checkpointing_steps 500 --checkpoints_total_limit 2 --report_to tensorboard ${UNET_EXTRA:-})
RESERVE=${RESERVE_AFTER_UNET:-0} train_stage train_unet "${UNET_LIMIT:-$((UNET_SECONDS + 480))}" train_unet.py "$R/ldm" train_metrics.json "$UNET_STEPS" \
  "${UNET_ARGS[@]}"

# enable_model_cpu_offload against the pipeline kept on the GPU (same seeds; a few seconds, last: a call cut by
# its time limit loses only this). On a CPU it writes "checked": false.
if [ -f "$R/ldm/model_index.json" ] || [ "$PLAN_ONLY" = 1 ]; then
  phase offload_check 120 python benchmarks/offload_check.py --model "$R/ldm" --out "$R/offload_check.json"
fi

if [ "$TRAIN_ONLY" = 1 ]; then
  log "DONE (TRAIN_ONLY): vq $(cat "$R/vq/metrics.json" 2>/dev/null | tr -d '\n ')"
  log "ldm $(cat "$R/ldm/train_metrics.json" 2>/dev/null | tr -d '\n ') $(grep -o '"compiled": [a-z]*\|"compile_mode[a-z_]*": [^,]*' "$R/ldm/training_args.json" | tr '\n' ' ')"
  exit 0
fi

# 5. evaluation: N per class, the floor, UMAP, memorisation, ablations (bf16 sampling)
# (written to <model>/evaluation, the folder the model card reads its numbers from)
phase evaluate 420 python -m adni_diffusers.cli evaluate --model "$R/ldm" --num-samples "$EVAL_SAMPLES" \
  --dtype "${EVAL_DTYPE:-bfloat16}" --ablations --ablation-samples "$ABLATION_SAMPLES"

# does the bf16 the evaluation sampled in keep this model's images? (float32 vs bf16, same seeds)
phase dtype_check 240 python benchmarks/dtype_check.py --model "$R/ldm" --device cuda --num-images 64 --batch-size 64 \
  --out "$R/dtype_check.json"

# 6. pictures: DDPM-1000 grids per class (+ the GIF), a counterfactual trade-off
for c in AD NC; do
  phase "generate_$c" 200 python -m adni_diffusers.cli generate --model "$R/ldm" --out "$R/samples/$c" --class "$c" \
    --num-images 16 --scheduler ddpm --steps "${DDPM_STEPS:-1000}" --guidance 2 --seed 0 $([ "$c" = AD ] && echo --gif)
done
phase counterfactual 240 python -m adni_diffusers.cli counterfactual --model "$R/ldm" --measure --control --to AD \
  --strength 0.2 0.4 0.6 0.8 1.0 --guidance 3 --scheduler ddim --steps 25 --seed 0 --max-images "${CF_IMAGES:-200}" \
  --feature-net-cache "$R/ldm/feature_net" --out "$R/counterfactual"
log "DONE"
