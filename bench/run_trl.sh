#!/usr/bin/env bash
# Run the TRL baselines one after another (never in parallel: the timings are CPU-bound).
#
#   bash bench/run_trl.sh                       # GRPO, RLOO, PPO (RM), PPO (gold); 30 steps each
#   STEPS=60 ALGOS="grpo rloo" bash bench/run_trl.sh
#   EXTRA="--threads 1" bash bench/run_trl.sh   # any trl_baselines.py flags, for every run
#
# Needs bench/setup_trl.sh's venvs and the inputs from `bench/common.py export`
# (INPUTS, default /tmp/bench/inputs/inputs.json). Results: $RESULTS/trl_<algo>.json
# (default bench/results/, git-ignored), logs next to them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INPUTS="${INPUTS:-/tmp/bench/inputs/inputs.json}"
RESULTS="${RESULTS:-$HERE/results}"
STEPS="${STEPS:-30}"
ALGOS="${ALGOS:-grpo rloo ppo ppo_gold}"
read -r -a extra <<<"${EXTRA:-}"
mkdir -p "$RESULTS"
[[ -f "$INPUTS" ]] || { echo "missing $INPUTS: run bench/common.py export first (see bench/README.md)" >&2; exit 2; }

for algo in $ALGOS; do
    case "$algo" in
        grpo | rloo) venv=trl116; args=(--algo "$algo") ;;
        ppo) venv=trl112; args=(--algo ppo --ppo-reward rm) ;;
        ppo_gold) venv=trl112; args=(--algo ppo --ppo-reward gold) ;;
        *) echo "unknown algo '$algo' (grpo | rloo | ppo | ppo_gold)" >&2; exit 2 ;;
    esac
    py="$HERE/.venv-$venv/bin/python"
    [[ -x "$py" ]] || { echo "missing $py: run bash bench/setup_trl.sh" >&2; exit 2; }
    echo "== trl $algo ($venv), $STEPS steps, load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$py" "$HERE/trl_baselines.py" "${args[@]}" --inputs "$INPUTS" --steps "$STEPS" \
        --out "$RESULTS/trl_$algo.json" "${extra[@]}" >"$RESULTS/trl_$algo.log" 2>&1 \
        || { echo "failed, see $RESULTS/trl_$algo.log" >&2; tail -20 "$RESULTS/trl_$algo.log" >&2; exit 1; }
    python3 - "$RESULTS/trl_$algo.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
fmt = lambda v, f: "-" if v is None else format(v, f)
print(f"   s/step {fmt(s['s_per_step_median'], '.3f')}  time_to_target {fmt(s['time_to_target_s'], '.1f')}s "
      f"(step {s['step_to_target']}, est {fmt(s['time_to_target_est_s'], '.1f')}s)  "
      f"gold {s['gold_first']:+.3f} -> {s['gold_final']:+.3f} (target {s['target_gold']})  "
      f"peak RSS {s['peak_rss_mb']:.0f} MiB")
EOF
done
