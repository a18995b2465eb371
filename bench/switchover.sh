#!/usr/bin/env bash
# Switchover benchmark for a local `pgwarden demo` cluster (not a test: it
# prints figures next to their targets and never fails on a missed target;
# it exits non-zero only if the cluster does not come up, does not heal
# between runs, or leaves a process or the demo directory behind).
#
#   bash bench/switchover.sh            # RUNS=5 switchovers
#   RUNS=1 SKIP_BUILD=1 bash bench/switchover.sh
#
# What it does:
#   1. cargo build --release (unless SKIP_BUILD=1), then starts `pgwarden
#      demo` on a block of twelve free loopback ports (20000-31999, never the
#      demo's defaults; picked as bench/failover.sh does) in a new temporary
#      directory, and waits for a leader and two streaming replicas
#      (`pgwarden -c <dir>/node1/pgwarden.toml list --format json`, confirmed
#      by the leader's /primary and each replica's /replica answering 200).
#   2. Starts one write probe (bench/failover_probe.py) for the whole
#      benchmark: a new connection through HAProxy's read-write port every
#      100 ms (1 s budget for connect and authentication, 1 s for the
#      INSERT), each attempt inserting its attempt number into one table and
#      logging its start, end, outcome and id.
#   3. RUNS times: PRE_SECS of writes, then
#        target/release/pgwarden -c <dir>/node1/pgwarden.toml switchover --force
#      (no --candidate: the leader picks the healthiest replica; the command
#      returns once the new leader holds the lease), its wall time measured
#      around the whole command; then waits until all three members are
#      healthy again (the old primary rejoins as a replica by itself; no
#      agent is restarted) and no request is pending, checks the old
#      primary's agent log since the run started for "rewinding with
#      pg_rewind", and pauses SETTLE_SECS.
#      Failed-write window of a run (attempts that started from the moment
#      the command was launched until the next run's command): from the
#      start of the first failed attempt to the acknowledgement of the first
#      successful attempt that started after it; 0 if none failed.
#   4. Stops the probe, reads every id from the final primary (directly on
#      its PostgreSQL port) and counts acknowledged ids missing from it;
#      checks that every member has the same number of rows.
#   5. SIGTERM to the demo, then checks that no process of the directory is
#      left and removes the directory (and the demo's stdout/stderr files),
#      checking that nothing of it remains.
#   6. Prints markdown tables (summary against the targets, and per run).
#
# Environment (all optional):
#   RUNS=5              number of switchovers
#   PRE_SECS=2          probe writes before each switchover
#   SETTLE_SECS=3       pause once healthy before the next switchover
#   CMD_TIMEOUT=180     kill the switchover command after this (it gives up by itself after 120 s)
#   HEAL_TIMEOUT=240    the cluster must be healthy again within this (else exit 1)
#   READY_TIMEOUT=300   seconds to wait for the cluster to come up
#   BASE_PORT=N         use ports N..N+11 instead of picking a free block
#   LOG_DIR=path        copy the agents', etcd's, HAProxy's and the probe's logs
#                       there before the demo directory is removed
#   KEEP_DIR=1          keep the demo directory (it is kept anyway on failure)
#   SKIP_BUILD=1        do not run cargo build --release
#
# Progress goes to stderr, the report to stdout. Needs python3, psql, jq,
# curl, ss.

set -euo pipefail

RUNS=${RUNS:-5}
PRE_SECS=${PRE_SECS:-2}
SETTLE_SECS=${SETTLE_SECS:-3}
CMD_TIMEOUT=${CMD_TIMEOUT:-180}
HEAL_TIMEOUT=${HEAL_TIMEOUT:-240}
READY_TIMEOUT=${READY_TIMEOUT:-300}
STOP_TIMEOUT=${STOP_TIMEOUT:-150} # the demo itself allows 90 s for agents + 10 s each for HAProxy/etcd
MEMBERS=3
TABLE=sw_probe

# Targets.
TARGET_WINDOW_SECS=2
TARGET_LOST=0

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=$ROOT/target/release/pgwarden
PROBE=$ROOT/bench/failover_probe.py

