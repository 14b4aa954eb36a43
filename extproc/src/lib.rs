//! sandbox-extproc: the Envoy ext_proc server that routes to sandboxes with the module's rules
//! (`routing::decide`), and the ActivityService that keeps the max last-active per sandbox across
//! every Envoy replica. The binary (`src/main.rs`) is a thin CLI over [`server::serve`] and
//! [`cli::last_active`].

#![forbid(unsafe_code)]

pub mod activity;
pub mod aggregate;
pub mod auth;
pub mod cli;
pub mod metrics;
pub mod processor;
pub mod server;
