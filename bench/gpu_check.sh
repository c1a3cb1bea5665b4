#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most 9 minutes on one H100/H200, for a session lent a GPU:
#   1. the fast unit tests on CUDA (tests/test_cuda.py: each compares the GPU with the CPU), about a minute;
#   2. bench/gpu_speedrun.py: CIFAR-stem ResNet-18 to 94% and 95%, written to gpu_speedrun.json;
#   3. bench/gpu_chapters.py: chapters in the gpu profile, as many as fit in what is left, at a 2-minute chapter
#      budget (RESNET_LESSONS_CHAPTER_SECONDS), written to gpu_chapters.json with each chapter's seconds.
# Then bench/results/gpu_check.json says which step passed, on which device, in how many seconds.
#
#   bench/gpu_check.sh                      # on the GPU machine, from the repository root
#   bench/gpu_check.sh --smallest --out D   # the same steps at their smallest size on the CPU (its test)
#
# The GPU machine has no internet and its own python3 with torch: the library runs from src/ (PYTHONPATH), and
# the data is the JPEG copy of CIFAR-10 carried as .device-data/cifar10-train-jpeg.zip (or RESNET_LESSONS_DATA).
# From the session: mkdir -p .device-data && cp ../shared/data/cifar10-train-jpeg.zip .device-data/, then the
# device tool's run with carry [".device-data"], command "bash bench/gpu_check.sh", timeout 600; commit what it
# wrote under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."

SMALLEST=0
OUT=bench/results
while [ $# -gt 0 ]; do
    case "$1" in
        --smallest) SMALLEST=1 ;;
        --out) OUT="$2"; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --smallest, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "$SMALLEST" = 1 ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
LIMIT=540   # seconds for the whole script: 9 minutes
START=$SECONDS

if [ "$SMALLEST" = 1 ]; then
    export RESNET_LESSONS_TEST_DEVICE=cpu
    DATA=synthetic
    SPEEDRUN=(--smoke)
    CHAPTERS=(--profile smoke --chapters 05_training --chapter-seconds 10)
else
    DATA=${RESNET_LESSONS_DATA:-.device-data/cifar10-train-jpeg.zip}
    SPEEDRUN=(--data "$DATA")
    CHAPTERS=(--profile gpu --chapter-seconds 120)
fi

step() {  # step NAME COMMAND...: run it, log it, remember how it ended
    local name=$1; shift
    local begin=$SECONDS
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/gpu_check_$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - begin)) s"
    RESULTS+=("{\"step\": \"$name\", \"exit\": $status, \"seconds\": $((SECONDS - begin))}")
}

RESULTS=()
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu only')"
step unit_tests "$PY" -m pytest -q -o addopts="" -p no:cacheprovider tests/test_cuda.py
step speedrun "$PY" bench/gpu_speedrun.py "${SPEEDRUN[@]}" --out "$OUT/gpu_speedrun.json"
LEFT=$((LIMIT - (SECONDS - START)))
step chapters "$PY" bench/gpu_chapters.py "${CHAPTERS[@]}" --data "$DATA" --time-limit "$LEFT" \
    --out "$OUT/gpu_chapters.json"

STEPS=$(IFS=,; echo "${RESULTS[*]}")
"$PY" - "$OUT/gpu_check.json" "[$STEPS]" "$((SECONDS - START))" "$SMALLEST" <<'EOF'
import json, sys
import torch
path, steps, seconds, smallest = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
json.dump({"device": device, "smallest": smallest, "seconds": seconds, "steps": steps,
           "passed": all(s["exit"] == 0 for s in steps)}, open(path, "w"), indent=2)
print(f"wrote {path}: {'passed' if all(s['exit'] == 0 for s in steps) else 'FAILED'} in {seconds} s on {device}")
EOF