log() { printf '[switchover %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in cargo python3 psql jq ss awk pgrep curl realpath timeout; do
    command -v "$tool" >/dev/null || die "\`$tool\` not found"
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"

# --- state used by the cleanup trap -------------------------------------------
DIR=""
DEMO_PID=""
DEMO_OUT=""
DEMO_ERR=""
PROBE_PID=""
STOPPED=0
REMOVED=0
FAILED=1 # cleared at the very end of a complete run

# PIDs of processes belonging to the demo directory: command line mentions it
# (demo, etcd, HAProxy, agents, postmasters, the probe) or working directory
# inside it (every PostgreSQL process chdirs into its data directory).
dir_pids() {
    local p pid cwd cmd
    [[ -n $DIR ]] || return 0
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        cwd=$(readlink "$p/cwd" 2>/dev/null) || cwd=""
        cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || cmd=""
        if [[ $cwd == "$DIR" || $cwd == "$DIR"/* || $cmd == *"$DIR/"* || $cmd == *"$DIR "* ]]; then
            [[ $cmd == *"bench/switchover.sh"* ]] && continue
            echo "$pid"
        fi
    done
}

alive() { # PID -> running (not a zombie)
    local st
    st=$(awk '{ sub(/.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z ]]
}

stop_probe() {
    if [[ -n $PROBE_PID ]]; then
        kill -TERM "$PROBE_PID" 2>/dev/null || true
        wait "$PROBE_PID" 2>/dev/null || true
        PROBE_PID=""
    fi
}

STOP_SECS=""
LEFTOVERS=""
stop_all() {
    [[ $STOPPED == 1 ]] && return 0
    STOPPED=1
    stop_probe
    local t0=$EPOCHREALTIME p
    if [[ -n $DEMO_PID ]] && kill -0 "$DEMO_PID" 2>/dev/null; then
        log "stopping the demo (SIGTERM to pid $DEMO_PID)"
        kill -TERM "$DEMO_PID" 2>/dev/null || true
    fi
    local deadline=$((SECONDS + STOP_TIMEOUT))
    if [[ -n $DEMO_PID ]]; then
        while alive "$DEMO_PID" && ((SECONDS < deadline)); do sleep 0.1; done
        if alive "$DEMO_PID"; then
            log "the demo (pid $DEMO_PID) did not exit within ${STOP_TIMEOUT}s; SIGKILL"
            kill -KILL "$DEMO_PID" 2>/dev/null || true
            STOP_SECS="timeout"
        fi
        wait "$DEMO_PID" 2>/dev/null || true
    fi
    [[ -z $STOP_SECS ]] && STOP_SECS=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')
    local i
    for i in $(seq 50); do
        LEFTOVERS=$(dir_pids | tr '\n' ' ')
        [[ -z ${LEFTOVERS// /} ]] && break
        sleep 0.2
    done
    LEFTOVERS=${LEFTOVERS%% }
    if [[ -n ${LEFTOVERS// /} ]]; then
        log "processes of $DIR still running after the stop:"
        for p in $LEFTOVERS; do
            log "  $p: $(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")"
        done
    fi
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n ${NAP_PID:-} ]] && kill "$NAP_PID" 2>/dev/null
    [[ -n ${CMD_PID:-} ]] && kill -TERM "$CMD_PID" 2>/dev/null
    stop_all
    if [[ -n ${LEFTOVERS// /} ]]; then
        log "terminating leftovers: $LEFTOVERS"
        kill -TERM $LEFTOVERS 2>/dev/null
        sleep 5
        kill -KILL $(dir_pids) 2>/dev/null
        ((rc == 0)) && rc=1
    fi
    if [[ $REMOVED == 0 && -n $DIR && -d $DIR ]]; then
        if [[ ${KEEP_DIR:-0} == 1 || $rc != 0 || $FAILED == 1 ]]; then
            log "demo directory kept: $DIR (demo stdout: $DEMO_OUT, stderr: $DEMO_ERR)"
        else
            rm -rf "$DIR" "$DEMO_OUT" "$DEMO_ERR"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers --------------------------------------------------------------------
NAP_PID=""
nap() { # a sleep that a trapped signal interrupts at once
    sleep "$1" &
    NAP_PID=$!
    wait "$NAP_PID"
    NAP_PID=""
}

port_block_free() {
    local base=$1 n=$2
    ss -Htan | awk -v lo="$base" -v hi="$((base + n - 1))" '
        { split($4, a, ":"); p = a[length(a)] + 0; if (p >= lo && p <= hi) bad = 1 }
        END { exit bad ? 1 : 0 }'
}

pick_ports() {
    # Twelve consecutive ports below the ephemeral range (32768+), as
    # bench/run.sh and bench/failover.sh do, so outgoing connections cannot
    # take them.
    local n=12 try base
    if [[ -n ${BASE_PORT:-} ]]; then
        port_block_free "$BASE_PORT" "$n" || die "ports $BASE_PORT..$((BASE_PORT + n - 1)) are not all free"
        echo "$BASE_PORT"
        return
    fi
    for try in $(seq 100); do
        base=$((20000 + (RANDOM % 1000) * 12))
        if port_block_free "$base" "$n"; then
            echo "$base"
            return
        fi
    done
    die "no block of $n free ports found in 20000-31999"
}

since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }
diff_secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

sql() { # sql PORT SQL -> rows, unaligned
    PGPASSWORD=$PW PGCONNECT_TIMEOUT=2 psql -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 -c "$2"
}

list_json() { "$BIN" -c "$CFG1" list --format json 2>/dev/null; }

http_code() { curl -s -m 2 -o /dev/null -w '%{http_code}' "$1" 2>/dev/null || true; }

# Healthy: exactly one leader `running` and two replicas `streaming` from it
# in etcd, the leader's /primary and each replica's /replica answering 200.
# Sets LEADER, LEADER_PG_PORT.
LEADER=""
LEADER_PG_PORT=""
HEALTH_DETAIL=""
healthy() {
    local js leader port api r ok=1
    js=$(list_json) || { HEALTH_DETAIL="list failed"; return 1; }
    HEALTH_DETAIL=$(jq -c '[.[] | {name, role, state, upstream}]' <<<"$js" 2>/dev/null || echo "$js")
    leader=$(jq -r '[.[] | select(.role == "leader" and .state == "running")] | if length == 1 then .[0].name else "" end' <<<"$js")
    [[ -n $leader ]] || return 1
    [[ $(jq --arg l "$leader" '[.[] | select(.role == "replica" and .state == "streaming" and .upstream == $l)] | length' <<<"$js") == $((MEMBERS - 1)) ]] || return 1
    [[ $(jq 'length' <<<"$js") == "$MEMBERS" ]] || return 1
    api=$(jq -r --arg l "$leader" '.[] | select(.name == $l) | .api_url' <<<"$js")
    [[ $(http_code "$api/primary") == 200 ]] || return 1
    for r in $(jq -r --arg l "$leader" '.[] | select(.name != $l) | .api_url' <<<"$js"); do
        [[ $(http_code "$r/replica") == 200 ]] || ok=0
    done
    ((ok)) || return 1
    port=$(jq -r --arg l "$leader" '.[] | select(.name == $l) | .port' <<<"$js")
    LEADER=$leader
    LEADER_PG_PORT=$port
}

# No switchover or failover request left in etcd (the leader clears it).
no_request() {
    local out
    out=$("$BIN" -c "$CFG1" switchover --list 2>/dev/null) || { HEALTH_DETAIL="switchover --list failed"; return 1; }
    [[ $out == *"no switchover or failover pending"* ]] || { HEALTH_DETAIL="pending: $out"; return 1; }
}

wait_healthy() { # TIMEOUT -> waits until healthy() and no_request(); returns 1 on timeout
    local deadline=$((SECONDS + $1))
    until healthy && no_request; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "none"; exit }
    if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
maximum() { sort -g | tail -n1; }

# --- 1. build and start ---------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "cargo build --release"
    cargo build --release >&2
fi
[[ -x $BIN ]] || die "$BIN not found"
"$BIN" switchover --help >/dev/null 2>&1 || die "$BIN has no \`switchover\` command (stale build? run without SKIP_BUILD=1)"
GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$(git status --porcelain 2>/dev/null | wc -l || true)
BIN_SHA=$(sha256sum "$BIN" | cut -c1-12)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED_AT=$(date -u +%Y-%m-%dT%H:%MZ)
log "binary $BIN (sha256 $BIN_SHA), commit $GIT_REV with $GIT_DIRTY uncommitted paths; load average $LOAD_START"

BASE=$(pick_ports)
RW_PORT=$BASE
RO_PORT=$((BASE + 1))
STATS_PORT=$((BASE + 2))
PG_BASE=$((BASE + 3))    # members use PG_BASE+1..+3
API_BASE=$((BASE + 6))   # members use API_BASE+1..+3
ETCD_PORT=$((BASE + 10)) # peer port ETCD_PORT+1
DIR=$(realpath "$(mktemp -d /tmp/pgwarden-switchover.XXXXXXXX)")
DEMO_OUT=$DIR.stdout
DEMO_ERR=$DIR.stderr
mkdir -p "$DIR/bench"
log "demo directory $DIR, ports $BASE..$((BASE + 11))"

DEMO_CMD=("$BIN" demo --dir "$DIR" --members "$MEMBERS"
    --rw-port "$RW_PORT" --ro-port "$RO_PORT" --stats-port "$STATS_PORT"
    --pg-base-port "$PG_BASE" --api-base-port "$API_BASE" --etcd-port "$ETCD_PORT")
"${DEMO_CMD[@]}" >"$DEMO_OUT" 2>"$DEMO_ERR" &
DEMO_PID=$!
log "started: ${DEMO_CMD[*]} (pid $DEMO_PID)"

CFG1=$DIR/node1/pgwarden.toml
PW=""
deadline=$((SECONDS + READY_TIMEOUT))
until [[ -s $CFG1 ]] && grep -q '^cluster ready:' "$DEMO_OUT" 2>/dev/null; do
    kill -0 "$DEMO_PID" 2>/dev/null || { tail -n 20 "$DEMO_ERR" >&2 || true; die "the demo exited before the cluster was ready"; }
    ! grep -q 'the cluster did not accept a write' "$DEMO_ERR" || die "$(grep -m1 'the cluster did not accept a write' "$DEMO_ERR")"
    ((SECONDS < deadline)) || die "the demo did not report a ready cluster within ${READY_TIMEOUT}s"
    sleep 0.2
done
log "demo: $(grep -m1 '^cluster ready:' "$DEMO_OUT")"
PW=$(awk '/^\[/ { sec = $0 } sec == "[postgresql.authentication.superuser]" && $1 == "password" {
         sub(/^[^"]*"/, ""); sub(/".*$/, ""); print; exit }' "$CFG1")
[[ -n $PW ]] || die "no superuser password in $CFG1"
log "waiting for a leader and two streaming replicas"
wait_healthy "$READY_TIMEOUT" || die "cluster not healthy after ${READY_TIMEOUT}s: $HEALTH_DETAIL"
log "healthy: leader $LEADER; $HEALTH_DETAIL"
DYN_CONFIG=$(curl -s -m 2 "http://127.0.0.1:$((API_BASE + 1))/config" |
    jq -r '"ttl \(.ttl) s, loop_wait \(.loop_wait) s, retry_timeout \(.retry_timeout) s"' 2>/dev/null || echo unknown)
log "dynamic config: $DYN_CONFIG"

# --- 2. the probe ---------------------------------------------------------------
PLOG=$DIR/bench/probe.log
PGPASSWORD=$PW python3 "$PROBE" probe --port "$RW_PORT" --table "$TABLE" --log "$PLOG" \
    2>>"$DIR/bench/probe.stderr" &
PROBE_PID=$!
PROBE_T0=$EPOCHREALTIME
log "probe started (pid $PROBE_PID): a new connection through 127.0.0.1:$RW_PORT every 100 ms, INSERT INTO $TABLE"
deadline=$((SECONDS + 60))
until [[ $(awk -F'\t' '$4 == 1' "$PLOG" 2>/dev/null | wc -l) -ge 5 ]]; do
    ((SECONDS < deadline)) || die "the probe got no write through: $(tail -n 3 "$PLOG" 2>/dev/null)"
    kill -0 "$PROBE_PID" 2>/dev/null || die "the probe exited: $(tail -n 3 "$DIR/bench/probe.stderr" 2>/dev/null)"
    sleep 0.1
done

# --- 3. the runs ------------------------------------------------------------------
declare -A R_FROM R_TO R_CMD R_RC R_OUT R_T0 R_T1 R_HEAL R_REWIND R_REJOIN
# How the old primary came back (phrases of its agent log, in order).
REJOIN_RE='starting it read-only|re-pointing replication at the leader [a-z0-9]+|starting it as a replica of [a-z0-9]+|starting as its replica without rewind|rewinding with pg_rewind|removing the data directory|cloning from [a-z0-9]+'
CMD_PID=""
for k in $(seq "$RUNS"); do
    nap "$PRE_SECS"
    healthy || die "not healthy before run $k: $HEALTH_DETAIL"
    old=$LEADER
    R_FROM[$k]=$old
    oldlog=$DIR/$old/agent.log
    offset=$(stat -c %s "$oldlog")
    out=$DIR/bench/switchover_$k.out
    log "=== run $k/$RUNS: primary $old; $BIN -c $CFG1 switchover --force"
    rc=0
    t0=$EPOCHREALTIME
    timeout --signal=TERM "$CMD_TIMEOUT" "$BIN" -c "$CFG1" switchover --force >"$out" 2>&1 &
    CMD_PID=$!
    wait "$CMD_PID" || rc=$?
    t1=$EPOCHREALTIME
    CMD_PID=""
    R_T0[$k]=$t0
    R_T1[$k]=$t1
    R_RC[$k]=$rc
    R_CMD[$k]=$(diff_secs "$t0" "$t1")
    R_OUT[$k]=$(tr '\n' ' ' <"$out" | sed 's/ *$//; s/|/\\|/g')
    log "command exited $rc after ${R_CMD[$k]}s: ${R_OUT[$k]}"

    wait_healthy "$HEAL_TIMEOUT" || die "cluster not healthy ${HEAL_TIMEOUT}s after switchover $k: $HEALTH_DETAIL"
    R_HEAL[$k]=$(since "$t1")
    R_TO[$k]=$LEADER
    log "healthy again ${R_HEAL[$k]}s after the command returned: leader $LEADER; $HEALTH_DETAIL"
    # What the old primary did to rejoin, from its agent log since the run started.
    new_part=$(tail -c +"$((offset + 1))" "$oldlog")
    if grep -q 'rewinding with pg_rewind' <<<"$new_part"; then
        R_REWIND[$k]="**yes**"
    else
        R_REWIND[$k]="no"
    fi
    R_REJOIN[$k]=$( (grep -oE "$REJOIN_RE" <<<"$new_part" || true) |
        awk '!seen[$0]++ { printf "%s%s", (n++ ? "; " : ""), $0 }')
    log "old primary $old: pg_rewind ${R_REWIND[$k]}; ${R_REJOIN[$k]:-no rejoin line}"
    nap "$SETTLE_SECS"
    wait_healthy "$HEAL_TIMEOUT" || die "cluster not healthy before the next run: $HEALTH_DETAIL"
done
nap "$PRE_SECS"
stop_probe
PROBE_T1=$EPOCHREALTIME
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# Per run figures: attempts that started from the command's launch until the
# next run's launch (the last run: until the probe stopped).
declare -A W_WIN W_SPAN W_FIRST W_LAST W_FAILED W_EPI W_OK W_MAXOK W_ERR
for k in $(seq "$RUNS"); do
    next=$((k + 1))
    until_t=${R_T0[$next]:-$PROBE_T1}
    eval "$(python3 "$PROBE" window --log "$PLOG" --start "${R_T0[$k]}" --until "$until_t")"
    W_WIN[$k]=$WINDOW_SECS
    W_SPAN[$k]=$SPAN_SECS
    W_FIRST[$k]=$FIRST_FAIL_SECS
    W_LAST[$k]=$LAST_FAIL_SECS
    W_FAILED[$k]=$FAILED
    W_EPI[$k]=$EPISODES
    W_OK[$k]=$OK
    W_MAXOK[$k]=$MAX_OK_SECS
    W_ERR[$k]=${ERRORS//|/\\|}
    log "run $k: failed-write window ${WINDOW_SECS}s (first failure ${FIRST_FAIL_SECS}s after launch, last ${LAST_FAIL_SECS}s," \
        "$FAILED failed attempts in $EPISODES episode(s), span ${SPAN_SECS}s); slowest acknowledged write ${MAX_OK_SECS}s; ${ERRORS:-no errors}"
done
# Failed attempts before the first switchover (should be none).
eval "$(python3 "$PROBE" window --log "$PLOG" --start 0 --until "${R_T0[1]}")"
PRE_FAILED=$FAILED

# --- 4. rows lost -----------------------------------------------------------------
healthy || wait_healthy "$HEAL_TIMEOUT" || die "cluster not healthy at the end: $HEALTH_DETAIL"
FINAL=$LEADER
PRESENT=$DIR/bench/present.txt
tries=0
until sql "$LEADER_PG_PORT" "SELECT id FROM $TABLE ORDER BY id" >"$PRESENT" 2>>"$DIR/bench/psql.stderr"; do
    tries=$((tries + 1))
    ((tries < 50)) || die "cannot read $TABLE from the final primary $FINAL (port $LEADER_PG_PORT)"
    sleep 0.2
done
eval "$(python3 "$PROBE" analyze --log "$PLOG" --fault "${R_T0[1]}" --present "$PRESENT")"
ACKED_TOTAL=$((ACKED_BEFORE + ACKED_AFTER))
ATTEMPTS=$(grep -vc '^#' "$PLOG" || true)
FAILED_TOTAL=$(awk -F'\t' '!/^#/ && $4 == 0' "$PLOG" | wc -l)
want=$(wc -l <"$PRESENT")
counts="" same=1
for n in $(seq "$MEMBERS"); do
    deadline=$((SECONDS + 15))
    while :; do
        cnt=$(sql "$((PG_BASE + n))" "SELECT count(*) FROM $TABLE" 2>/dev/null || echo "?")
        [[ $cnt == "$want" ]] && break
        ((SECONDS < deadline)) || { same=0; break; }
        sleep 0.5
    done
    counts+="node$n=$cnt "
done
counts=${counts% }
log "final primary $FINAL: $want rows; $ACKED_TOTAL acknowledged, $LOST lost${LOST_IDS:+ (ids $LOST_IDS)}; rows per member: $counts"
# The whole of each agent log (every member was an old primary at least once
# if RUNS >= 3, and a rewind is wrong in a switchover whichever member runs it).
REWIND_ALL=""
for n in $(seq "$MEMBERS"); do
    c=$(grep -c 'rewinding with pg_rewind' "$DIR/node$n/agent.log" || true)
    REWIND_ALL+="node$n=$c "
done
REWIND_ALL=${REWIND_ALL% }

# --- 5. stop and remove -------------------------------------------------------------
stop_all
if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
    for n in $(seq "$MEMBERS"); do cp "$DIR/node$n/agent.log" "$LOG_DIR/node$n.agent.log" 2>/dev/null || true; done
    cp "$DIR/etcd.log" "$DIR/haproxy.log" "$DEMO_OUT" "$DEMO_ERR" "$LOG_DIR/" 2>/dev/null || true
    cp -r "$DIR/bench" "$LOG_DIR/bench" 2>/dev/null || true
    log "logs copied to $LOG_DIR"
fi
if [[ -z ${LEFTOVERS// /} ]]; then
    if [[ ${KEEP_DIR:-0} == 1 ]]; then
        STOP_RESULT="exited after ${STOP_SECS}s; no process of the directory left; directory kept (KEEP_DIR=1)"
        STOP_VERDICT=pass
    else
        rm -rf "$DIR" "$DEMO_OUT" "$DEMO_ERR"
        REMOVED=1
        if [[ ! -e $DIR && ! -e $DEMO_OUT && ! -e $DEMO_ERR && -z $(dir_pids) ]]; then
            STOP_RESULT="exited after ${STOP_SECS}s; no process of the directory left; directory removed, nothing of it remains"
            STOP_VERDICT=pass
        else
            STOP_RESULT="exited after ${STOP_SECS}s; **something of $DIR remains**"
            STOP_VERDICT="**FAIL**"
        fi
    fi
else
    STOP_RESULT="exited after ${STOP_SECS}s; **leftover pids: $LEFTOVERS**"
    STOP_VERDICT="**FAIL**"
fi

# --- 6. report ---------------------------------------------------------------------
wins=() cmds=() none_runs=0 cmd_fail=0 rewinds=0
for k in $(seq "$RUNS"); do
    if [[ ${W_WIN[$k]} == none ]]; then none_runs=$((none_runs + 1)); else wins+=("${W_WIN[$k]}"); fi
    cmds+=("${R_CMD[$k]}")
    [[ ${R_RC[$k]} == 0 && ${R_FROM[$k]} != "${R_TO[$k]}" ]] || cmd_fail=$((cmd_fail + 1))
    [[ ${R_REWIND[$k]} == no ]] || rewinds=$((rewinds + 1))
done
win_med=$(printf '%s\n' "${wins[@]}" | grep . | median || true)
win_max=$(printf '%s\n' "${wins[@]}" | grep . | maximum || true)
cmd_med=$(printf '%s\n' "${cmds[@]}" | median)
cmd_max=$(printf '%s\n' "${cmds[@]}" | maximum)
if ((none_runs > 0)); then
    win_verdict="**MISS**"
    win_max="no write after the first failure in $none_runs run(s)"
else
    win_verdict=$(awk -v m="$win_max" -v t="$TARGET_WINDOW_SECS" 'BEGIN { print (m + 0 <= t + 0) ? "pass" : "**MISS**" }')
fi
lost_verdict=$([[ $LOST -le $TARGET_LOST ]] && echo pass || echo "**MISS**")
cmd_verdict=$([[ $cmd_fail == 0 ]] && echo "all $RUNS succeeded, leader changed each time" || echo "**$cmd_fail of $RUNS failed or left the leader unchanged**")
{
    echo
    echo "## pgwarden switchover benchmark ($STARTED_AT, $(nproc) cores, $RUNS switchovers, $DYN_CONFIG)"
    echo
    echo "| Figure | Median | Max | Target | Result |"
    echo "|---|---|---|---|---|"
    echo "| Failed-write window through HAProxy, per switchover | ${win_med:-none} s | ${win_max:-none} s | ≤ $TARGET_WINDOW_SECS s (every run) | $win_verdict |"
    echo "| \`pgwarden switchover --force\` wall time | $cmd_med s | $cmd_max s | (reported) | $cmd_verdict |"
    echo "| Acknowledged rows lost (final primary $FINAL) | $LOST of $ACKED_TOTAL acknowledged | | $TARGET_LOST | $lost_verdict |"
    echo "| pg_rewind on the old primary (\"rewinding with pg_rewind\" in its agent log) | $rewinds of $RUNS runs | | (reported; none expected) | $([[ $rewinds == 0 ]] && echo "none" || echo "**$rewinds**") |"
    echo "| Stop: SIGTERM to the demo | $STOP_RESULT | | everything stopped | $STOP_VERDICT |"
    echo
    echo "Per run (times of failures from the command's launch; \"span\": first failure to the first write acknowledged after the last failure; \"healthy\": from the command's return until leader + 2 streaming replicas and no pending request):"
    echo
    echo "| Run | Primary before → after | Command | Exit | Failed-write window | First / last failure | Failed attempts (episodes) | Span | Slowest acked write | Healthy after | Old primary rejoined by | pg_rewind | Errors |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for k in $(seq "$RUNS"); do
        echo "| $k | ${R_FROM[$k]} → ${R_TO[$k]} | ${R_CMD[$k]} s | ${R_RC[$k]} | ${W_WIN[$k]} s | ${W_FIRST[$k]} / ${W_LAST[$k]} s | ${W_FAILED[$k]} (${W_EPI[$k]}) | ${W_SPAN[$k]} s | ${W_MAXOK[$k]} s | ${R_HEAL[$k]} s | ${R_REJOIN[$k]:-?} | ${R_REWIND[$k]} | ${W_ERR[$k]:-—} |"
    done
    echo
    echo "Probe: $ATTEMPTS attempts, $ACKED_TOTAL acknowledged, $FAILED_TOTAL failed ($PRE_FAILED before the first switchover); rows on the final primary: $want; rows per member at the end: $counts ($([[ $same == 1 ]] && echo equal || echo "**not equal**")). \"rewinding with pg_rewind\" in the whole agent logs: $REWIND_ALL."
    echo "Command output, run 1: ${R_OUT[1]}"
    echo
    echo "Ports $BASE..$((BASE + 11)) on 127.0.0.1; binary sha256 $BIN_SHA built from commit $GIT_REV plus $GIT_DIRTY uncommitted paths."
    echo "Load average at start / end: $LOAD_START / $LOAD_END; other \`pgwarden demo\` processes on the machine at the end: $(pgrep -f 'pgwarden demo' | grep -vcx "${DEMO_PID:-0}" || true)."
}

FAILED=0
[[ $STOP_VERDICT == pass ]] || exit 1
