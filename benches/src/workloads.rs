//! What traffic each run sends. A workload is protocol + connection pattern + which sandbox IDs.

use crate::cli::Args;
use serde::Serialize;

/// How a run picks the sandbox ID of each request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdSpread {
    /// Always the first ID.
    One,
    /// Uniform over the first `n` IDs: the worst case for any cache in the route lookup.
    Uniform(usize),
    /// Zipf over the first `n` IDs (rank 1 most frequent): a few hot sandboxes, a long tail,
    /// which is what real agent traffic looks like.
    Zipf(usize),
}

impl IdSpread {
    pub fn max_ids(self) -> usize {
        match self {
            IdSpread::One => 1,
            IdSpread::Uniform(n) | IdSpread::Zipf(n) => n,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Small GET on keep-alive connections: the per-request cost of the gateway.
    Get,
    /// A new TCP connection per GET: adds accept/connect and per-connection filter setup.
    NewConn,
    /// POST with a body on keep-alive connections: the module must not slow body streaming.
    Post,
    /// Message round trips on open WebSocket connections: the per-message cost after upgrade.
    WebSocket,
    /// Whole server-sent-event streams (open, N events, end).
    Sse,
}

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub name: String,
    pub kind: Kind,
    pub spread: IdSpread,
    /// Concurrent connections (or streams).
    pub connections: usize,
    /// What one "op" is, for the report: request, round trip, stream.
    pub unit: &'static str,
}

impl Workload {
    fn new(name: impl Into<String>, kind: Kind, spread: IdSpread, connections: usize) -> Self {
        let unit = match kind {
            Kind::WebSocket => "round trip",
            Kind::Sse => "stream",
            _ => "request",
        };
        Workload {
            name: name.into(),
            kind,
            spread,
            connections: connections.max(1),
            unit,
        }
    }
}

/// The workloads of a run, in report order, filtered by `--workloads`.
pub fn all(args: &Args) -> Vec<Workload> {
    let mut list = vec![
        Workload::new("get", Kind::Get, IdSpread::One, args.connections),
        Workload::new(
            "newconn",
            Kind::NewConn,
            IdSpread::One,
            args.newconn_connections,
        ),
        Workload::new(
            format!("post{}k", args.post_bytes / 1024),
            Kind::Post,
            IdSpread::One,
            args.connections,
        ),
        Workload::new("ws", Kind::WebSocket, IdSpread::One, args.ws_connections),
        Workload::new("sse", Kind::Sse, IdSpread::One, args.sse_streams),
    ];
    for &n in args.id_counts.iter().filter(|&&n| n > 1) {
        let label = if n % 1000 == 0 {
            format!("{}k", n / 1000)
        } else {
            n.to_string()
        };
        list.push(Workload::new(
            format!("ids{label}-uniform"),
            Kind::Get,
            IdSpread::Uniform(n),
            args.connections,
        ));
        list.push(Workload::new(
            format!("ids{label}-zipf"),
            Kind::Get,
            IdSpread::Zipf(n),
            args.connections,
        ));
    }
    if !args.workloads.is_empty() {
        list.retain(|w| args.workloads.iter().any(|n| n == &w.name));
    }
    list
}

/// The sandbox ID for index `i`: a valid DNS label, distinct per index.
pub fn sandbox_id(i: usize) -> String {
    format!("sb-{i:06}")
}
