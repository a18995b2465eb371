#!/usr/bin/env bash
# Failover benchmark for a local `pgwarden demo` cluster (not a test: it
# prints figures next to their targets and never fails on a missed target;
# it exits non-zero only if the cluster does not come up, does not heal
# between runs, or leaves a process behind).
#
#   bash bench/failover.sh            # RUNS=5 of each scenario
#   RUNS=1 SCENARIOS="c" bash bench/failover.sh
#
# What it does:
#   1. cargo build --release, then starts `pgwarden demo` on a block of free
#      loopback ports (20000-31999, never the demo's defaults) in a new
#      temporary directory, and waits for a leader and two streaming
#      replicas (`pgwarden -c <dir>/node1/pgwarden.toml list --format json`,
#      confirmed by each member's /primary or /replica answering 200).
#   2. For each scenario, RUNS times:
#        a  kill -9 the primary's agent AND its postmaster and the
#           postmaster's children, together (the primary's server dies);
#        b  kill -9 only the primary's postmaster (the agent stays);
#        c  SIGTERM the primary's agent (a clean stop of that member).
#      A probe (bench/failover_probe.py) opens a new connection through
#      HAProxy's read-write port every 100 ms (1 s budget for connect and
#      authentication, 1 s for the INSERT) and inserts the attempt number
#      into a fresh table, logging each attempt's start, end, outcome and id.
#      Figures per run: the time from the fault to the acknowledgement of
#      the first successful attempt that started after it, and the
#      acknowledged ids (before or after the fault) missing from the primary
#      at the end of the run, once the cluster has healed.
#   3. Between runs the killed agent is restarted in the background
#      (`pgwarden agent -c <dir>/<node>/pgwarden.toml`, output appended to
#      <dir>/<node>/agent.log; it rewinds or restarts as needed), and the
#      next fault waits until all three members are healthy again.
#   4. SIGTERM to the restarted agents and to the demo, then checks that no
#      process of the directory is left.
#   5. Prints markdown tables (per run, and per scenario median and max
#      against the targets for the default ttl of 10 s).
#
# Environment (all optional):
#   RUNS=5              runs per scenario
#   SCENARIOS="a b c"   which scenarios, in this order
#   PRE_FAULT_SECS=2    probe writes before each fault
#   POST_WRITE_SECS=3   probe keeps writing after the first write after the fault
#   WRITE_TIMEOUT=120   give up waiting for a write after a fault (recorded as a miss)
#   HEAL_TIMEOUT=240    the cluster must be healthy again within this (else exit 1)
#   SETTLE_SECS=3       pause once healthy before the next fault
#   BASE_PORT=N         use ports N..N+11 instead of picking a free block
#   READY_TIMEOUT=300   seconds to wait for the cluster to come up
#   KEEP_DIR=1          keep the demo directory (it is kept anyway on failure)
#   SKIP_BUILD=1        do not run cargo build --release
#
# Progress goes to stderr, the report to stdout. Needs python3, psql, jq,
# curl, ss.

set -euo pipefail

RUNS=${RUNS:-5}
SCENARIOS=${SCENARIOS:-"a b c"}
PRE_FAULT_SECS=${PRE_FAULT_SECS:-2}
POST_WRITE_SECS=${POST_WRITE_SECS:-3}
WRITE_TIMEOUT=${WRITE_TIMEOUT:-120}
HEAL_TIMEOUT=${HEAL_TIMEOUT:-240}
SETTLE_SECS=${SETTLE_SECS:-3}
READY_TIMEOUT=${READY_TIMEOUT:-300}
STOP_TIMEOUT=${STOP_TIMEOUT:-150} # the demo itself allows 90 s for agents + 10 s each for HAProxy/etcd
MEMBERS=3

