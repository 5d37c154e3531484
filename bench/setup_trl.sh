#!/usr/bin/env bash
# Create the two isolated TRL virtual environments used by bench/trl_baselines.py.
#
#   bench/.venv-trl116   trl 1.16.x  (GRPOTrainer, RLOOTrainer)
#   bench/.venv-trl112   trl 1.12.x  (PPOTrainer: trl.experimental.ppo; dropped after 1.12)
#
# Neither touches the project venv (.venv). torch is installed FIRST from the pinned
# CPU wheel (an unpinned torch would pull GBs of CUDA wheels), and re-pinned on the
# second install so no dependency can upgrade it. transformers / accelerate /
# datasets are pinned to the versions of the project venv, so both sides run the same
# GPT-2 modelling code; override with the env vars below.
#
# The TRL scripts are self-contained (prompts and the SFT / RM model dirs come in as
# files, the gold reward is the project's own pipeline.tasks on sys.path), so the project package is NOT
# installed in these venvs.
#
#   bash bench/setup_trl.sh              # both venvs (idempotent: skips finished ones)
#   bash bench/setup_trl.sh trl116       # only one
#   FORCE=1 bash bench/setup_trl.sh      # rebuild
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PY:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
ACCELERATE_VERSION="${ACCELERATE_VERSION:-1.15.0}"
DATASETS_VERSION="${DATASETS_VERSION:-5.2.0}"
OMEGACONF_VERSION="${OMEGACONF_VERSION:-2.3.1}"
# psutil: peak-memory sampling in trl_baselines.py; omegaconf: pipeline.tasks (the gold reward) reads task options with it
EXTRA=(psutil "omegaconf==$OMEGACONF_VERSION")

make_env() {
    local name="$1" trl_spec="$2"
    local venv="$HERE/.venv-$name"
    if [[ -f "$venv/.installed" && -z "${FORCE:-}" ]]; then
        echo "[setup_trl] $venv: already installed ($(cat "$venv/.installed"))"
        return
    fi
    rm -rf "$venv"
    local t0=$SECONDS
    echo "[setup_trl] creating $venv ($trl_spec)"
    "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip setuptools wheel
    "$venv/bin/pip" install -q "torch==$TORCH_VERSION"
    "$venv/bin/pip" install -q "$trl_spec" "torch==$TORCH_VERSION" \
        "transformers==$TRANSFORMERS_VERSION" "accelerate==$ACCELERATE_VERSION" \
        "datasets==$DATASETS_VERSION" "${EXTRA[@]}"
    local versions
    versions="$("$venv/bin/python" - <<'EOF'
import importlib.metadata as md
print(" ".join(f"{p}=={md.version(p)}" for p in ("trl", "torch", "transformers", "accelerate", "datasets")))
EOF
)"
    echo "$versions" >"$venv/.installed"
    echo "[setup_trl] $venv: $versions; $((SECONDS - t0)) s, $(du -sh "$venv" | cut -f1)"
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(trl116 trl112)
for t in "${targets[@]}"; do
    case "$t" in
        trl116) make_env trl116 "trl==1.16.*" ;;
        trl112) make_env trl112 "trl==1.12.*" ;;
        *) echo "unknown env '$t' (trl116 | trl112)" >&2; exit 2 ;;
    esac
done
