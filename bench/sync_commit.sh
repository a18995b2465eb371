#!/usr/bin/env bash
# Synchronous-mode benchmark for a local `pgwarden demo` cluster (not a test:
# it prints figures and never fails on them; it exits non-zero only if the
# cluster does not come up, does not reach the asked replication mode, does
# not heal between runs, or leaves a process or the demo directory behind).
#
#   bash bench/sync_commit.sh                    # SECS=30 ROUNDS=2 FAILOVERS=3
#   SECS=10 ROUNDS=1 FAILOVERS=1 SKIP_BUILD=1 bash bench/sync_commit.sh
#
# What it does:
#   1. cargo build --release (unless SKIP_BUILD=1), then starts `pgwarden
#      demo` on a block of twelve free loopback ports (20000-31999, never the
#      demo's defaults; picked as bench/switchover.sh does) in a new
#      temporary directory, and waits for a leader and two streaming
#      replicas (`pgwarden -c <dir>/node1/pgwarden.toml list --format json`,
#      confirmed by the leader's /primary and each replica's /replica
#      answering 200).
#   2. Commit cost. Creates a database `pgbench` and initialises it through
#      HAProxy's read-write port (`pgbench -i -s SCALE`), then ROUNDS times:
#        - asynchronous replication (`edit-config --set
#          synchronous_mode=false` from round 2 on; waits until `list` has no
#          `Replication:` line, no member has role sync_standby and no row of
#          the primary's pg_stat_replication is other than async);
#        - synchronous (`edit-config --set synchronous_mode=true`; waits
#          until `list` prints `Replication: synchronous (X)`, `list --format
#          json` gives X role sync_standby, and the primary's
#          pg_stat_replication shows X with sync_state `sync`);
#      and in each mode, for every client count in CLIENTS, a CHECKPOINT on
#      the primary, then
#        pgbench -h 127.0.0.1 -p <rw port> -U postgres -c C -j min(C,THREADS)
#                -T SECS -P 5 --no-vacuum -l pgbench
#      (the default TPC-B-like script; every transaction logged with -l for
#      the percentiles). tps, latency average and stddev as pgbench prints
#      them, p50/p99 from its transaction logs.
#   3. Failover in synchronous mode, FAILOVERS times: a write probe
#      (bench/failover_probe.py, as bench/failover.sh uses it) writes through
#      HAProxy's read-write port for PRE_FAULT_SECS, then the primary's agent,
#      its postmaster and the postmaster's children are killed with one
#      `kill -9` (bench/failover.sh's scenario (a)), with the member named in
#      `sync` just before noted. A sampler records every change of
#      `pgwarden list` (leader, sync_standby, `Replication:` line) every
#      0.2 s. Figures: fault -> first acknowledged write that started after
#      it; fault -> a new leader running; fault -> its `sync` naming a
#      standby again; whether the new leader is the listed standby; the
#      acknowledged ids missing from the new primary (read directly on its
#      port once healed); the slowest acknowledged write that started after
#      the fault (a commit that reached the new primary before
#      synchronous_standby_names named its standby waits for it). The killed agent is then restarted (output appended
#      to its agent.log; the old primary rejoins by itself, rewinding if
#      needed) and the next run waits until all three members are healthy
#      and a synchronous standby is named again.
#   4. SIGTERM to the restarted agents and the demo, then checks that no
#      process of the directory is left, removes the directory (and the
#      demo's stdout/stderr files) and checks that nothing of it remains.
#   5. Prints a markdown report (machine, command, tables).
#
# Environment (all optional):
#   SECS=30             duration of each pgbench run
#   CLIENTS="4 1"       pgbench client counts, in this order, in each mode
#   THREADS=2           pgbench threads (at most the client count)
#   ROUNDS=2            async-then-sync rounds
#   SCALE=1             pgbench scale factor
#   FAILOVERS=3         kill -9 failovers in synchronous mode (0: none)
#   PRE_FAULT_SECS=2    probe writes before each fault
#   POST_WRITE_SECS=3   probe keeps writing after the first write after the fault
#   WRITE_TIMEOUT=120   give up waiting for a write after a fault (recorded)
#   MODE_TIMEOUT=120    the replication mode must be reached within this (else exit 1)
#   HEAL_TIMEOUT=240    the cluster must be healthy again within this (else exit 1)
#   SETTLE_SECS=3       pause once healthy before the next fault
#   READY_TIMEOUT=300   seconds to wait for the cluster to come up
#   BASE_PORT=N         use ports N..N+11 instead of picking a free block
#   PGBENCH=path        default /usr/lib/postgresql/15/bin/pgbench
#   LOG_DIR=path        copy the agents', etcd's, HAProxy's, pgbench's and the
#                       probe's logs there before the demo directory is removed
#   KEEP_DIR=1          keep the demo directory (it is kept anyway on failure)
#   SKIP_BUILD=1        do not run cargo build --release
#
# Progress goes to stderr, the report to stdout. Needs python3, psql, jq,
# curl, ss, pgbench.

set -euo pipefail

WALL_T0=$EPOCHREALTIME
# The command as run, for the report: the knobs set in the environment.
KNOBS=(SECS CLIENTS THREADS ROUNDS SCALE FAILOVERS PRE_FAULT_SECS POST_WRITE_SECS WRITE_TIMEOUT
    MODE_TIMEOUT HEAL_TIMEOUT SETTLE_SECS READY_TIMEOUT BASE_PORT PGBENCH LOG_DIR KEEP_DIR SKIP_BUILD)