# Targets for the default dynamic config (ttl 10 s).
TTL=10
declare -A TARGET_SECS=([a]=$((TTL + 2)) [b]=5 [c]=2)
declare -A TARGET_LOST=([a]="" [b]=0 [c]=0) # "" = reported, no target
declare -A TITLE=(
    [a]="(a) kill -9 the primary's agent and PostgreSQL together"
    [b]="(b) kill -9 the primary's postmaster only"
    [c]="(c) SIGTERM the primary's agent"
)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=$ROOT/target/release/pgwarden
PROBE=$ROOT/bench/failover_probe.py

log() { printf '[failover %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in cargo python3 psql jq ss awk pgrep curl realpath; do
    command -v "$tool" >/dev/null || die "\`$tool\` not found"
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
for s in $SCENARIOS; do
    [[ -n ${TITLE[$s]:-} ]] || die "unknown scenario '$s' (use a, b, c)"
done

# --- state used by the cleanup trap -------------------------------------------
DIR=""
DEMO_PID=""
DEMO_OUT=""
DEMO_ERR=""
PROBE_PID=""
STOPPED=0
FAILED=1 # cleared at the very end of a complete run
declare -A RESTARTED=() # pid -> node, agents this script started

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
            [[ $cmd == *"bench/failover.sh"* ]] && continue
            echo "$pid"
        fi
    done
}

