//! The Envoy 1.40 dynamic-module binding, which knows nothing of what the filter does:
//! - `abi`: the raw C declarations;
//! - `filter`: the traits a module implements (`HttpFilterConfig`, `HttpFilter`) and the ones it
//!   is handed (`Stream`, `ConfigEnvoy`), so filter logic is unit-tested against fakes;
//! - `envoy`: those traits over the real ABI;
//! - `hooks`: the exported hooks, generic over the config type, behind `export_http_filter!`.
//!
//! All `unsafe` code of the crate is in this module (the crate root denies it elsewhere).

pub(crate) mod abi;
mod envoy;
mod filter;
pub(crate) mod hooks;

pub use filter::{
    Commit, ConfigEnvoy, Header, HeaderMap, HeadersStatus, HttpFilter, HttpFilterConfig,
    MetricError, MetricId, Stream,
};
pub use hooks::{panics, reentries};
