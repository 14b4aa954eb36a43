//! Bearer-token check for the ActivityService (`--activity-token-file`). Its answers decide which
//! sandboxes a controller releases, and its Report stream writes them, so with a token set no
//! call is served or recorded without it. Checked at the top of each RPC, not in a tonic
//! interceptor, so the failure is counted per RPC (an interceptor does not see the method) and a
//! refused Report has read nothing from its stream.

use crate::metrics::Metrics;
use routing::bearer::{BearerToken, AUTHORIZATION};
use tonic::{Request, Status};

/// Why a call was refused (logged; the client only learns "unauthenticated").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Wrong,
}

/// Whether `req` carries `token` (None: no token configured, everything passes).
pub fn check<T>(token: Option<&BearerToken>, req: &Request<T>) -> Result<(), Refusal> {
    let Some(token) = token else { return Ok(()) };
    match req.metadata().get(AUTHORIZATION) {
        None => Err(Refusal::Missing),
        Some(v) if token.accepts(v.as_bytes()) => Ok(()),
        Some(_) => Err(Refusal::Wrong),
    }
}

/// [`check`], with a refusal counted in `activity_auth_failures_total{rpc}`, logged with the
/// peer, and turned into UNAUTHENTICATED.
pub fn authorize<T>(
    token: Option<&BearerToken>,
    metrics: &Metrics,
    rpc: &'static str,
    req: &Request<T>,
) -> Result<(), Status> {
    let Err(why) = check(token, req) else {
        return Ok(());
    };
    metrics.auth_failures.with_label_values(&[rpc]).inc();
    tracing::warn!(rpc, reason = ?why, peer = ?req.remote_addr(), "ActivityService call refused");
    Err(Status::unauthenticated(match why {
        Refusal::Missing => "ActivityService requires `authorization: Bearer <token>` metadata",
        Refusal::Wrong => "ActivityService: wrong bearer token",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert(AUTHORIZATION, a.parse().unwrap());
        }
        r
    }

    #[test]
    fn missing_wrong_and_right() {
        let t = BearerToken::new("tok").unwrap();
        assert_eq!(check(Some(&t), &req(None)), Err(Refusal::Missing));
        assert_eq!(
            check(Some(&t), &req(Some("Bearer nope"))),
            Err(Refusal::Wrong)
        );
        assert_eq!(check(Some(&t), &req(Some("tok"))), Err(Refusal::Wrong));
        assert_eq!(check(Some(&t), &req(Some("Bearer tok"))), Ok(()));
        // No token configured: unchanged behaviour.
        assert_eq!(check(None, &req(None)), Ok(()));
    }

    #[test]
    fn refusals_are_counted_per_rpc() {
        let m = Metrics::new().unwrap();
        let t = BearerToken::new("tok").unwrap();
        let s = authorize(Some(&t), &m, "Report", &req(None)).unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(authorize(Some(&t), &m, "Report", &req(Some("Bearer tok"))).is_ok());
        assert_eq!(m.auth_failures.with_label_values(&["Report"]).get(), 1);
        assert_eq!(
            m.auth_failures.with_label_values(&["GetLastActive"]).get(),
            0
        );
    }
}
