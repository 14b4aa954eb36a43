//! Unit tests of the pool plan: counts, expectations under lag, failures, rollout, scale-down.

use super::*;

const NOW: u64 = 1_000_000;
const STARTUP: u64 = 60_000;

fn pod(name: &str) -> PodInfo {
    PodInfo {
        name: name.into(),
        uid: format!("uid-{name}"),
        resource_version: "1".into(),
        created_ms: NOW - 10_000,
        ready_since_ms: Some(NOW - 5_000),
        terminated: false,
        deleting: false,
        claimed: false,
        current: true,
    }
}

fn starting(name: &str) -> PodInfo {
    PodInfo {
        ready_since_ms: None,
        ..pod(name)
    }
}

fn names(plan: &PoolPlan) -> Vec<(&str, DeleteReason)> {
    plan.delete
        .iter()
        .map(|(n, _, _, r)| (n.as_str(), *r))
        .collect()
}

#[test]
fn an_empty_pool_creates_its_replicas_within_budget() {
    let p = plan(3, &[], &Expectations::default(), NOW, STARTUP, 100);
    assert_eq!(p.create, 3);
    let p = plan(3, &[], &Expectations::default(), NOW, STARTUP, 2);
    assert_eq!(p.create, 2, "the budget caps a pass");
}

#[test]
fn claimed_pods_do_not_count_and_are_never_deleted() {
    let mut pods: Vec<_> = (0..5).map(|i| pod(&format!("c{i}"))).collect();
    for p in &mut pods {
        p.claimed = true;
        p.current = false;
    }
    let p = plan(0, &pods, &Expectations::default(), NOW, STARTUP, 100);
    assert!(p.delete.is_empty(), "{:?}", p.delete);
    assert_eq!(p.counts.claimed, 5);
    let p = plan(2, &pods, &Expectations::default(), NOW, STARTUP, 100);
    assert_eq!(p.create, 2, "claimed pods are not warm supply");
}

#[test]
fn pods_created_but_not_yet_seen_are_supply_until_their_deadline() {
    // Watch lag: three creates returned, the cache shows none of them yet.
    let mut exp = Expectations::default();
    for i in 0..3 {
        exp.expect_create(format!("new-{i}"), NOW + 30_000);
    }
    assert_eq!(exp.observe(&[], NOW), 0);
    for _ in 0..100 {
        assert_eq!(plan(3, &[], &exp, NOW, STARTUP, 100).create, 0);
    }
    // One shows up (ready or not): still nothing to create.
    let seen = PodInfo {
        uid: "new-0".into(),
        ..starting("a")
    };
    exp.observe(std::slice::from_ref(&seen), NOW);
    assert_eq!(exp.pending_creates(), 2);
    assert_eq!(
        plan(3, std::slice::from_ref(&seen), &exp, NOW, STARTUP, 100).create,
        0
    );
    // The other two never arrive: after the deadline they are assumed lost.
    assert_eq!(exp.observe(std::slice::from_ref(&seen), NOW + 30_001), 2);
    assert_eq!(plan(3, &[seen], &exp, NOW + 30_001, STARTUP, 100).create, 2);
}

#[test]
fn pods_deleted_but_still_seen_are_not_supply_nor_deleted_twice() {
    let pods = vec![pod("a"), pod("b"), pod("c")];
    let mut exp = Expectations::default();
    exp.expect_delete("uid-a".into(), NOW + 30_000);
    exp.observe(&pods, NOW);
    let p = plan(3, &pods, &exp, NOW, STARTUP, 100);
    assert_eq!(p.create, 1, "a is going away");
    assert!(p.delete.is_empty());
    // The cache shows a terminating: the expectation is settled.
    let mut later = pods.clone();
    later[0].deleting = true;
    exp.observe(&later, NOW);
    assert!(exp.is_empty());
}

#[test]
fn failed_and_late_pods_are_replaced() {
    let mut dead = pod("dead");
    dead.terminated = true;
    let mut late = starting("late");
    late.created_ms = NOW - STARTUP - 1;
    let young = starting("young");
    let pods = vec![dead, late, young, pod("ok")];
    let p = plan(3, &pods, &Expectations::default(), NOW, STARTUP, 100);
    assert_eq!(
        names(&p),
        vec![
            ("dead", DeleteReason::Failed),
            ("late", DeleteReason::Failed)
        ]
    );
    assert_eq!(p.counts.failed, 2);
    assert_eq!((p.counts.warm, p.counts.starting), (1, 1));
    assert_eq!(p.create, 1);
}

#[test]
fn scale_down_deletes_starting_pods_first_then_the_newest_warm() {
    let mut old = pod("old");
    old.ready_since_ms = Some(NOW - 50_000);
    let mut newer = pod("newer");
    newer.ready_since_ms = Some(NOW - 1_000);
    let pods = vec![old, newer, starting("s")];
    let p = plan(1, &pods, &Expectations::default(), NOW, STARTUP, 100);
    assert_eq!(
        names(&p),
        vec![
            ("s", DeleteReason::ScaleDown),
            ("newer", DeleteReason::ScaleDown)
        ]
    );
    assert_eq!(p.create, 0);
}

#[test]
fn a_template_change_replaces_warm_pods_without_emptying_the_pool() {
    let mut pods: Vec<_> = (0..3).map(|i| pod(&format!("old{i}"))).collect();
    for p in &mut pods {
        p.current = false;
    }
    let p = plan(3, &pods, &Expectations::default(), NOW, STARTUP, 100);
    assert_eq!(p.create, 3, "new pods first");
    assert!(
        p.delete.is_empty(),
        "no old pod goes before a new one is warm"
    );
    // One new pod is warm: exactly one old one may go.
    pods.push(pod("new0"));
    let p = plan(3, &pods, &Expectations::default(), NOW, STARTUP, 100);
    assert_eq!(names(&p), vec![("old0", DeleteReason::Outdated)]);
    assert_eq!(p.counts.outdated, 3);
    // An outdated pod that is not Ready yet goes at once.
    let mut pods = vec![starting("olds")];
    pods[0].current = false;
    let p = plan(1, &pods, &Expectations::default(), NOW, STARTUP, 100);
    assert_eq!(names(&p), vec![("olds", DeleteReason::Outdated)]);
    assert_eq!(p.create, 1);
}

#[test]
fn the_budget_refills_at_its_rate() {
    let mut b = CreateBudget::new(10.0, 5, 0);
    assert_eq!(b.available(0), 5);
    b.spend(5);
    assert_eq!(b.available(0), 0);
    assert_eq!(b.ms_until_next(), 100);
    assert_eq!(b.available(250), 2);
    assert_eq!(b.available(10_000), 5, "never above the burst");
}
