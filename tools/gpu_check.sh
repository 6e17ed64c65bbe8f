#!/usr/bin/env bash
# tools/gpu_check.sh OUT_DIR — the GPU checks of cxr_fast in one command (< 8 minutes on one H100).
#
# Needs only python3 with torch (CUDA), timm, accelerate, pandas, pyarrow; DALI, webdataset
# and wandb are optional (what is missing is reported as skipped). The project need not be
# installed: it runs from this checkout with PYTHONPATH. Parts, cheapest and most important
# first, each under its own time limit so the whole stays within the budget:
#   1. env      machine, GPU, library versions                          -> OUT/env.json
#   2. data     small phantom + 256 px shards; loader images/s at 224 px (resident target
#               >= 30,000 img/s; wds/dali reported or skipped)          -> OUT/data.json
#   3. resume   train on CUDA, kill -9 after the first epoch's checkpoint, rerun the same
#               command, check it resumes                               -> OUT/resume.json
#   4. train    `bench train` synthetic vs resident, native size, bf16, channels-last, for
#               resnet50 convnext_tiny efficientnet_b0 vit_base convnext_large: eager first,
#               then torch.compile while time is left                  -> OUT/train.json
#   5. summary  status, seconds and headline numbers of every part     -> OUT/summary.json
# A part that fails or times out is recorded in summary.json; the script itself always
# exits 0 once OUT/summary.json is written.
#
# Knobs (environment): GPU_CHECK_BUDGET (seconds, default 450), GPU_CHECK_ARCHS,
# GPU_CHECK_IMAGES (phantom size, default 3000), GPU_CHECK_PRECISION (bf16),
# GPU_CHECK_STEPS (10), GPU_CHECK_IMAGE_SIZE / GPU_CHECK_BATCH (default: each arch's native
# size and registry batch), GPU_CHECK_COMPILE (1), GPU_CHECK_RESUME_ARGS, PYTHON (python3).
# A CPU smoke run of the same script:
#   GPU_CHECK_ARCHS=test_resnet GPU_CHECK_IMAGES=120 GPU_CHECK_PRECISION=fp32 GPU_CHECK_IMAGE_SIZE=32 \
#     GPU_CHECK_BATCH=8 GPU_CHECK_STEPS=2 GPU_CHECK_COMPILE=0 tools/gpu_check.sh /tmp/gpu_check

set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: tools/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
ARCHS=${GPU_CHECK_ARCHS:-"resnet50 convnext_tiny efficientnet_b0 vit_base convnext_large"}
IMAGES=${GPU_CHECK_IMAGES:-3000}
PRECISION=${GPU_CHECK_PRECISION:-bf16}
STEPS=${GPU_CHECK_STEPS:-10}
IMAGE_SIZE=${GPU_CHECK_IMAGE_SIZE:-}
BATCH=${GPU_CHECK_BATCH:-}
COMPILE=${GPU_CHECK_COMPILE:-1}
RESUME_ARGS=${GPU_CHECK_RESUME_ARGS:-"image_size=64 batch_size=32"}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cxr_gpu_check.XXXXXX")
PARTS="$WORK/parts.jsonl"      # one line per part: name, status, seconds, log
: > "$PARTS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
cd "$ROOT" || exit 2
START=$SECONDS

left() { echo $(( BUDGET - (SECONDS - START) )); }

# part NAME LIMIT_SECONDS COMMAND... : run with a time limit, record status and log.
part() {
    local name=$1 limit=$2
    shift 2
    local log="$WORK/$name.log" begun=$SECONDS status
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped (time budget spent)"
        printf '{"part": "%s", "status": "skipped", "reason": "time budget", "seconds": 0, "log": ""}\n' "$name" >> "$PARTS"
        return 1
    fi
    echo "== $name (limit ${limit}s)"
    timeout --signal=KILL "$limit" "$@" > "$log" 2>&1
    local code=$?
    case $code in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    echo "   $status ($(( SECONDS - begun ))s)"
    [ "$status" = ok ] || tail -n 5 "$log" | sed 's/^/   | /'
    "$PY" - "$name" "$status" "$(( SECONDS - begun ))" "$log" "$code" >> "$PARTS" <<'EOF' || true
import json, sys
name, status, seconds, log, code = sys.argv[1:]
try:
    tail = open(log, errors="replace").read()[-2000:]
except OSError:
    tail = ""
print(json.dumps({"part": name, "status": status, "seconds": int(seconds), "exit_code": int(code), "log": tail}))
EOF
    [ "$status" = ok ]
}

limit() {  # min(wanted, what is left of the budget minus a reserve for the summary)
    local want=$1 rest
    rest=$(( $(left) - 15 ))
    [ "$rest" -lt "$want" ] && want=$rest
    echo "$want"
}

# ---------------------------------------------------------------- 1. environment
part env "$(limit 60)" "$PY" - "$OUT/env.json" <<'EOF'
import json, subprocess, sys
from cxr_fast.bench.machine import machine_info
info = machine_info().to_json()
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit", "--format=csv"],
        capture_output=True, text=True, timeout=20).stdout
except (OSError, subprocess.TimeoutExpired) as error:
    info["nvidia_smi"] = f"not available: {error}"
import importlib.util
info["optional"] = {name: importlib.util.find_spec(name) is not None for name in ("nvidia.dali", "webdataset", "wandb")}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info["gpu"]), info["optional"])
EOF