alive() { # PID -> running (not a zombie)
    local st
    st=$(awk '{ sub(/.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z ]]
}

is_our_agent() { # PID -> the process is a `pgwarden agent` of our directory
    local cmd
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
    [[ $cmd == *"pgwarden agent -c $DIR/"* ]]
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
    local t0=$EPOCHREALTIME p live=()
    # Agents we restarted are not the demo's children: SIGTERM them at the
    # same time as the demo (which stops its own agents, then HAProxy and
    # etcd), so they can still release their keys while etcd runs.
    for p in "${!RESTARTED[@]}"; do
        if alive "$p" && is_our_agent "$p"; then
            log "stopping restarted agent ${RESTARTED[$p]} (SIGTERM to pid $p)"
            kill -TERM "$p" 2>/dev/null || true
            live+=("$p")
        fi
    done
    if [[ -n $DEMO_PID ]] && kill -0 "$DEMO_PID" 2>/dev/null; then
        log "stopping the demo (SIGTERM to pid $DEMO_PID)"
        kill -TERM "$DEMO_PID" 2>/dev/null || true
    fi
    local deadline=$((SECONDS + STOP_TIMEOUT))
    for p in "${live[@]}" ${DEMO_PID:+"$DEMO_PID"}; do
        while alive "$p" && ((SECONDS < deadline)); do sleep 0.1; done
        if alive "$p"; then
            log "pid $p did not exit within ${STOP_TIMEOUT}s; SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
            STOP_SECS="timeout"
        fi
        wait "$p" 2>/dev/null || true
    done
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
    stop_all
    if [[ -n ${LEFTOVERS// /} ]]; then
        log "terminating leftovers: $LEFTOVERS"
        kill -TERM $LEFTOVERS 2>/dev/null
        sleep 5
        kill -KILL $(dir_pids) 2>/dev/null
        ((rc == 0)) && rc=1
    fi
    if [[ -n $DIR && -d $DIR ]]; then
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
    # bench/run.sh does, so outgoing connections cannot take them.
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

sql() { # sql PORT SQL -> rows, unaligned
    PGPASSWORD=$PW PGCONNECT_TIMEOUT=2 psql -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 -c "$2"
}

list_json() { "$BIN" -c "$CFG1" list --format json 2>/dev/null; }

http_code() { curl -s -m 2 -o /dev/null -w '%{http_code}' "$1" 2>/dev/null || true; }

agent_pid() { # NODE -> pid of its agent process (empty if none; error if several)
    local pids
    pids=$(pgrep -f "pgwarden agent -c $DIR/$1/pgwarden.toml" || true)
    [[ $(wc -w <<<"$pids") -le 1 ]] || die "several agent processes for $1: $pids"
    echo "$pids"
}

postmaster_pid() { # NODE -> pid of its live postmaster (empty if none)
    local f=$DIR/$1/data/postmaster.pid pid
    [[ -r $f ]] || return 0
    pid=$(head -n1 "$f" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
    return 0
}

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

wait_healthy() { # TIMEOUT -> waits until healthy(); returns 1 on timeout
    local deadline=$((SECONDS + $1))
    until healthy; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

start_agent() { # NODE: in the background, output appended to its agent.log
    local n=$1 cfg=$DIR/$1/pgwarden.toml pid
    "$BIN" agent -c "$cfg" >>"$DIR/$n/agent.log" 2>&1 </dev/null &
    pid=$!
    RESTARTED[$pid]=$n
    log "restarted agent $n (pid $pid), output appended to $DIR/$n/agent.log"
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
DIR=$(realpath "$(mktemp -d /tmp/pgwarden-failover.XXXXXXXX)")
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
TTL_ACTUAL=$(curl -s -m 2 "http://127.0.0.1:$((API_BASE + 1))/config" | jq -r '.ttl // empty' 2>/dev/null || true)
log "dynamic config ttl: ${TTL_ACTUAL:-unknown} (targets assume $TTL)"

# --- 2. the runs ------------------------------------------------------------------
declare -A R_FIRST R_LASTF R_LOST R_LOSTB R_LOSTA R_ACKB R_ACKA R_FAILA R_FROM R_TO R_HEAL R_IDS R_LASTB R_CONS
run_one() { # SCENARIO RUN
    local s=$1 k=$2 key=$1$2 table=fo_$1_$2
    local plog=$DIR/bench/probe_$1_$2.log
    local old=$LEADER agent pm children t_fault first="" heal_t0 present=$DIR/bench/present_$1_$2.txt
    log "=== ${TITLE[$s]}, run $k/$RUNS: primary $old"
    PGPASSWORD=$PW python3 "$PROBE" probe --port "$RW_PORT" --table "$table" --log "$plog" \
        2>>"$DIR/bench/probe.stderr" &
    PROBE_PID=$!
    # Writes must flow before the fault.
    local deadline=$((SECONDS + 60))
    until [[ $(awk -F'\t' '$4 == 1' "$plog" 2>/dev/null | wc -l) -ge 5 ]]; do
        ((SECONDS < deadline)) || die "the probe got no write through before the fault: $(tail -n 3 "$plog" 2>/dev/null)"
        sleep 0.1
    done
    nap "$PRE_FAULT_SECS"

    agent=$(agent_pid "$old")
    pm=$(postmaster_pid "$old")
    [[ -n $agent && -n $pm ]] || die "no agent ($agent) or postmaster ($pm) for $old"
    case $s in
    a)
        children=$(pgrep -P "$pm" | tr '\n' ' ' || true)
        t_fault=$EPOCHREALTIME
        # shellcheck disable=SC2086
        kill -KILL "$agent" "$pm" $children
        log "fault at $t_fault: kill -9 agent $agent, postmaster $pm and its children $children"
        ;;
    b)
        t_fault=$EPOCHREALTIME
        kill -KILL "$pm"
        log "fault at $t_fault: kill -9 postmaster $pm"
        ;;
    c)
        t_fault=$EPOCHREALTIME
        kill -TERM "$agent"
        log "fault at $t_fault: SIGTERM agent $agent"
        ;;
    esac

    # The first acknowledged write that started after the fault.
    deadline=$((SECONDS + WRITE_TIMEOUT))
    while :; do
        first=$(awk -F'\t' -v f="$t_fault" '!/^#/ && $4 == 1 && $2 >= f { print $3 - f; exit }' "$plog")
        [[ -n $first ]] && break
        if ((SECONDS >= deadline)); then
            log "no write accepted within ${WRITE_TIMEOUT}s of the fault"
            break
        fi
        sleep 0.1
    done
    [[ -n $first ]] && log "first write after the fault: ~${first}s"
    nap "$POST_WRITE_SECS"
    stop_probe

    # Restore: bring the member back and wait for all three to be healthy.
    heal_t0=$EPOCHREALTIME
    case $s in
    a) start_agent "$old" ;;
    b) ;; # the agent is alive: it restarts PostgreSQL or rejoins by itself
    c)
        deadline=$((SECONDS + 120))
        while alive "$agent" && is_our_agent "$agent"; do
            ((SECONDS < deadline)) || die "agent $old (pid $agent) did not exit within 120 s of SIGTERM"
            sleep 0.1
        done
        wait "$agent" 2>/dev/null || true
        [[ -z $(postmaster_pid "$old") ]] || log "note: $old's PostgreSQL still runs after its agent exited"
        start_agent "$old"
        ;;
    esac
    wait_healthy "$HEAL_TIMEOUT" || die "cluster not healthy ${HEAL_TIMEOUT}s after run $key: $HEALTH_DETAIL"
    R_HEAL[$key]=$(since "$heal_t0")
    log "healthy again after ${R_HEAL[$key]}s: leader $LEADER"

    # Acknowledged ids missing from the primary, through HAProxy and directly.
    local tries=0
    until sql "$RW_PORT" "SELECT id FROM $table ORDER BY id" >"$present" 2>>"$DIR/bench/psql.stderr"; do
        tries=$((tries + 1))
        ((tries < 50)) || die "cannot read $table through HAProxy"
        sleep 0.2
    done
    eval "$(python3 "$PROBE" analyze --log "$plog" --fault "$t_fault" --present "$present")"
    # Every member ends with the same rows (replicas caught up, the old
    # primary rewound): informational.
    local n cnt want counts="" same=1
    want=$(wc -l <"$present")
    for n in $(seq "$MEMBERS"); do
        deadline=$((SECONDS + 15))
        while :; do
            cnt=$(sql "$((PG_BASE + n))" "SELECT count(*) FROM $table" 2>/dev/null || echo "?")
            [[ $cnt == "$want" ]] && break
            ((SECONDS < deadline)) || { same=0; break; }
            sleep 0.5
        done
        counts+="node$n=$cnt "
    done
    R_FIRST[$key]=$FIRST_WRITE_SECS
    R_LASTF[$key]=$LAST_FAIL_SECS
    R_LOST[$key]=$LOST
    R_LOSTB[$key]=$LOST_BEFORE
    R_LOSTA[$key]=$LOST_AFTER
    R_IDS[$key]=$LOST_IDS
    R_ACKB[$key]=$ACKED_BEFORE
    R_ACKA[$key]=$ACKED_AFTER
    R_FAILA[$key]=$FAILED_AFTER
    R_LASTB[$key]=$LAST_ACK_BEFORE_SECS
    R_FROM[$key]=$old
    R_TO[$key]=$LEADER
    R_CONS[$key]=$([[ $same == 1 ]] && echo "yes" || echo "no: ${counts% }")
    log "run $key: fault -> first write ${FIRST_WRITE_SECS}s, last failed attempt started ${LAST_FAIL_SECS}s after it; acknowledged $ACKED_BEFORE before / $ACKED_AFTER after," \
        "lost $LOST ($LOST_BEFORE before, $LOST_AFTER after${LOST_IDS:+: ids $LOST_IDS}); $FAILED_AFTER failed attempts;" \
        "primary $old -> $LEADER; rows per member: ${counts% }"
    nap "$SETTLE_SECS"
    wait_healthy "$HEAL_TIMEOUT" || die "cluster not healthy before the next run: $HEALTH_DETAIL"
}

for s in $SCENARIOS; do
    for k in $(seq "$RUNS"); do
        run_one "$s" "$k"
    done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- 3. stop ---------------------------------------------------------------------
stop_all
if [[ -z ${LEFTOVERS// /} ]]; then
    STOP_RESULT="exited after ${STOP_SECS}s; no process of the directory left"
    STOP_VERDICT=pass
else
    STOP_RESULT="exited after ${STOP_SECS}s; **leftover pids: $LEFTOVERS**"
    STOP_VERDICT="**FAIL**"
fi

# --- 4. report ---------------------------------------------------------------------
{
    echo
    echo "## pgwarden failover benchmark ($STARTED_AT, $(nproc) cores, $RUNS runs per scenario, ttl ${TTL_ACTUAL:-?} s)"
    echo
    echo "| Scenario | Fault → first write: median | max | Target | Result | Rows lost: total (max per run) | Target | Result |"
    echo "|---|---|---|---|---|---|---|---|"
    for s in $SCENARIOS; do
        vals=() misses=0 lost_total=0 lost_max=0
        for k in $(seq "$RUNS"); do
            v=${R_FIRST[$s$k]}
            if [[ $v == none ]]; then misses=$((misses + 1)); else vals+=("$v"); fi
            lost_total=$((lost_total + R_LOST[$s$k]))
            ((R_LOST[$s$k] > lost_max)) && lost_max=${R_LOST[$s$k]}
        done
        med=$(printf '%s\n' "${vals[@]}" | grep . | median || true)
        max=$(printf '%s\n' "${vals[@]}" | grep . | maximum || true)
        ((misses > 0)) && max="none within ${WRITE_TIMEOUT} s in $misses run(s)"
        t=${TARGET_SECS[$s]}
        if ((misses > 0)); then
            verdict="**MISS**"
        else
            verdict=$(awk -v m="$max" -v t="$t" 'BEGIN { print (m + 0 <= t + 0) ? "pass" : "**MISS**" }')
        fi
        if [[ -n ${TARGET_LOST[$s]} ]]; then
            lt="${TARGET_LOST[$s]}"
            lv=$([[ $lost_total -le ${TARGET_LOST[$s]} ]] && echo pass || echo "**MISS**")
        else
            lt="— (asynchronous replication: reported)"
            lv="—"
        fi
        echo "| ${TITLE[$s]} | ${med:-none} s | ${max:-none} s | ≤ $t s (every run) | $verdict | $lost_total ($lost_max) | $lt | $lv |"
    done
    echo "| Stop: SIGTERM to the demo and the restarted agents | $STOP_RESULT | | everything stopped | $STOP_VERDICT | | | |"
    echo
    echo "Per run:"
    echo
    echo "| Run | Primary before → after | Fault → first write | Fault → last failed attempt | Last ack before fault | Acked before / after | Failed attempts after | Lost (before / after) | Rows equal on all members | Healed after |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for s in $SCENARIOS; do
        for k in $(seq "$RUNS"); do
            key=$s$k
            lost="${R_LOST[$key]} (${R_LOSTB[$key]} / ${R_LOSTA[$key]})"
            [[ -n ${R_IDS[$key]} ]] && lost+=": ids ${R_IDS[$key]}"
            echo "| $s$k | ${R_FROM[$key]} → ${R_TO[$key]} | ${R_FIRST[$key]} s | ${R_LASTF[$key]} s | ${R_LASTB[$key]} s | ${R_ACKB[$key]} / ${R_ACKA[$key]} | ${R_FAILA[$key]} | $lost | ${R_CONS[$key]} | ${R_HEAL[$key]} s |"
        done
    done
    echo
    echo "Ports $BASE..$((BASE + 11)) on 127.0.0.1; binary sha256 $BIN_SHA built from commit $GIT_REV plus $GIT_DIRTY uncommitted paths."
    echo "Load average at start / end: $LOAD_START / $LOAD_END; other \`pgwarden demo\` processes on the machine at the end: $(pgrep -f 'pgwarden demo' | grep -vcx "${DEMO_PID:-0}" || true)."
}

FAILED=0
[[ $STOP_VERDICT == pass ]] || exit 1
