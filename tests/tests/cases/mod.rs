//! End-to-end cases for the request-path rules, written once against the harness's
//! `GatewayUnderTest` so every deployment mode (module, ext_proc) runs the same cases through a
//! real Envoy. A mode's test file includes this module (`mod cases;`) and invokes
//! [`shared_cases!`] once. Single requests (routing, errors, security) are in `requests`; long
//! streams and route changes in `streams`; what the upstream is told (prefix, Host) in
//! `forwarding`; the helpers they use are here.

mod forwarding;
mod load;
mod protocols;
mod requests;
mod streams;

pub use forwarding::*;
pub use load::*;
pub use protocols::*;
pub use requests::*;
pub use streams::*;

use anyhow::{ensure, Result};
use sandbox_gateway_harness::client::Response;
use sandbox_gateway_harness::gateway::{GatewayUnderTest, RouteEntry};
use sandbox_gateway_harness::sandbox::SandboxServer;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Defines one `#[tokio::test]` per shared case, each starting its gateway with `$starter`
/// (a `fn(&[RouteEntry], Value) -> Result<Box<dyn GatewayUnderTest>>`). Every mode's test file
/// invokes this once, so a new case runs in every mode.
macro_rules! shared_cases {
    ($starter:path) => {
        $crate::cases::shared_cases!(@each $starter;
            header_host_and_path_routing,
            local_replies_are_json,
            readiness_probe_names_no_sandbox,
            client_cannot_choose_the_upstream,
            websocket_through_the_gateway,
            sse_streams_without_buffering,
            routes_hot_reload,
            miss_hold_waits_for_a_late_route,
            hostile_input_gets_400,
            open_websocket_survives_route_removal,
            e2b_preset_leaves_envds_token_alone,
            grpc_through_the_gateway,
            http2_client_reaches_an_http1_sandbox,
            upstream_failures_are_json,
            hung_sandbox_cannot_starve_a_healthy_one,
            more_websockets_than_envoys_defaults,
            junk_flood_cannot_take_the_hold_from_a_new_claim,
            silent_connections_close_but_idle_websockets_stay,
            url_building_server_behind_the_path_prefix,
            keep_path_mode_forwards_the_path_unchanged,
            host_pinned_server_with_upstream_host,
            mcp_server_over_sse_through_the_gateway,
        );
    };
    (@each $starter:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if let Err(e) = $crate::cases::$name(&$starter).await {
                    panic!("{e:#}");
                }
            }
        )*
    };
}
pub(crate) use shared_cases;

/// Starts a gateway of the mode under test with these routes and config overrides.
pub type Starter = dyn Fn(&[RouteEntry], Value) -> Result<Box<dyn GatewayUnderTest>> + Sync;

/// sha256("secret")
pub const SECRET_SHA256: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

async fn sandboxes(names: &[&str]) -> Result<Vec<SandboxServer>> {
    let mut v = Vec::new();
    for n in names {
        v.push(SandboxServer::start(n, "127.0.0.1:0".parse()?).await?);
    }
    Ok(v)
}

/// Which sandbox answered (the echo body names it).
fn served_by(r: &Response) -> String {
    r.json()["sandbox"].as_str().unwrap_or("").to_string()
}

fn expect_error(r: &Response, status: u16, code: &str) -> Result<()> {
    ensure!(
        r.status == status,
        "want {status} {code}, got {} {}",
        r.status,
        r.text()
    );
    ensure!(
        r.header("content-type") == Some("application/json"),
        "local reply must be JSON: {:?}",
        r.headers
    );
    let v = r.json();
    ensure!(v["error"] == code, "want error {code}, got {v}");
    ensure!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message missing: {v}"
    );
    Ok(())
}

/// Retries `f` until it returns Ok (route changes propagate asynchronously).
async fn eventually<F, Fut>(what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: gave up")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
