//! Synchronous mode, the leader's side of rule 4: which standbys every
//! commit waits for (`synchronous_standby_names`, "P" below) and which the
//! `sync` key lets take over after a failure ("K").
//!
//! The claim `sync` makes: every listed standby has every commit the named
//! leader acknowledged. It stays true because
//! - P always contains K, before and after every write (a removal leaves
//!   the key before it leaves P; P is rendered `FIRST n (…)` with n = its
//!   size, so every member of P acknowledges every commit);
//! - a standby enters K only once P containing it is applied *and* it has
//!   flushed past the primary's WAL position at the first observation
//!   that showed it applied (everything acknowledged before that lies
//!   behind that position; everything after waited for it).

use super::view::{Action, Decision, LocalView, PgRunning};
use crate::dcs::ClusterView;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

/// What the leader does this pass about synchronous replication.
pub(super) fn manage_sync(
    cluster: &ClusterView,
    local: &LocalView,
    pg: &PgRunning,
    d: &mut Decision,
) {
    let cfg = &cluster.config;
    let me = local.name.as_str();
    if !cfg.synchronous_mode {
        // An old list would restrict elections if the mode came back on.
        if cluster
            .sync
            .as_ref()
            .is_some_and(|s| !s.sync_standby.is_empty())
        {
            d.push(
                Action::WriteSync(Vec::new()),
                "synchronous_mode is off: clearing the synchronous standbys in etcd",
            );
        }
        return;
    }
    let strict = cfg.synchronous_mode_strict;
    let key_ours = cluster.sync.as_ref().is_some_and(|s| s.leader == me);
    let listed: Vec<String> = cluster
        .sync
        .as_ref()
        .map(|s| {
            s.sync_standby
                .iter()
                .filter(|n| *n != me)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    if !key_ours && !listed.is_empty() {
        // A new leader takes the key over before it acknowledges anything
        // (P names nobody until then): the old leader's other standbys
        // have every commit it acknowledged, and with P covering them
        // they will have ours.
        push_key(d, listed);
        set_names(pg, NOBODY.into(), d);
        return;
    }
    let k_cur: Vec<String> = if key_ours { listed } else { Vec::new() };
    let applied = parse_standby_names(&pg.synchronous_standby_names);
    let wanted = choose(cluster, me, pg, &k_cur, applied.as_ref());
    if k_cur.is_empty() && (strict || !key_ours) {
        without_listed_standby(local, key_ours, strict, pg, &wanted, d);
        return;
    }
    let caught_up = |name: &String| {
        let since = local.sync_applied_at.get(name);
        let flushed = pg
            .replication
            .iter()
            .find(|r| &r.name == name)
            .and_then(|r| r.flush_lsn);
        applied.as_ref().is_some_and(|p| p.contains(name))
            && matches!((since, flushed), (Some(s), Some(f)) if f >= *s)
    };
    #[cfg(test)]
    let uncaught = local.mutation == Some(super::Mutation::SyncPublishUncaught);
    #[cfg(not(test))]
    let uncaught = false;
    let k_next: Vec<String> = wanted
        .iter()
        .filter(|n| uncaught || k_cur.contains(n) || caught_up(n))
        .cloned()
        .collect();
    let write = if same_set(&k_next, &k_cur) {
        None
    } else if !k_next.is_empty() {
        Some(k_next)
    } else if strict || !wanted.is_empty() {
        // Strict: never unprotected, the key stays and commits wait for
        // its standbys. A candidate is there: commits wait until it has
        // caught up and replaces the key's standbys, rather than run
        // unprotected meanwhile.
        None
    } else {
        Some(Vec::new())
    };
    // P covers the key in force before the write (it may fail) and after.
    let mut p_next: Vec<String> = wanted.clone();
    for n in k_cur.iter().chain(write.iter().flatten()) {
        if !p_next.contains(n) {
            p_next.push(n.clone());
        }
    }
    if let Some(list) = write {
        push_key(d, list);
    }
    set_names(pg, render_standby_names(&p_next, strict), d);
}

fn push_key(d: &mut Decision, list: Vec<String>) {
    if list.is_empty() {
        d.push(
            Action::WriteSync(list),
            "synchronous_mode: no synchronous standby is available: falling back to asynchronous replication (commits are not protected until one returns)",
        );
    } else {
        let names = list.join(", ");
        d.push(
            Action::WriteSync(list),
            format!("synchronous_mode: publishing the synchronous standbys in etcd: {names}"),
        );
    }
}

fn set_names(pg: &PgRunning, value: String, d: &mut Decision) {
    if pg.synchronous_standby_names != value {
        d.push(
            Action::SetSyncStandbys(value.clone()),
            format!("synchronous_mode: synchronous_standby_names = '{value}'"),
        );
    }
}

/// No standby in the key protects our commits yet (strict mode, or a new
/// leader): nothing may be acknowledged that no listed standby has, so P
/// names nobody (`NOBODY`) until the key names one; a standby is named once
/// it has flushed everything this primary wrote (with nothing acknowledged
/// meanwhile, that is every commit it must have). P follows on the next
/// pass, after the key. Not strict and no candidate at all: fall back to
/// asynchronous commits, said in the key.
fn without_listed_standby(
    #[cfg_attr(not(test), allow(unused_variables))] local: &LocalView,
    key_ours: bool,
    strict: bool,
    pg: &PgRunning,
    wanted: &[String],
    d: &mut Decision,
) {
    if !strict && wanted.is_empty() {
        if !key_ours {
            push_key(d, Vec::new());
        }
        set_names(pg, String::new(), d);
        return;
    }
    if pg.synchronous_standby_names != NOBODY {
        set_names(pg, NOBODY.into(), d);
        return;
    }
    #[cfg(test)]
    let uncaught = local.mutation == Some(super::Mutation::SyncPublishUncaught);
    #[cfg(not(test))]
    let uncaught = false;
    let ready: Vec<String> = wanted
        .iter()
        .filter(|n| {
            uncaught || {
                pg.replication.iter().any(|r| {
                    &r.name == *n
                        && matches!((r.flush_lsn, pg.wal_lsn), (Some(f), Some(w)) if f >= w)
                })
            }
        })
        .cloned()
        .collect();
    if !ready.is_empty() {
        push_key(d, ready);
    }
}

/// A standby name no member has, so every commit waits: strict mode's
/// synchronous_standby_names while no standby is listed, and what
/// pgwarden.conf sets before the leader names standbys, so that a freshly
/// promoted primary acknowledges nothing before its first pass (`*` would
/// let any standby, listed or not, acknowledge).
pub const NOBODY: &str = "FIRST 1 (\"pgwarden: no synchronous standby\")";

/// Up to synchronous_node_count healthy standbys: streaming from us, not
/// tagged nosync or nofailover (a standby that may not be promoted
/// protects nothing). Sticky: those in the key, then those already in P,
/// then the furthest ahead.
fn choose(
    cluster: &ClusterView,
    me: &str,
    pg: &PgRunning,
    key: &[String],
    applied: Option<&BTreeSet<String>>,
) -> Vec<String> {
    let mut healthy: Vec<(u8, std::cmp::Reverse<u64>, String)> = pg
        .replication
        .iter()
        .filter(|r| r.streaming && r.name != me)
        .filter(|r| {
            cluster
                .member(&r.name)
                .is_some_and(|m| !m.tags.nosync && !m.tags.nofailover)
        })
        .map(|r| {
            let rank = if key.contains(&r.name) {
                0
            } else if applied.is_some_and(|p| p.contains(&r.name)) {
                1
            } else {
                2
            };
            (
                rank,
                std::cmp::Reverse(r.flush_lsn.unwrap_or(0)),
                r.name.clone(),
            )
        })
        .collect();
    healthy.sort();
    healthy.dedup_by(|a, b| a.2 == b.2);
    healthy
        .into_iter()
        .take(cluster.config.synchronous_node_count as usize)
        .map(|(_, _, n)| n)
        .collect()
}

fn same_set(a: &[String], b: &[String]) -> bool {
    a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
}

/// `FIRST n ("a", "b")` with n the number of names, so every one of them
/// acknowledges every commit; with none, `NOBODY` in strict mode (commits
/// wait) and empty otherwise (asynchronous).
pub fn render_standby_names(names: &[String], strict: bool) -> String {
    if names.is_empty() {
        return if strict { NOBODY.into() } else { String::new() };
    }
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
        .collect();
    format!("FIRST {} ({})", names.len(), quoted.join(", "))
}

/// The standbys every commit waits for under a value pgwarden rendered;
/// `*` and empty: none by name. None: a value pgwarden did not write (or a
/// quorum `ANY`): nothing is known to be applied.
pub fn parse_standby_names(value: &str) -> Option<BTreeSet<String>> {
    let v = value.trim();
    if v.is_empty() || v == "*" || v == NOBODY {
        return Some(BTreeSet::new());
    }
    let rest = v.strip_prefix("FIRST ")?;
    let (count, rest) = rest.split_once(' ')?;
    let count: usize = count.parse().ok()?;
    let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    let mut names = BTreeSet::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut name = String::new();
        loop {
            match chars.next()? {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    name.push('"');
                }
                '"' => break,
                c => name.push(c),
            }
        }
        names.insert(name);
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => break,
            Some(',') => continue,
            Some(_) => return None,
        }
    }
    (count == names.len()).then_some(names)
}

