//! Sandbox routing core, shared by the Envoy module (`filter/`) and `sandbox-extproc`.
//!
//! Pure Rust with no Envoy types: key extraction from a request, the route table, route sources,
//! access tokens and last-active tracking. Everything on the per-request path is allocation-free.

#![forbid(unsafe_code)]

pub mod activity;
pub mod bearer;
pub mod config;
pub mod contract;
pub mod decide;
pub mod file_source;
pub mod holds;
pub mod key;
pub mod kube_source;
pub mod paused;
pub mod pod_index;
pub mod reply;
pub mod route_pod;
pub mod source;
pub mod stats;
pub mod table;
pub mod token;
pub mod wake;

pub use config::{ConfigError, GatewayConfig};
pub use key::{extract, KeyConfig, KeyError, KeySource, RequestView, SandboxKey};
pub use table::{Route, RouteSpec, RouteTable, TargetBuf};