COMMAND=""
for v in "${KNOBS[@]}"; do
    if [[ -n ${!v+x} ]]; then
        if [[ ${!v} =~ ^[A-Za-z0-9_./:-]+$ ]]; then COMMAND+="$v=${!v} "; else COMMAND+="$v=\"${!v}\" "; fi
    fi
done
COMMAND+="bash bench/sync_commit.sh"

SECS=${SECS:-30}
CLIENTS=${CLIENTS:-"4 1"}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
SCALE=${SCALE:-1}
FAILOVERS=${FAILOVERS:-3}
PRE_FAULT_SECS=${PRE_FAULT_SECS:-2}
POST_WRITE_SECS=${POST_WRITE_SECS:-3}
WRITE_TIMEOUT=${WRITE_TIMEOUT:-120}
MODE_TIMEOUT=${MODE_TIMEOUT:-120}
HEAL_TIMEOUT=${HEAL_TIMEOUT:-240}
SETTLE_SECS=${SETTLE_SECS:-3}
READY_TIMEOUT=${READY_TIMEOUT:-300}
STOP_TIMEOUT=${STOP_TIMEOUT:-150} # the demo itself allows 90 s for agents + 10 s each for HAProxy/etcd
PGBENCH=${PGBENCH:-/usr/lib/postgresql/15/bin/pgbench}
MEMBERS=3
DB=pgbench

# Reference for the fault -> first write figure: bench/failover.sh's target
# for scenario (a) at the default ttl of 10 s (asynchronous replication).
TTL=10
REF_FIRST_WRITE_SECS=$((TTL + 2))
TARGET_LOST=0

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=$ROOT/target/release/pgwarden
PROBE=$ROOT/bench/failover_probe.py

