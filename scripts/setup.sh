#!/usr/bin/env bash
# Make .venv hold exactly requirements.txt. Called by run.sh and test.sh; reinstalls only
# when requirements.txt has changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.requirements-sha256 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv from requirements.txt (a few minutes the first time)" >&2
  python3 -m venv .venv
  # Install from the package index as a fresh machine does: a machine-local pip configuration
  # (a folder of local wheels, say) can pull in a torch build that torchvision cannot load with.
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
    .venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
  echo "$want" > .venv/.requirements-sha256
fi
