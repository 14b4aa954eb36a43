//! The ActivityService over real gRPC, served in-process by `server::serve`: with
//! `--activity-token-file` set, unauthenticated and wrong-token calls are refused with
//! UNAUTHENTICATED and record nothing; the right token is accepted; the ext_proc listener is
//! not gated. Also: `GetLastActive.evicted_total` / `last_eviction_ms` move when the table's
//! bound is exceeded.

use proto::v1::activity_service_client::ActivityServiceClient;
use proto::v1::{GetLastActiveRequest, GetLastActiveResponse, ReportRequest, SandboxActivity};
use routing::bearer::{BearerToken, AUTHORIZATION};
use sandbox_extproc::server::{serve, ServeOptions};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKEN: &str = "test-token-0123456789";

struct Replica {
    activity: SocketAddr,
    extproc: SocketAddr,
    metrics: SocketAddr,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(token: Option<&str>, max_sandboxes: usize) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    std::fs::write(&routes, r#"{"sandboxes": []}"#).unwrap();
    let cfg = serde_json::json!({"route_source": {"type": "file", "path": routes}});
    let config = routing::GatewayConfig::from_json(cfg.to_string().as_bytes()).unwrap();
    let ready = dir.path().join("ready.json");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let opts = ServeOptions {
        config,
        extproc_listen: any,
        activity_listen: any,
        metrics_listen: any,
        replica: "test".into(),
        forget_after: Duration::from_secs(3600),
        max_sandboxes,
        ready_file: Some(ready.clone()),
        shutdown_grace: Duration::from_secs(1),
        activity_token: token.map(|t| BearerToken::new(t).unwrap()),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Err(e) = serve(opts, async move {
            let _ = rx.await;
        })
        .await
        {
            panic!("serve: {e}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let v: serde_json::Value = loop {
        if let Some(v) = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
        {
            break v;
        }
        assert!(Instant::now() < deadline, "replica not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let addr = |k: &str| v[k].as_str().unwrap().parse().unwrap();
    Replica {
        activity: addr("activity"),
        extproc: addr("extproc"),
        metrics: addr("metrics"),
        _dir: dir,
        stop: Some(tx),
    }
}

async fn client(addr: SocketAddr) -> ActivityServiceClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ActivityServiceClient::new(ch)
}

fn with_auth<T>(msg: T, auth: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(a) = auth {
        r.metadata_mut()
            .insert(AUTHORIZATION, a.parse().expect("ascii"));
    }
    r
}

fn batch(ids: &[&str], ms: u64) -> ReportRequest {
    ReportRequest {
        reporter: "test".into(),
        full_snapshot: true,
        entries: ids
            .iter()
            .map(|id| SandboxActivity {
                sandbox_id: id.to_string(),
                last_active_ms: ms,
            })
            .collect(),
    }
}

async fn report(
    c: &mut ActivityServiceClient<Channel>,
    auth: Option<&str>,
    b: ReportRequest,
) -> Result<u64, tonic::Status> {
    let stream = tokio_stream::iter(vec![b]);
    c.report(with_auth(stream, auth))
        .await
        .map(|r| r.into_inner().entries)
}

async fn last_active(
    c: &mut ActivityServiceClient<Channel>,
    auth: Option<&str>,
) -> Result<GetLastActiveResponse, tonic::Status> {
    c.get_last_active(with_auth(GetLastActiveRequest::default(), auth))
        .await
        .map(|r| r.into_inner())
}

fn metric(addr: SocketAddr, line_prefix: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_on_both_rpcs() {
    let r = start(Some(TOKEN), 1000).await;
    let mut c = client(r.activity).await;
    let good = format!("Bearer {TOKEN}");

    let e = report(&mut c, None, batch(&["no-token"], 1_000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("authorization"), "{e:?}");
    let e = report(&mut c, Some("Bearer wrong"), batch(&["wrong-token"], 1_000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // The bare token without the scheme is wrong too.
    let e = report(&mut c, Some(TOKEN), batch(&["no-scheme"], 1_000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    let e = last_active(&mut c, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = last_active(&mut c, Some("Bearer wrong")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // Nothing the refused streams carried was recorded.
    let la = last_active(&mut c, Some(&good)).await.unwrap();
    assert!(la.entries.is_empty(), "{la:?}");

    let n = report(&mut c, Some(&good), batch(&["authed"], 2_000))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let la = last_active(&mut c, Some(&good)).await.unwrap();
    let ids: Vec<_> = la.entries.iter().map(|e| e.sandbox_id.as_str()).collect();
    assert_eq!(ids, ["authed"], "{la:?}");

    // The CLI path sends the token too.
    let t = BearerToken::new(TOKEN).unwrap();
    let ep = [format!("http://{}", r.activity)];
    let la = sandbox_extproc::cli::last_active(&ep, &[], Duration::from_secs(5), Some(&t))
        .await
        .unwrap();
    assert_eq!(la.sandboxes.get("authed"), Some(&2_000));
    let e = sandbox_extproc::cli::last_active(&ep, &[], Duration::from_secs(5), None)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("Unauthenticated") || e.to_string().contains("authorization"),
        "{e}"
    );

    // Counted per RPC: 3 refused Reports, 3 refused GetLastActive (two here, one from the CLI).
    let p = "sandbox_extproc_activity_auth_failures_total";
    assert_eq!(
        metric(r.metrics, &format!("{p}{{rpc=\"Report\"}} ")),
        Some(3.0)
    );
    assert_eq!(
        metric(r.metrics, &format!("{p}{{rpc=\"GetLastActive\"}} ")),
        Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_service_is_open_and_ext_proc_is_never_gated() {
    let open = start(None, 1000).await;
    let mut c = client(open.activity).await;
    assert_eq!(report(&mut c, None, batch(&["a"], 5)).await.unwrap(), 1);
    assert_eq!(last_active(&mut c, None).await.unwrap().entries.len(), 1);

    // With a token, the ext_proc listener still serves health without any credentials.
    let r = start(Some(TOKEN), 1000).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", r.extproc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_are_reported_in_get_last_active() {
    let r = start(None, 100).await;
    let mut c = client(r.activity).await;
    let ids: Vec<String> = (0..100).map(|i| format!("s{i:03}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    report(&mut c, None, batch(&refs, 1_000)).await.unwrap();
    let la = last_active(&mut c, None).await.unwrap();
    assert_eq!(la.entries.len(), 100);
    assert_eq!(
        (la.evicted_total, la.last_eviction_ms),
        (0, 0),
        "at the bound, not past it"
    );

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    report(&mut c, None, batch(&["one-more"], 2_000))
        .await
        .unwrap();
    let la = last_active(&mut c, None).await.unwrap();
    assert!(la.evicted_total >= 1, "{}", la.evicted_total);
    assert!(
        la.last_eviction_ms >= before,
        "{} < {before}",
        la.last_eviction_ms
    );
    assert!(la.entries.iter().any(|e| e.sandbox_id == "one-more"));
    let first = la.evicted_total;

    // Monotonic: more pressure, a larger count.
    let more: Vec<String> = (0..50).map(|i| format!("t{i:03}")).collect();
    let refs: Vec<&str> = more.iter().map(String::as_str).collect();
    report(&mut c, None, batch(&refs, 3_000)).await.unwrap();
    let la = last_active(&mut c, None).await.unwrap();
    assert!(la.evicted_total > first, "{} vs {first}", la.evicted_total);
    assert!(la.entries.len() <= 100);
}
