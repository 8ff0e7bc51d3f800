#!/usr/bin/env bash
# The whole test suite on the lowest torch, diffusers, transformers and peft that requirements.txt allows (the rest at
# their newest), in a venv of its own. torch from PyPI is a CUDA build (~3 GB with its nvidia wheels); it runs on a CPU.
#   bash .ci/lowest_versions.sh [venv folder]        # from the repository root, ~10 minutes on 2 cores
set -euo pipefail
venv=${1:-/tmp/venv_lowest}
lowest=$(grep -E '^(torch|diffusers|transformers|peft)>=' requirements.txt | sed -E 's/>=([0-9.]+).*/==\1/')
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q $(echo "$lowest" | grep '^torch==')
pip install -q -r requirements.txt $lowest pytest pytest-xdist
pip uninstall -q -y torchvision 2>/dev/null || true  # transformers would import it: not a dependency of this project
pip list 2>/dev/null | grep -iE '^(torch|diffusers|transformers|peft) '
HF_HUB_OFFLINE=1 python -m pytest -q -n 2 test_nft.py -p no:cacheprovider
