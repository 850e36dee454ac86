#!/usr/bin/env bash
# Run the test suite and every benchmark file on a CUDA machine inside a fixed time budget, then write one
# JSON summary of both. Generic: it knows nothing about particular ops; every bench/bench_*.py is run.
#
#   bash bench/run_gpu.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else bench/results)
#
# Budget (seconds, override by environment): SCANET_TOTAL_BUDGET_S=450 in all (under 8 minutes including the
# kill grace periods), of which SCANET_INSTALL_BUDGET_S=90 for an editable install if `scanet.kernels` is not
# importable, SCANET_TEST_BUDGET_S=150 for `pytest tests/`, and the rest for the benchmarks. Each benchmark
# file gets an equal share of what is left when it starts (time a fast file leaves over goes to the next) and
# is stopped with SIGINT, so pytest still runs its session-finish hook and writes the rows it has.
#
# Output in OUT_DIR: tests.log, tests.xml (JUnit), bench-<file>.json / .log / .xml per benchmark file,
# bench.json (all benchmark rows merged), summary.json (test outcome + benchmark rows), nvidia-smi.txt.
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/bench/results}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$REPO" || exit 1

TOTAL_BUDGET=${SCANET_TOTAL_BUDGET_S:-450}
INSTALL_BUDGET=${SCANET_INSTALL_BUDGET_S:-90}
TEST_BUDGET=${SCANET_TEST_BUDGET_S:-150}
KILL_GRACE=10
PY=${PYTHON:-python3}
START=$(date +%s)

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( TOTAL_BUDGET - $(elapsed) )); }
log() { echo "[run_gpu $(elapsed)s] $*" >&2; }

unset TRITON_INTERPRET   # the CUDA run compiles the kernels; the interpreter is for CPU-only machines
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed (no GPU visible?)"

# -- 1. make sure the package (with kernels/ as scanet.kernels) is importable -------------------------------
install_rc=0
if ! "$PY" -c "import scanet.kernels" > /dev/null 2>&1; then
    log "scanet.kernels is not importable: editable install (no deps, no build isolation)"
    SCANET_TORCH_SPEC=torch timeout -k $KILL_GRACE "$INSTALL_BUDGET" \
        "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT_DIR/install.log" 2>&1
    install_rc=$?
    log "install rc=$install_rc"
fi

# -- 2. tests ---------------------------------------------------------------------------------------------
budget=$(( TEST_BUDGET < $(remaining) ? TEST_BUDGET : $(remaining) ))
log "pytest tests/ (budget ${budget}s)"
timeout -s INT -k $KILL_GRACE "$budget" "$PY" -m pytest tests/ -q -rs -p no:cacheprovider \
    --junitxml "$OUT_DIR/tests.xml" > "$OUT_DIR/tests.log" 2>&1
tests_rc=$?
log "tests rc=$tests_rc"

# -- 3. benchmarks, one file at a time --------------------------------------------------------------------
shopt -s nullglob
bench_files=(bench/bench_*.py)
bench_status="$OUT_DIR/bench-status.tsv"
: > "$bench_status"
n=${#bench_files[@]}
for i in "${!bench_files[@]}"; do
    f=${bench_files[$i]}
    name=$(basename "$f" .py)
    left=$(( $(remaining) - KILL_GRACE ))
    share=$(( left / (n - i) ))
    if (( share < 20 )); then
        log "$f: skipped, ${left}s left in the budget"
        printf '%s\t%s\t%s\t%s\n' "$f" "skipped" "0" "$share" >> "$bench_status"
        continue
    fi
    log "$f (budget ${share}s)"
    t0=$(date +%s)
    timeout -s INT -k $KILL_GRACE "$share" "$PY" -m pytest "$f" --benchmark -q -rs -p no:cacheprovider \
        -o python_files="test_*.py bench_*.py" --bench-json "$OUT_DIR/$name.json" \
        --junitxml "$OUT_DIR/$name.xml" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$f" "$rc" "$(( $(date +%s) - t0 ))" "$share" >> "$bench_status"
    log "$f rc=$rc"
done

# -- 4. summary -------------------------------------------------------------------------------------------
"$PY" - "$OUT_DIR" "$tests_rc" "$install_rc" "$(elapsed)" "$TOTAL_BUDGET" <<'EOF'
import datetime
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, tests_rc, install_rc, elapsed, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])


def junit(path: Path) -> dict:
    """Counts and the ids of failed/errored tests from a JUnit XML file (absent when pytest was killed)."""
    if not path.exists():
        return {"junit": None}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"junit": f"unreadable: {e}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                               "message": (node.get("message") or "")[:500]})
    counts["failed_tests"] = failed
    return counts


def timed_out(rc: int) -> bool:
    return rc in (124, 137) or rc == 130   # timeout, killed, or interrupted by timeout's SIGINT


tests = {"rc": tests_rc, "timed_out": timed_out(tests_rc), **junit(out / "tests.xml")}
bench_files, rows, meta = [], [], {}
status = out / "bench-status.tsv"
for line in (status.read_text().splitlines() if status.exists() else []):
    f, rc, secs, share = line.split("\t")
    name = Path(f).stem
    entry = {"file": f, "rc": None if rc == "skipped" else int(rc), "skipped_for_time": rc == "skipped",
             "seconds": int(secs), "budget_s": int(share)}
    if rc != "skipped":
        entry["timed_out"] = timed_out(int(rc))
        entry.update(junit(out / f"{name}.xml"))
    js = out / f"{name}.json"
    if js.exists():
        data = json.loads(js.read_text())
        entry["rows"] = len(data.get("rows", []))
        for r in data.get("rows", []):
            rows.append({"file": f, **r})
        meta = {k: data[k] for k in ("device", "cuda", "versions", "note") if k in data}
    else:
        entry["rows"] = 0
    bench_files.append(entry)

merged = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **meta,
          "rows": rows}
(out / "bench.json").write_text(json.dumps(merged, indent=1))
summary = {"date": merged["date"], "elapsed_s": elapsed, "budget_s": budget, **meta,
           "install_rc": install_rc, "tests": tests, "bench_files": bench_files, "bench_rows": rows}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
t = tests
print(f"tests: rc={t['rc']} passed={t.get('passed')} failed={t.get('failures')} errors={t.get('errors')} "
      f"skipped={t.get('skipped')}; bench: {len(rows)} rows from {len(bench_files)} files -> {out}/summary.json")
EOF