/// The core's bookkeeping for `caught_up`: per standby in the applied
/// `synchronous_standby_names`, the primary's WAL position at the second
/// observation that showed it there. Not the first: a reload reaches the
/// WAL senders a moment after the probe's own session, and a commit
/// acknowledged in between may lie past the first position. Until then
/// `NOT_YET` (never caught up). Cleared when we are not a primary.
pub(super) fn track_applied(map: &mut BTreeMap<String, u64>, pg: Option<&PgRunning>) {
    let Some(pg) = pg.filter(|p| !p.in_recovery) else {
        map.clear();
        return;
    };
    let Some(applied) = parse_standby_names(&pg.synchronous_standby_names) else {
        map.clear();
        return;
    };
    map.retain(|n, _| applied.contains(n));
    let lsn = pg.wal_lsn.unwrap_or(NOT_YET);
    for n in applied {
        match map.entry(n) {
            Entry::Vacant(v) => {
                v.insert(NOT_YET);
            }
            Entry::Occupied(mut o) if *o.get() == NOT_YET => {
                o.insert(lsn);
            }
            Entry::Occupied(_) => {}
        }
    }
}

/// Above any WAL position: a standby is not caught up to it.
const NOT_YET: u64 = u64::MAX - 1;

/// How the leader's commits are protected, in words for `/status`,
/// `list` and `/metrics` (`pgwarden_synchronous_fallback`).
pub fn replication_mode(cluster: &ClusterView) -> ReplicationMode {
    let cfg = &cluster.config;
    if !cfg.synchronous_mode {
        return ReplicationMode::Asynchronous;
    }
    let current = |s: &crate::dcs::SyncState| match cluster.leader.as_deref() {
        Some(l) => l == s.leader,
        // No leader now: the last one's list says who may take over.
        None => true,
    };
    match cluster.sync.as_ref().filter(|s| current(s)) {
        None => ReplicationMode::NotNamedYet,
        Some(s) if !s.sync_standby.is_empty() => {
            ReplicationMode::Synchronous(s.sync_standby.clone())
        }
        Some(_) if cfg.synchronous_mode_strict => ReplicationMode::StrictWaiting,
        Some(_) => ReplicationMode::Fallback,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMode {
    Asynchronous,
    Synchronous(Vec<String>),
    /// Strict mode with no synchronous standby: commits wait.
    StrictWaiting,
    /// Non-strict mode with no synchronous standby: commits run unprotected.
    Fallback,
    /// A leader that has not written `sync` yet (just promoted, say): its
    /// PostgreSQL acknowledges nothing until it has.
    NotNamedYet,
}

impl std::fmt::Display for ReplicationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicationMode::Asynchronous => write!(f, "asynchronous"),
            ReplicationMode::Synchronous(l) => write!(f, "synchronous ({})", l.join(", ")),
            ReplicationMode::StrictWaiting => write!(
                f,
                "synchronous (strict): no synchronous standby, commits wait"
            ),
            ReplicationMode::Fallback => write!(
                f,
                "asynchronous fallback: no synchronous standby, commits are not protected"
            ),
            ReplicationMode::NotNamedYet => write!(
                f,
                "synchronous: the leader has not named its standbys yet, commits wait"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_names_round_trip() {
        let names = vec!["m2".to_string(), "we\"ird name".to_string()];
        let v = render_standby_names(&names, false);
        assert_eq!(v, "FIRST 2 (\"m2\", \"we\"\"ird name\")");
        assert_eq!(parse_standby_names(&v), Some(names.into_iter().collect()));
        assert_eq!(render_standby_names(&[], true), NOBODY);
        assert_eq!(parse_standby_names(NOBODY), Some(BTreeSet::new()));
        assert_eq!(render_standby_names(&[], false), "");
        assert_eq!(parse_standby_names("*"), Some(BTreeSet::new()));
        assert_eq!(parse_standby_names(""), Some(BTreeSet::new()));
        // Not ours: nothing is known to be applied.
        assert_eq!(parse_standby_names("ANY 1 (a, b)"), None);
        assert_eq!(parse_standby_names("FIRST 1 (\"a\", \"b\")"), None);
        assert_eq!(parse_standby_names("m2"), None);
        assert_eq!(parse_standby_names("FIRST 1 (\"a\""), None);
    }
}