# ---------------------------------------------------------------- 2. data + loaders
SHARDS="$WORK/shards"
part shards "$(limit 120)" bash -c "
    '$PY' -m cxr_fast.data.phantom --out '$WORK/phantom' --n-images $IMAGES --seed 0 --image-size 256 &&
    '$PY' -m cxr_fast.data.shard_dataset --source mimic --root '$WORK/phantom/mimic-cxr-jpg' \
        --demographics '$WORK/phantom/mimic-iv' --out '$SHARDS' --size 256 --shard-size 500 --no-progress"
HAVE_SHARDS=$?

DATA_SIZE=${IMAGE_SIZE:-224}
DATA_BATCH=${BATCH:-256}
if [ $HAVE_SHARDS -eq 0 ]; then
    part data "$(limit 90)" "$PY" -m cxr_fast.bench data --shards "$SHARDS" --loaders wds,dali-stock,dali,resident \
        --image-size "$DATA_SIZE" --batch-size "$DATA_BATCH" --repeats 5 --seconds 2 --json "$OUT/data.json"
else
    part data 0 true
fi

# ---------------------------------------------------------------- 3. resume after kill -9
if [ $HAVE_SHARDS -eq 0 ]; then
    # shellcheck disable=SC2086  # RESUME_ARGS is a list of key=value words
    part resume "$(limit 150)" "$PY" -m cxr_fast.bench resume --shards "$SHARDS" --workdir "$WORK" --timeout 120 \
        --json "$OUT/resume.json" $RESUME_ARGS
else
    part resume 0 true
fi

# ---------------------------------------------------------------- 4. training throughput
train_args() {  # arch, loader -> bench train arguments
    local args=(train --arch "$1" --loader "$2" --precision "$PRECISION" --channels-last --steps "$STEPS" --repeats 3)
    [ -n "$IMAGE_SIZE" ] && args+=(--image-size "$IMAGE_SIZE")
    [ -n "$BATCH" ] && args+=(--batch-size "$BATCH")
    printf '%s\n' "${args[@]}"
}

LOADER=resident
[ $HAVE_SHARDS -eq 0 ] || LOADER=synthetic   # without shards, at least the model's ceiling
for arch in $ARCHS; do
    mapfile -t args < <(train_args "$arch" "$LOADER")
    part "train-$arch-eager" "$(limit 90)" "$PY" -m cxr_fast.bench "${args[@]}" ${SHARDS:+--shards "$SHARDS"} \
        --warmup 5 --json "$WORK/train-$arch-eager.json"
done
if [ "$COMPILE" = 1 ]; then
    for arch in $ARCHS; do
        mapfile -t args < <(train_args "$arch" "$LOADER")
        part "train-$arch-compile" "$(limit 150)" "$PY" -m cxr_fast.bench "${args[@]}" --compile \
            ${SHARDS:+--shards "$SHARDS"} --warmup 3 --json "$WORK/train-$arch-compile.json"
    done
fi

# ---------------------------------------------------------------- 5. merge + summary
"$PY" - "$OUT" "$WORK" "$PARTS" "$(( SECONDS - START ))" "$BUDGET" <<'EOF'
import glob, json, os, sys
out, work, parts_file, seconds, budget = sys.argv[1:]
parts = [json.loads(line) for line in open(parts_file) if line.strip()]
train = []
for path in sorted(glob.glob(os.path.join(work, "train-*.json"))):
    with open(path) as handle:
        train.append(json.load(handle))
statuses = {p["part"]: p for p in parts}
for p in parts:  # runs that produced no JSON still appear, with their status and log
    if p["part"].startswith("train-") and p["status"] != "ok":
        train.append({"kind": "train", "part": p["part"], "status": p["status"], "log": p["log"]})
with open(os.path.join(out, "train.json"), "w") as handle:
    json.dump(train, handle, indent=2)

def load(name):
    try:
        with open(os.path.join(out, name)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None

headline = {}
data = load("data.json")
if data:
    resident = data["loaders"].get("resident", {})
    if resident.get("status") == "ok":
        rate = resident["images_per_second"]["median"]
        headline["resident_images_per_second"] = rate
        headline["resident_target_30000_met"] = rate >= 30000
    headline["loaders"] = {name: (entry["images_per_second"]["median"] if entry.get("status") == "ok"
                                  else f"{entry.get('status')}: {entry.get('reason')}")
                           for name, entry in data["loaders"].items()}
resume = load("resume.json")
if resume:
    headline["resume_ok"] = resume.get("ok")
headline["train"] = {}
for entry in train:
    if "settings" in entry:
        s = entry["settings"]
        key = f"{s['arch']} {s['image_size']}px b{s['batch_size']} {'compile' if s['compile'] else 'eager'}"
        headline["train"][key] = {"synthetic": entry["synthetic"]["images_per_second"]["median"],
                                  "real": entry.get("real", {}).get("images_per_second", {}).get("median"),
                                  "efficiency": entry.get("efficiency"),
                                  "max_memory_gib": entry.get("max_memory_gib")}
summary = {"seconds": int(seconds), "budget_seconds": int(budget),
           "parts": [{k: v for k, v in p.items() if k != "log" or p["status"] != "ok"} for p in parts],
           "headline": headline}
with open(os.path.join(out, "summary.json"), "w") as handle:
    json.dump(summary, handle, indent=2)
print(json.dumps(headline, indent=2))
EOF
echo "gpu_check: $(( SECONDS - START ))s; results in $OUT ($(ls "$OUT" | wc -l) files); work files in $WORK"
exit 0
