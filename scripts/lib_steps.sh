# Step runner shared by the device scripts (sourced, not run): each step runs under its own
# time limit, its output goes to log.txt and its last 40 lines to summary.txt, so that one
# call of a lent machine (10 minutes at most) does a planned set of checks and a call cut
# short still brings back what its steps printed. scripts/gpu_check.sh and scripts/multi_gpu.sh source it.
#
#   . scripts/lib_steps.sh
#   steps_init                     # $OUT (default ./<script>_out), summary.txt, log.txt, $PY
#   step NAME LIMIT CMD...         # LIMIT_<NAME>=S overrides a step's limit (gen-fast: LIMIT_GEN_FAST)
#   steps_end                      # "done, status N"; exits with 1 if any step failed

steps_init() {
    export OUT=${OUT:-$PWD/$(basename "$0" .sh)_out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    PY=${PYTHON:-python3}
    SUMMARY=$OUT/summary.txt
    LOG=$OUT/log.txt
    : >"$SUMMARY"
    : >"$LOG"
    status=0
}

say() { echo "== $(date +%T) $*" | tee -a "$SUMMARY"; }

# step NAME LIMIT CMD...: the command's output to log.txt, its last 40 lines to summary.txt
step() {
    local name=$1 limit=$2 var
    shift 2
    var="LIMIT_${name^^}"
    var=${var//-/_}
    limit=${!var:-$limit}
    say "$name: $* (limit ${limit}s)"
    local t0=$SECONDS rc=0 mark
    mark=$(wc -l <"$LOG")
    # Straight into log.txt, so a call cut short still brings back what the step printed.
    timeout "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    tail -n +"$((mark + 1))" "$LOG" | tail -n 40 >>"$SUMMARY"
    say "$name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

# install_distributions: every distribution of scripts/distributions.txt, editable (a lent
# machine starts bare).
install_distributions() {
    step install 120 $PY -m pip install -q --no-deps --no-build-isolation \
        $(grep -v '^#' scripts/distributions.txt | sed 's/^/-e /')
}

steps_end() {
    say "done, status $status"
    exit "$status"
}
