//! Cost of `GetLastActive` with many sandboxes: a timed run, not a test.
//!
//! `cargo bench -p sandbox-gateway-bench --bench last_active [-- <sandboxes> <rounds>]`
//!
//! Fills one ActivityService with N sandboxes through the real Report stream (loopback gRPC),
//! then times GetLastActive for all of them and for 100 IDs, over gRPC and in-process.

#![deny(unsafe_code)]

use anyhow::Result;
use clap::Parser;
use proto::v1::activity_service_client::ActivityServiceClient;
use proto::v1::activity_service_server::ActivityServiceServer;
use proto::v1::{GetLastActiveRequest, ReportRequest, SandboxActivity};
use sandbox_extproc::activity::{Activity, ActivitySvc};
use sandbox_extproc::aggregate::Aggregator;
use sandbox_extproc::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// GetLastActive over many sandboxes: gRPC (all of them, 100 IDs) and in-process.
#[derive(Parser, Debug)]
#[command(name = "last_active")]
struct Args {
    /// Sandboxes reported into the ActivityService.
    #[arg(default_value_t = 100_000)]
    sandboxes: usize,
    /// Timed rounds of each query.
    #[arg(default_value_t = 20)]
    rounds: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<44} p50 {:>9.3} ms   p90 {:>9.3} ms   max {:>9.3} ms   (n={})",
        p(0.5).as_secs_f64() * 1e3,
        p(0.9).as_secs_f64() * 1e3,
        p(1.0).as_secs_f64() * 1e3,
        v.len()
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (n, rounds) = (args.sandboxes, args.rounds);

    let activity = Arc::new(Activity::new(
        Aggregator::new(n * 2, Duration::from_secs(3600)),
        Arc::new(routing::RouteTable::new()),
        Metrics::new()?,
        "bench".into(),
    ));
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ActivityServiceServer::new(ActivitySvc {
                activity: Arc::clone(&activity),
                shutdown: stop_rx,
                // Unauthenticated: the bench measures the aggregate and the encoding.
                token: None,
            }))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    let mut client = ActivityServiceClient::connect(format!("http://{addr}"))
        .await?
        .max_decoding_message_size(256 << 20);

    // Fill through the real Report path, 10k entries per batch.
    let base = 1_790_000_000_000u64;
    let ids: Vec<String> = (0..n).map(|i| format!("sandbox-{i:07}")).collect();
    let batches: Vec<ReportRequest> = ids
        .chunks(10_000)
        .enumerate()
        .map(|(b, chunk)| ReportRequest {
            reporter: "bench".into(),
            full_snapshot: b == 0,
            entries: chunk
                .iter()
                .enumerate()
                .map(|(i, id)| SandboxActivity {
                    sandbox_id: id.clone(),
                    last_active_ms: base + (b * 10_000 + i) as u64,
                })
                .collect(),
        })
        .collect();
    let t = Instant::now();
    let resp = client
        .report(tokio_stream::iter(batches))
        .await?
        .into_inner();
    println!(
        "filled {} sandboxes via Report in {:.1} ms ({} batches)",
        resp.entries,
        t.elapsed().as_secs_f64() * 1e3,
        resp.batches
    );

    let some: Vec<String> = ids.iter().step_by((n / 100).max(1)).cloned().collect();
    let (mut all_grpc, mut some_grpc, mut all_local) = (vec![], vec![], vec![]);
    let mut bytes = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        let r = client
            .get_last_active(GetLastActiveRequest::default())
            .await?
            .into_inner();
        all_grpc.push(t.elapsed());
        assert_eq!(r.entries.len(), n);
        bytes = prost::Message::encoded_len(&r);

        let t = Instant::now();
        let r = client
            .get_last_active(GetLastActiveRequest {
                sandbox_ids: some.clone(),
            })
            .await?
            .into_inner();
        some_grpc.push(t.elapsed());
        assert_eq!(r.entries.len(), some.len());

        let t = Instant::now();
        let r = activity.last_active(&[]);
        all_local.push(t.elapsed());
        assert_eq!(r.entries.len(), n);
    }
    println!(
        "GetLastActive(all) answer: {:.1} MiB",
        bytes as f64 / (1 << 20) as f64
    );
    summary(
        &format!("GetLastActive(all {n}) over loopback gRPC"),
        all_grpc,
    );
    summary(&format!("GetLastActive(all {n}) in-process"), all_local);
    summary(
        &format!("GetLastActive({} ids) over loopback gRPC", some.len()),
        some_grpc,
    );
    Ok(())
}
