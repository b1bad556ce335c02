#!/usr/bin/env python
"""Coverage-guided fuzzing of pyxf's loaders (atheris), against the ASan + UBSan build.

    python tools/fuzz.py --list
    python tools/fuzz.py TARGET --time 3600     # one target for an hour (stops at the first finding)
    python tools/fuzz.py all --time 20          # every target 20 s (what .ci/run does)
    python tools/fuzz.py --make-seeds           # rewrite tests/fuzz/seeds/ from tests/tiny_files.py
    python tools/fuzz.py --stats                # executions and corpus sizes so far

Targets are in tests/fuzz/targets.py. Each run starts from tests/fuzz/seeds/TARGET plus the corpus
earlier runs grew in build/fuzz/TARGET/corpus; a finding (an unexpected exception, a sanitizer
report, a timeout or running out of memory) is written to build/fuzz/TARGET/ as crash-* / timeout-*
/ oom-*, and becomes a regression test when copied into tests/fuzz/regressions/TARGET/
(tests/test_fuzz_regressions.py runs them all). Executions add up in build/fuzz/stats.json.
--sanitize none runs against the in-place build instead (faster, catches only Python-level bugs).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "tests" / "fuzz"
WORK = ROOT / "build" / "fuzz"
STATS = WORK / "stats.json"
TARGETS = ("safetensors", "model_dir", "gguf", "tokenizer", "convert_config")


def sanitized_env(kind: str) -> dict:
    """The environment that runs Python against tools/sanitize.sh's build (built when needed)."""
    env = dict(os.environ)
    if kind == "none":
        env["PYXF_IMPORT_ROOT"] = str(ROOT)
        return env
    build = subprocess.run(["bash", str(ROOT / "tools" / "sanitize.sh"), kind, "--build-only"],
                           capture_output=True, text=True)
    if build.returncode != 0:
        sys.exit(f"fuzz: the {kind} sanitizer build failed (bash tools/sanitize.sh {kind} --build-only):\n"
                 + "\n".join((build.stdout + build.stderr).strip().splitlines()[-20:]))
    out = build.stdout.strip().splitlines()[-1]
    for assignment in shlex.split(out):
        key, _, value = assignment.partition("=")
        value = value.strip("'")
        env[key] = value
    # atheris' libFuzzer must receive the coverage that libasan's weak no-ops would otherwise swallow
    # (tests/fuzz/coverage_shim.c), so the shim comes first, before libasan.
    import atheris

    env["PYXF_LIBFUZZER_MODULE"] = str(next(Path(atheris.__file__).parent.glob("core_with_libfuzzer*.so")))
    shim = WORK / "coverage_shim.so"
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run([os.environ.get("CC", "gcc"), "-shared", "-fPIC", "-O2", "-o", str(shim),
                    str(FUZZ / "coverage_shim.c"), "-ldl"], check=True)
    env["LD_PRELOAD"] = f"{shim} {env['LD_PRELOAD']}"
    env["ASAN_OPTIONS"] += ":verify_asan_link_order=0:quarantine_size_mb=64"
    # libFuzzer's malloc limit reports huge requests; reports on stderr, where libFuzzer expects them.
    env["ASAN_OPTIONS"] = re.sub(r":log_path=[^:]*", "", env["ASAN_OPTIONS"]) + ":allocator_may_return_null=0"
    env["UBSAN_OPTIONS"] = re.sub(r":log_path=[^:]*", "", env["UBSAN_OPTIONS"])
    return env


def corpus_stats(target: str) -> tuple[int, int]:
    corpus = WORK / target / "corpus"
    files = [p for p in corpus.iterdir() if p.is_file()] if corpus.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


INTERRUPTED = 72  # libFuzzer's exit status after SIGINT / SIGTERM: a run stopped early, not a finding


def record(target: str, executions: int, seconds: float, status: int) -> dict:
    with open(WORK / ".stats.lock", "w") as lock:  # runs of several targets finish at any time
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _record(target, executions, seconds, status)


def _record(target: str, executions: int, seconds: float, status: int) -> dict:
    stats = json.loads(STATS.read_text()) if STATS.is_file() else {}
    entry = stats.setdefault(target, {"executions": 0, "seconds": 0.0, "runs": 0, "findings": 0})
    entry["executions"] += executions
    entry["seconds"] = round(entry["seconds"] + seconds, 1)
    entry["runs"] += 1
    entry["findings"] += status not in (0, INTERRUPTED)
    entry["corpus_files"], entry["corpus_bytes"] = corpus_stats(target)
    partial = STATS.with_suffix(".partial")
    partial.write_text(json.dumps(stats, indent=2) + "\n")
    partial.replace(STATS)
    return entry


def fuzz(target: str, seconds: int, env: dict, extra: list[str]) -> int:
    corpus = WORK / target / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in (FUZZ / "seeds" / target).iterdir():
        shutil.copy(seed, corpus / seed.name)
    args = [sys.executable, str(FUZZ / "run.py"), target, str(corpus), f"-max_total_time={seconds}",
            f"-artifact_prefix={WORK / target}/", "-print_final_stats=1", "-timeout=60", "-rss_limit_mb=6144",
            "-max_len=65536", *extra]
    start = time.monotonic()
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    log = []
    for line in proc.stderr:
        log.append(line)
        if re.match(r"#\d+\s+(pulse|NEW|REDUCE|DONE)|==\d+==|Traceback|stat::|INFO: (Seed|Loaded)", line) or \
                log[-1].startswith((" ", "Error", "Assertion")):
            sys.stderr.write(line)
    status = proc.wait()
    text = "".join(log)
    found = re.search(r"stat::number_of_executed_units: (\d+)", text)
    executions = int(found.group(1)) if found else max([int(n) for n in re.findall(r"^#(\d+)", text, re.M)] or [0])
    entry = record(target, executions, time.monotonic() - start, status)
    print(f"{target}: {executions} executions this run, {entry['executions']} in all; corpus "
          f"{entry['corpus_files']} files, {entry['corpus_bytes']} bytes; status {status}", file=sys.stderr)
    if status == INTERRUPTED:
        return 0
    if status != 0:
        (WORK / target / "last-failure.log").write_text(text)
        print(f"{target}: FINDING; log in {WORK / target / 'last-failure.log'}", file=sys.stderr)
    return status


def make_seeds() -> None:
    sys.path.insert(0, str(FUZZ))
    sys.path.insert(0, str(ROOT))
    import targets

    for target, files in targets.make_seeds().items():
        directory = FUZZ / "seeds" / target
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for name, data in files.items():
            (directory / name).write_bytes(data)
            print(f"{directory / name}: {len(data)} bytes")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", choices=(*TARGETS, "all"))
    parser.add_argument("--time", type=int, default=60, help="seconds per target (default 60)")
    parser.add_argument("--sanitize", choices=("address", "none"), default="address")
    parser.add_argument("--make-seeds", action="store_true")
    parser.add_argument("--stats", action="store_true")
    parser.add_argument("--list", action="store_true")
    args, extra = parser.parse_known_args(argv)  # the rest: libFuzzer options (-max_len=..., -jobs=...)
    if args.list:
        print("\n".join(TARGETS))
        return 0
    if args.make_seeds:
        make_seeds()
        return 0
    if args.stats:
        print(STATS.read_text() if STATS.is_file() else "{}")
        return 0
    if args.target is None:
        parser.error("a target (or all) is needed")
    env = sanitized_env(args.sanitize)
    status = 0
    for target in TARGETS if args.target == "all" else (args.target,):
        status |= fuzz(target, args.time, env, extra)
    return status


if __name__ == "__main__":
    sys.exit(main())
