//! Status conditions, set the Kubernetes way: `lastTransitionTime` moves only when the status
//! flips, so an unchanged condition writes nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Sets (or adds) condition `type_`; returns whether anything changed.
pub fn set_condition(
    conds: &mut Vec<Condition>,
    generation: Option<i64>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) -> bool {
    let status = if status { "True" } else { "False" };
    if let Some(c) = conds.iter_mut().find(|c| c.type_ == type_) {
        let flipped = c.status != status;
        let changed = flipped
            || c.reason != reason
            || c.message != message
            || c.observed_generation != generation;
        if flipped {
            c.last_transition_time = Time(jiff::Timestamp::now());
        }
        c.status = status.into();
        c.reason = reason.into();
        c.message = message.into();
        c.observed_generation = generation;
        return changed;
    }
    conds.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(jiff::Timestamp::now()),
    });
    true
}

/// Removes condition `type_` (it stopped holding); returns whether it was there.
pub fn clear_condition(conds: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conds.len();
    conds.retain(|c| c.type_ != type_);
    conds.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_a_flip() {
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            Some(1),
            "Ready",
            false,
            "Filling",
            "0 of 3"
        ));
        let t0 = c[0].last_transition_time.clone();
        assert!(!set_condition(
            &mut c,
            Some(1),
            "Ready",
            false,
            "Filling",
            "0 of 3"
        ));
        assert!(set_condition(
            &mut c,
            Some(1),
            "Ready",
            false,
            "Filling",
            "1 of 3"
        ));
        assert_eq!(c[0].last_transition_time, t0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(set_condition(
            &mut c,
            Some(1),
            "Ready",
            true,
            "Full",
            "3 of 3"
        ));
        assert_ne!(c[0].last_transition_time, t0);
        assert!(clear_condition(&mut c, "Ready") && c.is_empty());
        assert!(!clear_condition(&mut c, "Ready"));
    }
}
