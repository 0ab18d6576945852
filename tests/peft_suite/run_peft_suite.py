"""Run peft's own generic test suite (``tests/test_custom_models.py`` of the installed peft's source distribution)
against CoFi, the way peft tests its built-in methods: CoFi rows are added to its ``TEST_CASES`` and
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` tables, then ``pytest -k CoFi`` runs every generic check on them.

    python tests/peft_suite/run_peft_suite.py            # download (once), patch, run; exit 1 on an unexpected failure
    python tests/peft_suite/run_peft_suite.py -- -x -q   # extra arguments after -- go to pytest

The sdist is fetched from PyPI with ``pip download --no-binary :all: --no-deps peft==<installed>`` into
``$PEFT_COFI_CACHE/peft-sdist`` (default ``~/.cache/peft-cofi/peft-sdist``) and never committed here.

The intended deviations are listed in ``EXPECTED_FAILURES``:

- ``TestRequiresGrad::test_loading_model_*`` save an adapter from one randomly initialised model and load it onto
  another; a diff checkpoint refuses a base whose weights differ from those it was trained on, which is the point
  of its fingerprints.
- ``test_save_pretrained_pickle`` saves with ``safe_serialization=False``; CoFi adapters are safetensors only (a
  pickle can run code when loaded), so that save is refused.
- ``test_save_pretrained_adapter_name_substring`` compares the saved file's tensor count with
  ``get_peft_model_state_dict``; sparse storage (the ``rows``/``topk`` rows) stores an index tensor per module beside
  the values, so its file has more tensors than the (dense) adapter state by design.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

ROWS = """
    ########
    # CoFi #  (added by peft-cofi's tests/peft_suite/run_peft_suite.py)
    ########
    ("Vanilla MLP 1 CoFi", "MLP", CoFiConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 CoFi", "MLP", CoFiConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 CoFi", "MLP", CoFiConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 CoFi", "MLP", CoFiConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 CoFi", "MLP", CoFiConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 CoFi", "MLP", CoFiConfig, {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 7 CoFi grad mask", "MLP", CoFiConfig, {"target_modules": ["lin0"], "mask_mode": "grad"}),
    ("Vanilla MLP 8 CoFi rows storage", "MLP", CoFiConfig,
     {"target_modules": ["lin0"], "storage": "rows", "storage_tolerance": 0.0}),
    ("Vanilla MLP 9 CoFi topk storage", "MLP", CoFiConfig,
     {"target_modules": ["lin1"], "storage": "topk", "storage_density": 1.0}),
    ("Embedding + transformers Conv1D 1 CoFi", "EmbConv1D", CoFiConfig, {"target_modules": ["conv1d"]}),
"""
MULTI_ROWS = """
    ("CoFi Same", "cofi", CoFiConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin0"], "init_weights": False}),
    ("CoFi Different", "cofi", CoFiConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
"""
IMPORTS = "import peft_cofi  # noqa: F401  (added by peft-cofi)\nfrom peft_cofi import CoFiConfig\n"
# (test function, the part of the parametrisation id that selects the rows) -> why it is expected to fail
EXPECTED_FAILURES = {
    ("TestRequiresGrad::test_loading_model_requires_grad_set_correctly", "CoFiConfig"): "wrong base",
    (
        "TestRequiresGrad::test_loading_model_with_modules_to_save_requires_grad_set_correctly",
        "CoFiConfig",
    ): "wrong base",
    ("TestPeftCustomModel::test_save_pretrained_pickle", "CoFi"): "safetensors only",
    ("TestPeftCustomModel::test_save_pretrained_adapter_name_substring", "CoFi rows storage"): "index tensor",
    ("TestPeftCustomModel::test_save_pretrained_adapter_name_substring", "CoFi topk storage"): "index tensor",
}


def expected(name: str) -> bool:
    """Whether a failing test id is one of the intended deviations."""
    function, _, params = name.partition("[")
    return any(function == f and part in params for f, part in EXPECTED_FAILURES)


def sdist_tests(cache: Path) -> Path:
    """The ``tests`` folder of the installed peft's sdist, downloaded and unpacked once into ``cache``."""
    peft_version = version("peft")
    root = cache / f"peft-{peft_version}"
    if not (root / "tests" / "test_custom_models.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        archive = cache / f"peft-{peft_version}.tar.gz"
        if not archive.is_file():
            print(f"downloading the peft {peft_version} source distribution from PyPI ...", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-binary",
                    ":all:",
                    "--no-deps",
                    f"peft=={peft_version}",
                    "-d",
                    str(cache),
                ],
                check=True,
            )
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"peft-{peft_version}/tests/")]
            tar.extractall(cache, members=members, filter="data")
    return root / "tests"


def patched_copy(tests: Path, work: Path) -> Path:
    """Copy peft's tests into ``work`` with the CoFi rows added; returns the patched test file."""
    package = work / "tests"  # peft's tests import each other relatively, as a package
    package.mkdir()
    (package / "__init__.py").touch()
    for path in tests.iterdir():
        if path.is_file():
            (package / path.name).write_bytes(path.read_bytes())
    target = package / "test_custom_models.py"
    text = target.read_text()
    for table, rows in (("TEST_CASES = [", ROWS), ("MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [", MULTI_ROWS)):
        if text.count("\n" + table + "\n") != 1:
            raise SystemExit(f"cannot find `{table}` in {target}: peft's test layout changed; update this script.")
        text = text.replace("\n" + table + "\n", "\n" + table + rows, 1)
    first_import = re.search(r"^(import|from) ", text, flags=re.M)
    target.write_text(text[: first_import.start()] + IMPORTS + text[first_import.start() :])
    return target


def outcomes(junit: Path) -> dict[str, str]:
    """``class::test[params]`` -> ``passed`` / ``failed`` / ``skipped`` from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out[name] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    cache = Path(os.environ.get("PEFT_COFI_CACHE") or "~/.cache/peft-cofi").expanduser() / "peft-sdist"
    tests = sdist_tests(cache)
    with tempfile.TemporaryDirectory(prefix="peft-suite-") as folder:
        work = Path(folder)
        patched_copy(tests, work)
        junit = work / "junit.xml"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/test_custom_models.py",
                "-k",
                "CoFi",
                "-p",
                "no:cacheprovider",
                "-q",
                "-p",
                "no:randomly",
                f"--junitxml={junit}",
                "-W",
                "ignore::DeprecationWarning",
                *args.pytest_args,
            ],
            cwd=work,
            env=env,
            check=False,
        )
        results = outcomes(junit)
    failed = {name for name, kind in results.items() if kind == "failed"}
    counts = {kind: sum(1 for v in results.values() if v == kind) for kind in ("passed", "failed", "skipped")}
    print(f"peft {version('peft')} generic suite on CoFi rows: {json.dumps(counts)}")
    unexpected = sorted(name for name in failed if not expected(name))
    missing = sorted(f"{f}[...{part}...]" for f, part in EXPECTED_FAILURES
                     if not any(n.startswith(f + "[") and part in n for n in failed))  # fmt: skip
    print(f"intended deviations: {len(failed) - len(unexpected)} (see EXPECTED_FAILURES)")
    for name in unexpected:
        print(f"UNEXPECTED FAILURE: {name}")
    for name in missing:
        print(f"expected deviation did not fail (update EXPECTED_FAILURES?): {name}")
    return 1 if unexpected or missing or not results else 0


if __name__ == "__main__":
    raise SystemExit(main())