log() { printf '[sync_commit %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in cargo python3 psql jq ss awk pgrep curl realpath sort; do
    command -v "$tool" >/dev/null || die "\`$tool\` not found"
done
[[ -x $PGBENCH ]] || die "pgbench not found at $PGBENCH (set PGBENCH)"
for v in SECS THREADS ROUNDS SCALE; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
[[ $FAILOVERS =~ ^[0-9]+$ ]] || die "FAILOVERS must be a non-negative integer"
for c in $CLIENTS; do
    [[ $c =~ ^[1-9][0-9]*$ ]] || die "CLIENTS must be positive integers"
done

# --- state used by the cleanup trap -------------------------------------------
DIR=""
DEMO_PID=""
DEMO_OUT=""
DEMO_ERR=""
PROBE_PID=""
SAMPLER_PID=""
PGBENCH_PID=""
STOPPED=0
REMOVED=0
FAILED=1                # cleared at the very end of a complete run
declare -A RESTARTED=() # pid -> node, agents this script started

# PIDs of processes belonging to the demo directory: command line mentions it
# (demo, etcd, HAProxy, agents, fence keepers, postmasters, the probe) or
# working directory inside it (every PostgreSQL process chdirs into its data
# directory).
dir_pids() {
    local p pid cwd cmd
    [[ -n $DIR ]] || return 0
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        cwd=$(readlink "$p/cwd" 2>/dev/null) || cwd=""
        cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || cmd=""
        if [[ $cwd == "$DIR" || $cwd == "$DIR"/* || $cmd == *"$DIR/"* || $cmd == *"$DIR "* ]]; then
            [[ $cmd == *"bench/sync_commit.sh"* ]] && continue
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

stop_sampler() {
    if [[ -n $SAMPLER_PID ]]; then
        kill -TERM "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=""
    fi
}

STOP_SECS=""
LEFTOVERS=""
stop_all() {
    [[ $STOPPED == 1 ]] && return 0
    STOPPED=1
    stop_probe
    stop_sampler
    if [[ -n $PGBENCH_PID ]]; then
        kill -TERM "$PGBENCH_PID" 2>/dev/null || true
        wait "$PGBENCH_PID" 2>/dev/null || true
        PGBENCH_PID=""
    fi
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
    local _
    for _ in $(seq 50); do
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
        # shellcheck disable=SC2086
        kill -TERM $LEFTOVERS 2>/dev/null
        sleep 5
        # shellcheck disable=SC2046
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
    # Twelve consecutive ports below the ephemeral range (32768+), as the
    # other bench scripts do, so outgoing connections cannot take them.
    local n=12 _ base
    if [[ -n ${BASE_PORT:-} ]]; then
        port_block_free "$BASE_PORT" "$n" || die "ports $BASE_PORT..$((BASE_PORT + n - 1)) are not all free"
        echo "$BASE_PORT"
        return
    fi
    for _ in $(seq 100); do
        base=$((20000 + (RANDOM % 1000) * 12))
        if port_block_free "$base" "$n"; then
            echo "$base"
            return
        fi
    done
    die "no block of $n free ports found in 20000-31999"
}

since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

sql() { # sql PORT SQL [DB] -> rows, unaligned
    PGPASSWORD=$PW PGCONNECT_TIMEOUT=2 psql -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d "${3:-postgres}" \
        -v ON_ERROR_STOP=1 -c "$2"
}

list_json() { "$BIN" -c "$CFG1" list --format json 2>/dev/null; }
list_table() { "$BIN" -c "$CFG1" list 2>/dev/null; }

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

start_agent() { # NODE: in the background, output appended to its agent.log
    local n=$1 cfg=$DIR/$1/pgwarden.toml pid
    "$BIN" agent -c "$cfg" >>"$DIR/$n/agent.log" 2>&1 </dev/null &
    pid=$!
    RESTARTED[$pid]=$n
    log "restarted agent $n (pid $pid), output appended to $DIR/$n/agent.log"
}

# Healthy: exactly one leader `running` and two members streaming from it in
# etcd (role replica or sync_standby), the leader's /primary and each other
# member's /replica answering 200. Sets LEADER, LEADER_PG_PORT.
LEADER=""
LEADER_PG_PORT=""
HEALTH_DETAIL=""
LAST_JSON=""
healthy() {
    local js leader port api r ok=1
    js=$(list_json) || { HEALTH_DETAIL="list failed"; return 1; }
    HEALTH_DETAIL=$(jq -c '[.[] | {name, role, state, upstream}]' <<<"$js" 2>/dev/null || echo "$js")
    leader=$(jq -r '[.[] | select(.role == "leader" and .state == "running")] | if length == 1 then .[0].name else "" end' <<<"$js")
    [[ -n $leader ]] || return 1
    [[ $(jq --arg l "$leader" '[.[] | select((.role == "replica" or .role == "sync_standby") and .state == "streaming" and .upstream == $l)] | length' <<<"$js") == $((MEMBERS - 1)) ]] || return 1
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
    LAST_JSON=$js
}

# No switchover or failover request left in etcd.
no_request() {
    local out
    out=$("$BIN" -c "$CFG1" switchover --list 2>/dev/null) || { HEALTH_DETAIL="switchover --list failed"; return 1; }
    [[ $out == *"no switchover or failover pending"* ]] || { HEALTH_DETAIL="pending: $out"; return 1; }
}

# The primary's pg_stat_replication in one line: "node2 sync, node3 async".
repl_state() {
    sql "$LEADER_PG_PORT" "SELECT coalesce(string_agg(application_name || ' ' || sync_state, ', ' ORDER BY application_name), 'none') FROM pg_stat_replication" 2>/dev/null || echo "?"
}

# Synchronous: healthy, `list` prints `Replication: synchronous (X)`, X is
# the one member with role sync_standby, and the primary reports X `sync`.
# Sets SYNC_NAME.
SYNC_NAME=""
REPL_LINE=""
SYNC_RE='^synchronous \(([A-Za-z0-9_.-]+)\)$'
sync_ready() {
    local table name n st
    healthy || return 1
    table=$(list_table) || { HEALTH_DETAIL="list failed"; return 1; }
    REPL_LINE=$(sed -n 's/^ *Replication: //p' <<<"$table" | head -n1)
    [[ $REPL_LINE =~ $SYNC_RE ]] || { HEALTH_DETAIL="Replication: ${REPL_LINE:-(no line)}; $HEALTH_DETAIL"; return 1; }
    name=${BASH_REMATCH[1]}
    n=$(jq -r '[.[] | select(.role == "sync_standby") | .name] | join(",")' <<<"$LAST_JSON")
    [[ $n == "$name" ]] || { HEALTH_DETAIL="Replication: $REPL_LINE, sync_standby role: ${n:-nobody}"; return 1; }
    st=$(sql "$LEADER_PG_PORT" "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$name'" 2>/dev/null || true)
    [[ $st == sync ]] || { HEALTH_DETAIL="Replication: $REPL_LINE, but $name is '${st:-absent}' in pg_stat_replication"; return 1; }
    SYNC_NAME=$name
}

# Asynchronous: healthy, no `Replication:` line, no sync_standby role, and
# no standby other than async in the primary's pg_stat_replication.
async_ready() {
    local table n st
    healthy || return 1
    table=$(list_table) || { HEALTH_DETAIL="list failed"; return 1; }
    REPL_LINE=$(sed -n 's/^ *Replication: //p' <<<"$table" | head -n1)
    [[ -z $REPL_LINE ]] || { HEALTH_DETAIL="Replication: $REPL_LINE"; return 1; }
    n=$(jq '[.[] | select(.role == "sync_standby")] | length' <<<"$LAST_JSON")
    [[ $n == 0 ]] || { HEALTH_DETAIL="$n member(s) still with role sync_standby"; return 1; }
    st=$(sql "$LEADER_PG_PORT" "SELECT count(*) FROM pg_stat_replication WHERE sync_state <> 'async'" 2>/dev/null || echo "?")
    [[ $st == 0 ]] || { HEALTH_DETAIL="pg_stat_replication: $(repl_state)"; return 1; }
    SYNC_NAME=""
}

wait_until() { # TIMEOUT PREDICATE... -> waits until every predicate holds; 1 on timeout
    local deadline=$(($1 + SECONDS)) p ok
    shift
    while :; do
        ok=1
        for p in "$@"; do
            "$p" || { ok=0; break; }
        done
        ((ok)) && return 0
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# Sets the dynamic config key and waits for the mode. MODE_SECS: how long.
MODE_SECS=""
set_mode() { # sync|async
    local want=$1 val out t0
    val=$([[ $want == sync ]] && echo true || echo false)
    out=$DIR/bench/edit_config_$want.out
    t0=$EPOCHREALTIME
    "$BIN" -c "$CFG1" edit-config --set "synchronous_mode=$val" >"$out" 2>&1 ||
        die "edit-config --set synchronous_mode=$val failed: $(tr '\n' ' ' <"$out")"
    log "edit-config --set synchronous_mode=$val: $(tr '\n' ' ' <"$out" | cut -c1-200)"
    if [[ $want == sync ]]; then
        wait_until "$MODE_TIMEOUT" sync_ready no_request || die "no synchronous standby ${MODE_TIMEOUT}s after synchronous_mode=true: $HEALTH_DETAIL"
    else
        wait_until "$MODE_TIMEOUT" async_ready no_request || die "not asynchronous ${MODE_TIMEOUT}s after synchronous_mode=false: $HEALTH_DETAIL"
    fi
    MODE_SECS=$(since "$t0")
    log "mode $want reached after ${MODE_SECS}s: leader $LEADER${SYNC_NAME:+, sync standby $SYNC_NAME}; primary's pg_stat_replication: $(repl_state)"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "none"; exit }
    if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
maximum() { sort -g | tail -n1; }

# Every change of `pgwarden list`, every 0.2 s, one line per change:
# EPOCH <tab> leader/state <tab> sync_standby members <tab> Replication line.
sampler() { # FILE
    local prev="" cur
    while :; do
        cur=$("$BIN" -c "$CFG1" list 2>/dev/null | awk -F'|' '
            /^ *Replication: / { sub(/^ *Replication: /, ""); repl = $0; next }
            /^\|/ { for (i = 2; i <= 5; i++) gsub(/^ +| +$/, "", $i)
                    if ($2 == "Member") next
                    if ($4 == "leader") leader = leader (leader ? "," : "") $2 "/" $5
                    if ($4 == "sync_standby") sync = sync (sync ? "," : "") $2 "/" $5 }
            END { printf "%s\t%s\t%s", (leader ? leader : "-"), (sync ? sync : "-"), (repl ? repl : "-") }') || cur="list failed"
        if [[ $cur != "$prev" ]]; then
            printf '%s\t%s\n' "$EPOCHREALTIME" "$cur" >>"$1"
            prev=$cur
        fi
        sleep 0.2
    done
}

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
NICED_START=$(ps -eo ni=,pcpu=,comm= | awk '$1 > 0 { printf "%s%s (nice %s, %s%% CPU)", (n++ ? ", " : ""), $3, $1, $2 }')
log "binary $BIN (sha256 $BIN_SHA), commit $GIT_REV with $GIT_DIRTY uncommitted paths; load average $LOAD_START"

BASE=$(pick_ports)
RW_PORT=$BASE
RO_PORT=$((BASE + 1))
STATS_PORT=$((BASE + 2))
PG_BASE=$((BASE + 3))    # members use PG_BASE+1..+3
API_BASE=$((BASE + 6))   # members use API_BASE+1..+3
ETCD_PORT=$((BASE + 10)) # peer port ETCD_PORT+1
DIR=$(realpath "$(mktemp -d /tmp/pgwarden-sync.XXXXXXXX)")
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
wait_until "$READY_TIMEOUT" healthy || die "cluster not healthy after ${READY_TIMEOUT}s: $HEALTH_DETAIL"
log "healthy: leader $LEADER; $HEALTH_DETAIL"
DYN_CONFIG=$(curl -s -m 2 "http://127.0.0.1:$((API_BASE + 1))/config" |
    jq -r '"ttl \(.ttl) s, loop_wait \(.loop_wait) s, retry_timeout \(.retry_timeout) s, synchronous_mode_strict \(.synchronous_mode_strict // false), synchronous_node_count \(.synchronous_node_count // 1)"' 2>/dev/null || echo unknown)
log "dynamic config: $DYN_CONFIG"
PG_SETTINGS=$(sql "$LEADER_PG_PORT" "SELECT string_agg(name || ' ' || setting || coalesce(unit, ''), ', ' ORDER BY name) FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method', 'shared_buffers', 'max_connections', 'full_page_writes')" || echo unknown)
PG_VERSION=$(sql "$LEADER_PG_PORT" "SHOW server_version" || echo unknown)
FS_TYPE=$(stat -f -c %T "$DIR" 2>/dev/null || echo unknown)
log "PostgreSQL $PG_VERSION: $PG_SETTINGS; data on $FS_TYPE"

# --- 2. commit cost: pgbench, asynchronous then synchronous ---------------------
sql "$RW_PORT" "CREATE DATABASE $DB" >/dev/null || die "CREATE DATABASE $DB through HAProxy port $RW_PORT failed"
log "pgbench -i -s $SCALE through 127.0.0.1:$RW_PORT"
t0=$EPOCHREALTIME
PGPASSWORD=$PW "$PGBENCH" -i -s "$SCALE" -q -h 127.0.0.1 -p "$RW_PORT" -U postgres "$DB" \
    >"$DIR/bench/pgbench_init.out" 2>&1 || die "pgbench -i failed: $(tail -n 5 "$DIR/bench/pgbench_init.out")"
INIT_SECS=$(since "$t0")
log "initialised in ${INIT_SECS}s"

declare -A B_TPS B_LAT B_STD B_P50 B_P99 B_TX B_FAIL B_RC B_REPL B_SSN B_LEADER B_THREADS
declare -A MODE_REACHED
PGB_EXAMPLE=""
run_pgbench() { # MODE ROUND CLIENTS
    local mode=$1 r=$2 c=$3 key=$1_$2_$3 j out err prefix rc=0
    j=$((c < THREADS ? c : THREADS))
    out=$DIR/bench/pgbench_$key.out
    err=$DIR/bench/pgbench_$key.err
    prefix=$DIR/bench/pgbench_log_$key
    healthy || die "not healthy before pgbench $key: $HEALTH_DETAIL"
    sql "$LEADER_PG_PORT" "CHECKPOINT" >/dev/null || die "CHECKPOINT on the primary failed"
    B_LEADER[$key]=$LEADER
    B_REPL[$key]=$(repl_state)
    B_SSN[$key]=$(sql "$LEADER_PG_PORT" "SHOW synchronous_standby_names" 2>/dev/null || echo "?")
    B_THREADS[$key]=$j
    local cmd=("$PGBENCH" -h 127.0.0.1 -p "$RW_PORT" -U postgres -c "$c" -j "$j" -T "$SECS" -P 5 --no-vacuum
        -l --log-prefix="$prefix" "$DB")
    [[ -n $PGB_EXAMPLE ]] || PGB_EXAMPLE="pgbench -h 127.0.0.1 -p <rw port> -U postgres -c $c -j $j -T $SECS -P 5 --no-vacuum -l --log-prefix=<dir>/bench/… $DB"
    log "=== pgbench, $mode, round $r/$ROUNDS, $c client(s): leader $LEADER, standbys: ${B_REPL[$key]}; synchronous_standby_names '${B_SSN[$key]}'"
    PGPASSWORD=$PW "${cmd[@]}" >"$out" 2>"$err" &
    PGBENCH_PID=$!
    wait "$PGBENCH_PID" || rc=$?
    PGBENCH_PID=""
    sed 's/^/    /' "$err" >&2
    B_RC[$key]=$rc
    B_TPS[$key]=$(awk '/^tps = / { printf "%.1f", $3; exit }' "$out")
    B_LAT[$key]=$(awk '/^latency average = / { print $4; exit }' "$out")
    B_STD[$key]=$(awk '/^latency stddev = / { print $4; exit }' "$out")
    B_TX[$key]=$(awk -F': ' '/^number of transactions actually processed/ { print $2; exit }' "$out")
    B_FAIL[$key]=$(awk -F': ' '/^number of failed transactions/ { print $2; exit }' "$out")
    # Percentiles of the per-transaction latencies (third field, µs) over
    # every thread's log file.
    read -r "B_P50[$key]" "B_P99[$key]" < <(cat "$prefix".* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ { print $3 }' | sort -n |
        awk '{ v[NR] = $1 } END { if (NR == 0) { print "? ?"; exit }
             i50 = int(NR * 0.50 + 0.999999); i99 = int(NR * 0.99 + 0.999999)
             printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }')
    log "pgbench $key: exit $rc, tps ${B_TPS[$key]:-?}, latency ${B_LAT[$key]:-?} ms (stddev ${B_STD[$key]:-?} ms, p50 ${B_P50[$key]} ms, p99 ${B_P99[$key]} ms), ${B_TX[$key]:-?} transactions, failed ${B_FAIL[$key]:-?}"
}

for r in $(seq "$ROUNDS"); do
    if ((r > 1)); then
        set_mode async
        MODE_REACHED[async_$r]=$MODE_SECS
    fi
    for c in $CLIENTS; do run_pgbench async "$r" "$c"; done
    set_mode sync
    MODE_REACHED[sync_$r]=$MODE_SECS
    for c in $CLIENTS; do run_pgbench sync "$r" "$c"; done
done

# --- 3. failovers in synchronous mode ---------------------------------------------
REJOIN_RE='starting it read-only|re-pointing replication at the leader [a-z0-9]+|starting it as a replica of [a-z0-9]+|starting as its replica without rewind|rewinding with pg_rewind|removing the data directory|cloning from [a-z0-9]+'
declare -A F_FROM F_SYNC F_TO F_OK F_FIRST F_LASTF F_PROM F_SYNCAGAIN F_SYNCNEW F_ACKB F_ACKA F_FAILA F_LOST F_IDS F_CONS F_HEAL F_REJOIN F_TRANS F_SLOW
fail_one() { # RUN
    local k=$1 table=sc_fo_$1 plog=$DIR/bench/probe_fo_$1.log samples=$DIR/bench/samples_fo_$1.tsv
    local present=$DIR/bench/present_fo_$1.txt old sync_before agent pm children t_fault first="" heal_t0 offset
    local oldlog deadline
    wait_until "$HEAL_TIMEOUT" sync_ready no_request || die "no synchronous standby before failover $k: $HEALTH_DETAIL"
    old=$LEADER
    sync_before=$SYNC_NAME
    oldlog=$DIR/$old/agent.log
    offset=$(stat -c %s "$oldlog")
    log "=== failover $k/$FAILOVERS: primary $old, synchronous standby $sync_before (list: Replication: $REPL_LINE)"
    PGPASSWORD=$PW python3 "$PROBE" probe --port "$RW_PORT" --table "$table" --log "$plog" \
        2>>"$DIR/bench/probe.stderr" &
    PROBE_PID=$!
    deadline=$((SECONDS + 60))
    until [[ $(awk -F'\t' '$4 == 1' "$plog" 2>/dev/null | wc -l) -ge 5 ]]; do
        ((SECONDS < deadline)) || die "the probe got no write through before the fault: $(tail -n 3 "$plog" 2>/dev/null)"
        kill -0 "$PROBE_PID" 2>/dev/null || die "the probe exited: $(tail -n 3 "$DIR/bench/probe.stderr" 2>/dev/null)"
        sleep 0.1
    done
    nap "$PRE_FAULT_SECS"
    # The standby must still be the listed one at the moment of the fault.
    sync_ready || die "synchronous standby lost before failover $k: $HEALTH_DETAIL"
    [[ $LEADER == "$old" ]] || die "the leader changed before failover $k ($old -> $LEADER)"
    sync_before=$SYNC_NAME
    sampler "$samples" &
    SAMPLER_PID=$!
    sleep 0.3

    agent=$(agent_pid "$old")
    pm=$(postmaster_pid "$old")
    [[ -n $agent && -n $pm ]] || die "no agent ($agent) or postmaster ($pm) for $old"
    children=$(pgrep -P "$pm" | tr '\n' ' ' || true)
    t_fault=$EPOCHREALTIME
    # shellcheck disable=SC2086
    kill -KILL "$agent" "$pm" $children
    log "fault at $t_fault: kill -9 agent $agent, postmaster $pm and its children $children"

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

    heal_t0=$EPOCHREALTIME
    start_agent "$old"
    wait_until "$HEAL_TIMEOUT" sync_ready no_request || die "cluster not healthy with a synchronous standby ${HEAL_TIMEOUT}s after failover $k: $HEALTH_DETAIL"
    F_HEAL[$k]=$(since "$heal_t0")
    stop_sampler
    log "healthy again after ${F_HEAL[$k]}s: leader $LEADER, synchronous standby $SYNC_NAME"

    local tries=0
    until sql "$LEADER_PG_PORT" "SELECT id FROM $table ORDER BY id" >"$present" 2>>"$DIR/bench/psql.stderr"; do
        tries=$((tries + 1))
        ((tries < 50)) || die "cannot read $table from the primary $LEADER"
        sleep 0.2
    done
    eval "$(python3 "$PROBE" analyze --log "$plog" --fault "$t_fault" --present "$present")"
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
    # From the samples: the first new leader running, and its `sync` naming
    # a standby; the sequence of Replication lines after the fault.
    local prom
    prom=$(awk -F'\t' -v f="$t_fault" -v o="$old" '$1 >= f { n = split($2, L, ",")
            for (i = 1; i <= n; i++) { split(L[i], a, "/")
                if (a[1] != o && a[1] != "-" && a[2] == "running") { printf "%s %.2f", a[1], $1 - f; exit } } }' "$samples")
    F_PROM[$k]=${prom#* }
    F_TO[$k]=${prom%% *}
    [[ -n $prom ]] || { F_PROM[$k]="none"; F_TO[$k]=$LEADER; }
    local again
    again=$(awk -F'\t' -v f="$t_fault" -v l="${F_TO[$k]}" '$1 >= f && ("," $2 ",") ~ ("," l "/") && $4 ~ /^synchronous \(/ { s = $4; sub(/^synchronous \(/, "", s); sub(/\)$/, "", s); printf "%s %.2f", s, $1 - f; exit }' "$samples")
    F_SYNCAGAIN[$k]=${again#* }
    F_SYNCNEW[$k]=${again%% *}
    [[ -n $again ]] || { F_SYNCAGAIN[$k]="none"; F_SYNCNEW[$k]="—"; }
    F_TRANS[$k]=$(awk -F'\t' -v f="$t_fault" '
        $1 < f { prev = $4; pre = "before: " $4 " [leader " $2 "]"; next }
        !done { printf "%s", pre; n = (pre != ""); done = 1 }
        $4 != prev { printf "%s+%.1f s %s [leader %s]", (n++ ? "; " : ""), $1 - f, $4, $2; prev = $4 }' "$samples")
    F_FROM[$k]=$old
    F_SYNC[$k]=$sync_before
    F_OK[$k]=$([[ ${F_TO[$k]} == "$sync_before" ]] && echo yes || echo "**no**")
    F_FIRST[$k]=$FIRST_WRITE_SECS
    # Slowest acknowledged attempt that started after the fault: a commit
    # that reached the new primary and waited for its synchronous standby.
    F_SLOW[$k]=$(awk -F'\t' -v f="$t_fault" '!/^#/ && $4 == 1 && $2 >= f { d = $3 - $2; if (d > m) m = d } END { printf "%.2f", m }' "$plog")
    F_LASTF[$k]=$LAST_FAIL_SECS
    F_ACKB[$k]=$ACKED_BEFORE
    F_ACKA[$k]=$ACKED_AFTER
    F_FAILA[$k]=$FAILED_AFTER
    # shellcheck disable=SC2153 # LOST, LOST_IDS, … come from the eval of the probe's analysis
    F_LOST[$k]=$LOST
    F_IDS[$k]=$LOST_IDS
    F_CONS[$k]=$([[ $same == 1 ]] && echo "yes" || echo "no: ${counts% }")
    local new_part
    new_part=$(tail -c +"$((offset + 1))" "$oldlog")
    F_REJOIN[$k]=$( (grep -oE "$REJOIN_RE" <<<"$new_part" || true) |
        awk '!seen[$0]++ { printf "%s%s", (n++ ? "; " : ""), $0 }')
    log "failover $k: $old -> ${F_TO[$k]} (listed standby: $sync_before, promoted is it: ${F_OK[$k]});" \
        "fault -> leader running ${F_PROM[$k]}s, -> sync named again ${F_SYNCAGAIN[$k]}s (${F_SYNCNEW[$k]}), -> first write ${FIRST_WRITE_SECS}s," \
        "last failed attempt ${LAST_FAIL_SECS}s, slowest acknowledged write ${F_SLOW[$k]}s; acknowledged $ACKED_BEFORE before / $ACKED_AFTER after, lost $LOST${LOST_IDS:+ (ids $LOST_IDS)}; rows per member: ${counts% }"
    log "failover $k: Replication lines after the fault: ${F_TRANS[$k]}"
    log "failover $k: old primary $old rejoined by: ${F_REJOIN[$k]:-no rejoin line}"
    nap "$SETTLE_SECS"
}

for k in $(seq "$FAILOVERS"); do
    fail_one "$k"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- 4. stop and remove -------------------------------------------------------------
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
WALL_SECS=$(since "$WALL_T0")

# --- 5. report ---------------------------------------------------------------------
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM=$(awk '/^MemTotal:/ { t = $2 } /^SwapTotal:/ { s = $2 } END { printf "%.1f GiB, swap %.1f GiB", t / 1048576, s / 1048576 }' /proc/meminfo)
OS=$(awk -F= '$1 == "PRETTY_NAME" { gsub(/"/, "", $2); print $2 }' /etc/os-release 2>/dev/null || true)
pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 == 0 || a == "" || b == "") { print "?"; exit } printf "%+.1f %%", (b / a - 1) * 100 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 == 0 || a == "" || b == "") { print "?"; exit } printf "×%.2f", b / a }'; }
vals() { # ARRAY MODE CLIENTS -> the values of every round, one a line
    local -n arr=$1
    local r key
    for r in $(seq "$ROUNDS"); do
        key=${2}_${r}_${3}
        [[ -n ${arr[$key]:-} ]] && echo "${arr[$key]}"
    done
    return 0
}
{
    echo
    echo "## pgwarden synchronous-mode benchmark ($STARTED_AT)"
    echo
    echo "Command: \`$COMMAND\` (wall time ${WALL_SECS} s)."
    echo
    echo "| Machine | |"
    echo "|---|---|"
    echo "| CPU | \`nproc\`: $(nproc); model name: $CPU_MODEL |"
    echo "| Memory | $MEM |"
    echo "| System | $OS, kernel $(uname -r); data directories on $FS_TYPE |"
    echo "| PostgreSQL | $PG_VERSION ($PG_SETTINGS); $("$PGBENCH" --version) |"
    echo "| Cluster | ports $BASE..$((BASE + 11)) on 127.0.0.1; dynamic config: $DYN_CONFIG |"
    echo "| Binary | sha256 $BIN_SHA, built from commit $GIT_REV plus $GIT_DIRTY uncommitted paths |"
    echo "| Load average | start $LOAD_START, end $LOAD_END; niced processes at the start: ${NICED_START:-none} |"
    echo
    echo "### Commit cost (pgbench TPC-B-like, scale $SCALE, ${SECS} s per run, through HAProxy's read-write port)"
    echo
    echo "Median over $ROUNDS round(s); \"cost\" is synchronous against asynchronous."
    echo
    echo "| Clients | Async tps | Sync tps | tps change | Async latency avg | Sync latency avg | Latency ratio | Async p99 | Sync p99 |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for c in $CLIENTS; do
        at=$(vals B_TPS async "$c" | median)
        st=$(vals B_TPS sync "$c" | median)
        al=$(vals B_LAT async "$c" | median)
        sl=$(vals B_LAT sync "$c" | median)
        ap=$(vals B_P99 async "$c" | median)
        sp=$(vals B_P99 sync "$c" | median)
        echo "| $c | $at | $st | $(pct "$at" "$st") | $al ms | $sl ms | $(ratio "$al" "$sl") | $ap ms | $sp ms |"
    done
    echo
    echo "Every run (standbys as the primary's pg_stat_replication showed them just before the run):"
    echo
    echo "| Round | Mode | Clients (threads) | tps | Latency avg | Stddev | p50 | p99 | Transactions | Failed | Exit | Leader | Standbys |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for r in $(seq "$ROUNDS"); do
        for mode in async sync; do
            for c in $CLIENTS; do
                key=${mode}_${r}_$c
                echo "| $r | $mode | $c (${B_THREADS[$key]}) | ${B_TPS[$key]:-?} | ${B_LAT[$key]:-?} ms | ${B_STD[$key]:-?} ms | ${B_P50[$key]} ms | ${B_P99[$key]} ms | ${B_TX[$key]:-?} | ${B_FAIL[$key]:-?} | ${B_RC[$key]} | ${B_LEADER[$key]} | ${B_REPL[$key]}; synchronous_standby_names '${B_SSN[$key]}' |"
            done
        done
    done
    echo
    modes=""
    for r in $(seq "$ROUNDS"); do
        [[ -n ${MODE_REACHED[async_$r]:-} ]] && modes+="async (round $r) ${MODE_REACHED[async_$r]} s, "
        modes+="sync (round $r) ${MODE_REACHED[sync_$r]} s, "
    done
    echo "pgbench command: \`$PGB_EXAMPLE\`; \`pgbench -i -s $SCALE\` took $INIT_SECS s. A CHECKPOINT on the primary before every run."
    echo "From \`edit-config --set synchronous_mode=…\` to the mode being in place (list + pg_stat_replication): ${modes%, }."
    if ((FAILOVERS > 0)); then
        firsts=() misses=0 lost_total=0 acked_total=0 wrong=0
        for k in $(seq "$FAILOVERS"); do
            if [[ ${F_FIRST[$k]} == none ]]; then misses=$((misses + 1)); else firsts+=("${F_FIRST[$k]}"); fi
            lost_total=$((lost_total + F_LOST[$k]))
            acked_total=$((acked_total + F_ACKB[$k] + F_ACKA[$k]))
            [[ ${F_OK[$k]} == yes ]] || wrong=$((wrong + 1))
        done
        fmed=$(printf '%s\n' "${firsts[@]}" | grep . | median || true)
        fmax=$(printf '%s\n' "${firsts[@]}" | grep . | maximum || true)
        proms=() agains=() slows=()
        for k in $(seq "$FAILOVERS"); do
            slows+=("${F_SLOW[$k]}")
            [[ ${F_PROM[$k]} != none ]] && proms+=("${F_PROM[$k]}")
            [[ ${F_SYNCAGAIN[$k]} != none ]] && agains+=("${F_SYNCAGAIN[$k]}")
        done
        pmed=$(printf '%s\n' "${proms[@]}" | grep . | median || true)
        smed=$(printf '%s\n' "${agains[@]}" | grep . | median || true)
        if ((misses > 0)); then
            fverdict="**MISS** (no write within ${WRITE_TIMEOUT} s in $misses run(s))"
        else
            fverdict=$(awk -v m="$fmax" -v t="$REF_FIRST_WRITE_SECS" 'BEGIN { print (m + 0 <= t + 0) ? "within" : "**over**" }')
        fi
        echo
        echo "### Failover in synchronous mode (kill -9 of the primary's agent and PostgreSQL, $FAILOVERS runs)"
        echo
        echo "| Figure | Median | Max | Expected | Result |"
        echo "|---|---|---|---|---|"
        echo "| Fault → first acknowledged write through HAProxy | ${fmed:-none} s | ${fmax:-none} s | ≤ $REF_FIRST_WRITE_SECS s, as bench/failover.sh (a) (reference) | $fverdict |"
        echo "| Fault → a new leader \`running\` in \`list\` | ${pmed:-none} s | $(printf '%s\n' "${proms[@]}" | grep . | maximum || echo none) s | (reported) | — |"
        echo "| Fault → \`Replication: synchronous (…)\` for the new leader (etcd's \`sync\` key; PostgreSQL's synchronous_standby_names follows on the agent's next pass) | ${smed:-none} s | $(printf '%s\n' "${agains[@]}" | grep . | maximum || echo none) s | (reported) | — |"
        echo "| Slowest acknowledged write that started after the fault (a commit waiting on the new primary) | $(printf '%s\n' "${slows[@]}" | median) s | $(printf '%s\n' "${slows[@]}" | maximum) s | (reported) | — |"
        echo "| New leader is the standby listed in \`sync\` before the fault | $((FAILOVERS - wrong)) of $FAILOVERS | | every run | $([[ $wrong == 0 ]] && echo pass || echo "**$wrong wrong**") |"
        echo "| Acknowledged rows missing on the new primary | $lost_total of $acked_total acknowledged | | $TARGET_LOST | $([[ $lost_total -le $TARGET_LOST ]] && echo pass || echo "**LOST**") |"
        echo "| Stop: SIGTERM to the demo and the restarted agents | $STOP_RESULT | | everything stopped | $STOP_VERDICT |"
        echo
        echo "Per run (times from the fault):"
        echo
        echo "| Run | Primary → new leader | Listed standby before | Promoted the listed one | Leader running | \`sync\` names a standby | First write | Slowest acked write | Last failed attempt | Acked before / after | Failed after | Lost | Rows equal on all members | Healthy + sync after restart | Old primary rejoined by |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        for k in $(seq "$FAILOVERS"); do
            lost=${F_LOST[$k]}
            [[ -n ${F_IDS[$k]} ]] && lost+=": ids ${F_IDS[$k]}"
            echo "| $k | ${F_FROM[$k]} → ${F_TO[$k]} | ${F_SYNC[$k]} | ${F_OK[$k]} | ${F_PROM[$k]} s | ${F_SYNCAGAIN[$k]} s (${F_SYNCNEW[$k]}) | ${F_FIRST[$k]} s | ${F_SLOW[$k]} s | ${F_LASTF[$k]} s | ${F_ACKB[$k]} / ${F_ACKA[$k]} | ${F_FAILA[$k]} | $lost | ${F_CONS[$k]} | ${F_HEAL[$k]} s | ${F_REJOIN[$k]:-?} |"
        done
        echo
        echo "\`Replication:\` line of \`pgwarden list\` after each fault (sampled every 0.2 s, with the leader column as leader/state):"
        echo
        for k in $(seq "$FAILOVERS"); do
            echo "- run $k: ${F_TRANS[$k]//|/\\|}"
        done
    else
        echo
        echo "Stop: SIGTERM to the demo: $STOP_RESULT ($STOP_VERDICT)."
    fi
    echo
    echo "Other \`pgwarden demo\` processes on the machine at the end: $(pgrep -f 'pgwarden demo' | grep -vcx "${DEMO_PID:-0}" || true)."
}

FAILED=0
[[ $STOP_VERDICT == pass ]] || exit 1
