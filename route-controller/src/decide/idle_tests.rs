//! Unit tests of the idle rule: each test is a way a sandbox in use could be released early.

use super::*;

const MIN: u64 = 60_000;
const NOW: u64 = 100 * MIN;

fn answer(replica: &str, since: u64, entries: &[(&str, u64)]) -> Answer {
    Answer {
        replica: replica.into(),
        collecting_since_ms: since,
        evicted_total: 0,
        last_active: entries.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    }
}

fn clock() -> Clock {
    Clock {
        claimed_ms: NOW - 60 * MIN,
        ready_ms: Some(NOW - 60 * MIN),
        stored_last_active_ms: None,
        idle_timeout_ms: Some(10 * MIN),
        max_lifetime_ms: None,
    }
}

fn sighted(replies: Vec<(String, Reply)>) -> Sight {
    merge(&replies, &mut HashMap::new()).unwrap()
}

#[test]
fn activity_on_any_one_replica_keeps_the_sandbox() {
    let s = sighted(vec![
        (
            "a".into(),
            Reply::Answered(answer("a", 0, &[("x", NOW - 30 * MIN)])),
        ),
        (
            "b".into(),
            Reply::Answered(answer("b", 0, &[("x", NOW - MIN)])),
        ),
        ("c".into(), Reply::Answered(answer("c", 0, &[]))),
    ]);
    assert_eq!(
        judge(&clock(), "x", Some(&s), NOW),
        Verdict::Keep {
            last_active_ms: NOW - MIN
        }
    );
    assert_eq!(
        judge(&clock(), "y", Some(&s), NOW),
        Verdict::Idle {
            last_active_ms: NOW - 60 * MIN
        }
    );
}

#[test]
fn any_missing_replica_makes_the_pass_blind() {
    let ok = ("a".to_string(), Reply::Answered(answer("a", 0, &[])));
    for (bad, label) in [
        (Reply::Failed("timeout".into()), "replica_unreachable"),
        (Reply::NotReady, "replica_unreachable"),
    ] {
        let err = merge(&[ok.clone(), ("b".into(), bad)], &mut HashMap::new()).unwrap_err();
        assert_eq!(err.label(), label);
    }
    assert_eq!(
        merge(&[], &mut HashMap::new()).unwrap_err(),
        Blind::NoReplicas
    );
}

#[test]
fn a_replica_that_dropped_entries_since_the_last_pass_makes_it_blind() {
    let mut seen = HashMap::new();
    let mut a = answer("a", 0, &[]);
    assert!(merge(&[("a".into(), Reply::Answered(a.clone()))], &mut seen).is_ok());
    a.evicted_total = 3;
    let r = merge(&[("a".into(), Reply::Answered(a.clone()))], &mut seen);
    assert_eq!(r.unwrap_err().label(), "replica_evicted");
    // Nothing dropped since: sighted again.
    assert!(merge(&[("a".into(), Reply::Answered(a.clone()))], &mut seen).is_ok());
    // A replica first seen with drops on record: we cannot tell when they happened.
    let r = merge(&[("a".into(), Reply::Answered(a))], &mut HashMap::new());
    assert!(r.is_err());
}

#[test]
fn a_blind_pass_releases_nothing_for_idleness_but_still_expires() {
    assert!(matches!(
        judge(&clock(), "x", None, NOW),
        Verdict::Keep { .. }
    ));
    let c = Clock {
        max_lifetime_ms: Some(60 * MIN),
        ..clock()
    };
    assert_eq!(judge(&c, "x", None, NOW), Verdict::Expired);
    let young = Clock {
        max_lifetime_ms: Some(61 * MIN),
        ..clock()
    };
    assert!(matches!(
        judge(&young, "x", None, NOW),
        Verdict::Keep { .. }
    ));
}

#[test]
fn a_replica_collecting_for_less_than_the_timeout_cannot_prove_idleness() {
    let s = sighted(vec![
        ("a".into(), Reply::Answered(answer("a", 0, &[]))),
        // Restarted five minutes ago: it may have lost reports from before.
        ("b".into(), Reply::Answered(answer("b", NOW - 5 * MIN, &[]))),
    ]);
    assert!(matches!(
        judge(&clock(), "x", Some(&s), NOW),
        Verdict::Keep { .. }
    ));
    // Once it has collected for the whole timeout it can.
    assert!(matches!(
        judge(&clock(), "x", Some(&s), NOW - 5 * MIN + 10 * MIN),
        Verdict::Idle { .. }
    ));
}

#[test]
fn a_never_used_sandbox_counts_from_ready_and_the_stored_value_counts() {
    let s = sighted(vec![("a".into(), Reply::Answered(answer("a", 0, &[])))]);
    let fresh = Clock {
        ready_ms: Some(NOW - 5 * MIN),
        ..clock()
    };
    assert!(matches!(
        judge(&fresh, "x", Some(&s), NOW),
        Verdict::Keep { .. }
    ));
    // The replicas forgot (all restarted long ago and the gateway too), the status remembers.
    let remembered = Clock {
        stored_last_active_ms: Some(NOW - 2 * MIN),
        ..clock()
    };
    assert_eq!(
        judge(&remembered, "x", Some(&s), NOW),
        Verdict::Keep {
            last_active_ms: NOW - 2 * MIN
        }
    );
    // Exactly at the timeout is not past it.
    let edge = Clock {
        ready_ms: Some(NOW - 10 * MIN),
        ..clock()
    };
    assert!(matches!(
        judge(&edge, "x", Some(&s), NOW),
        Verdict::Keep { .. }
    ));
    // No idle timeout: never idle.
    let forever = Clock {
        idle_timeout_ms: None,
        ..clock()
    };
    assert!(matches!(
        judge(&forever, "x", Some(&s), NOW),
        Verdict::Keep { .. }
    ));
}

#[test]
fn last_active_is_stored_forward_only_and_coarsely() {
    assert!(should_store(None, NOW, Some(10 * MIN)));
    assert!(!should_store(None, 0, Some(10 * MIN)));
    assert!(
        !should_store(Some(NOW), NOW - MIN, Some(10 * MIN)),
        "never backwards"
    );
    assert!(!should_store(Some(NOW), NOW + 1_000, Some(10 * MIN)));
    assert!(should_store(Some(NOW), NOW + MIN, Some(10 * MIN)));
    assert!(
        should_store(Some(NOW), NOW + 15_000, Some(MIN)),
        "a quarter of a short timeout"
    );
}
