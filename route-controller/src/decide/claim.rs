//! Which warm pod a claim takes. The order is a preference only: the claim itself is a patch
//! fenced by the pod's resourceVersion, so a stale cache can lose a race (409: take the next
//! candidate) but never bind one pod twice.

use std::collections::HashSet;

use super::pool::PodInfo;

/// Warm pods a claim may take, best first: current template before outdated (an outdated pod is
/// about to be replaced), then the longest Ready. Pods `reserved` by a claim in flight in this
/// process, or expected to be deleted, are left out.
pub fn candidates<'a>(
    pods: &'a [PodInfo],
    reserved: &HashSet<String>,
    pending_delete: impl Fn(&str) -> bool,
) -> Vec<&'a PodInfo> {
    let mut c: Vec<&PodInfo> = pods
        .iter()
        .filter(|p| p.is_warm() && !reserved.contains(&p.uid) && !pending_delete(&p.uid))
        .collect();
    c.sort_by_key(|p| (!p.current, p.ready_since_ms, p.name.clone()));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: Option<u64>) -> PodInfo {
        PodInfo {
            name: name.into(),
            uid: name.into(),
            resource_version: "1".into(),
            created_ms: 0,
            ready_since_ms: ready,
            terminated: false,
            deleting: false,
            claimed: false,
            current: true,
        }
    }

    #[test]
    fn only_warm_unreserved_pods_longest_ready_first() {
        let mut claimed = pod("claimed", Some(1));
        claimed.claimed = true;
        let mut deleting = pod("deleting", Some(1));
        deleting.deleting = true;
        let mut dead = pod("dead", Some(1));
        dead.terminated = true;
        let mut outdated = pod("outdated", Some(2));
        outdated.current = false;
        let pods = vec![
            pod("young", Some(50)),
            pod("old", Some(10)),
            pod("starting", None),
            claimed,
            deleting,
            dead,
            outdated,
            pod("reserved", Some(5)),
            pod("going", Some(5)),
        ];
        let reserved: HashSet<String> = ["reserved".to_string()].into();
        let got: Vec<_> = candidates(&pods, &reserved, |uid| uid == "going")
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(got, vec!["old", "young", "outdated"]);
    }
}
