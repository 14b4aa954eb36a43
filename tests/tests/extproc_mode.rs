//! End-to-end in ext_proc mode: the real Envoy 1.40 with its ext_proc filter talking to the real
//! sandbox-extproc binary. The routing/error/security cases are the ones filter mode runs
//! (`sandbox_gateway_tests::cases`), unchanged.

use sandbox_gateway_tests::cases::{self, GatewayUnderTest};
use sandbox_gateway_tests::extproc::ExtProcGateway;
use sandbox_gateway_tests::gateway::RouteEntry;
use serde_json::Value;

fn extproc_mode(
    routes: &[RouteEntry],
    overrides: Value,
) -> anyhow::Result<Box<dyn GatewayUnderTest>> {
    Ok(Box::new(ExtProcGateway::start(routes, overrides)?))
}

macro_rules! case {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if let Err(e) = cases::$name(&extproc_mode).await {
                panic!("{e:#}");
            }
        }
    };
}

case!(header_host_and_path_routing);
case!(local_replies_are_json);
case!(client_cannot_choose_the_upstream);
case!(websocket_through_the_gateway);
case!(sse_streams_without_buffering);
case!(routes_hot_reload);
case!(miss_hold_waits_for_a_late_route);
case!(hostile_input_gets_400);
