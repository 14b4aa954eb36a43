//! The fake API server driven by the real `kube` client and `kube::runtime::watcher`.

use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;

use super::*;
use routing::contract::{PORT_ANNOTATION, SANDBOX_ID_LABEL};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(5);

fn sandbox(ns: &str, name: &str) -> Value {
    fake_pod(ns, name, Some(name), Some("10.1.0.7"), true)
}

async fn server(bookmark_interval: Duration) -> FakeApiServer {
    FakeApiServer::start_with(Options { bookmark_interval })
        .await
        .unwrap()
}

/// A short fixed backoff so the tests that make the server unreachable stay fast.
struct Fixed;
impl Iterator for Fixed {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(50))
    }
}
impl Backoff for Fixed {
    fn reset(&mut self) {}
}

type Watch = BoxStream<'static, Result<Event<Pod>, watcher::Error>>;

fn pod_watcher(s: &FakeApiServer, cfg: watcher::Config) -> Watch {
    let api: Api<Pod> = Api::all(s.client().unwrap());
    watcher::watcher(api, cfg).backoff(Fixed).boxed()
}

/// The next watcher item as a short string: `Init`, `InitApply:ns/name`, `Apply:…`,
/// `Delete:…`, `InitDone` or `Err`.
async fn next(w: &mut Watch) -> String {
    let item = tokio::time::timeout(WAIT, w.next())
        .await
        .expect("watcher event in time");
    let key = |p: &Pod| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
    match item.expect("watcher stream never ends") {
        Ok(Event::Init) => "Init".into(),
        Ok(Event::InitApply(p)) => format!("InitApply:{}", key(&p)),
        Ok(Event::InitDone) => "InitDone".into(),
        Ok(Event::Apply(p)) => format!("Apply:{}", key(&p)),
        Ok(Event::Delete(p)) => format!("Delete:{}", key(&p)),
        Err(_) => "Err".into(),
    }
}

/// The next `n` watcher items that are not errors (errors are counted and returned too).
async fn next_ok(w: &mut Watch, n: usize) -> (Vec<String>, usize) {
    let (mut out, mut errors) = (Vec::new(), 0);
    while out.len() < n {
        match next(w).await.as_str() {
            "Err" => errors += 1,
            ev => out.push(ev.to_string()),
        }
    }
    (out, errors)
}

/// The next event of a raw watch, within `WAIT`.
async fn next_watch_event(
    events: &mut BoxStream<'_, kube::Result<WatchEvent<Pod>>>,
) -> WatchEvent<Pod> {
    tokio::time::timeout(WAIT, events.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter().map(|p| p.name_any()).collect()
}

#[tokio::test]
async fn list_filters_by_namespace_and_selector() {
    let s = server(Duration::ZERO).await;
    s.apply(sandbox("a", "s1"));
    s.apply(fake_pod("a", "plain", None, Some("10.1.0.8"), true));
    let stored = s.apply(sandbox("b", "s3"));
    let client = s.client().unwrap();
    let all: Api<Pod> = Api::all(client.clone());
    let in_a: Api<Pod> = Api::namespaced(client, "a");

    let list = all
        .list(&ListParams::default().labels(SANDBOX_ID_LABEL))
        .await
        .unwrap();
    assert_eq!(names(&list.items), ["s1", "s3"]);
    assert_eq!(
        list.metadata.resource_version,
        Some(s.resource_version().to_string())
    );
    assert_eq!(
        list.items[1].metadata.uid.as_deref(),
        stored["metadata"]["uid"].as_str()
    );
    assert_eq!(
        names(
            &in_a
                .list(&ListParams::default().labels(SANDBOX_ID_LABEL))
                .await
                .unwrap()
                .items
        ),
        ["s1"]
    );
    let by_value = ListParams::default()
        .labels("sandboxgateway.io/sandbox-id=s3,app.kubernetes.io/name=sandbox");
    assert_eq!(names(&all.list(&by_value).await.unwrap().items), ["s3"]);
    let without = ListParams::default().labels("!sandboxgateway.io/sandbox-id");
    assert_eq!(names(&all.list(&without).await.unwrap().items), ["plain"]);
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        3
    );

    match all.list(&ListParams::default().labels("x in (a,b)")).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 400),
        other => panic!("set-based selector must be rejected, got {other:?}"),
    }
    assert_eq!(s.request_counts().lists, 5);
    assert_eq!(s.request_counts().rejected, 1);
}

#[tokio::test]
async fn watcher_sees_init_apply_delete_and_relabel() {
    let s = server(Duration::from_millis(100)).await;
    s.apply(sandbox("a", "s1"));
    s.apply(fake_pod("a", "plain", None, None, false));
    let mut w = pod_watcher(&s, watcher::Config::default().labels(SANDBOX_ID_LABEL));
    let (init, _) = next_ok(&mut w, 3).await;
    assert_eq!(init, ["Init", "InitApply:a/s1", "InitDone"]);

    s.apply(sandbox("b", "s2"));
    assert_eq!(next(&mut w).await, "Apply:b/s2");
    let mut p = s.get("b", "s2").unwrap();
    set_ready(&mut p, false);
    set_annotation(&mut p, PORT_ANNOTATION, Some("9000"));
    let updated = s.apply(p);
    assert_eq!(next(&mut w).await, "Apply:b/s2");
    s.delete("b", "s2").unwrap();
    assert_eq!(next(&mut w).await, "Delete:b/s2");

    // A label change that makes the pod stop matching is a delete for this watch; matching
    // again is an add. Changes to pods that never match are not seen at all.
    let mut p = s.get("a", "s1").unwrap();
    set_label(&mut p, SANDBOX_ID_LABEL, None);
    s.apply(p.clone());
    assert_eq!(next(&mut w).await, "Delete:a/s1");
    s.apply(fake_pod("a", "plain", None, Some("10.1.0.9"), true));
    set_label(&mut p, SANDBOX_ID_LABEL, Some("s1"));
    s.apply(p);
    assert_eq!(next(&mut w).await, "Apply:a/s1");

    // The update kept identity, like the API server.
    assert!(updated["metadata"]["uid"].is_string());
    let counts = s.request_counts();
    assert_eq!((counts.lists, counts.watches), (1, 1));
    // What kube's default watcher (ListWatch) sends: a paged list without a resourceVersion,
    // then a bookmarked watch from the list's resourceVersion.
    let log = s.request_log();
    assert_eq!(
        log[0],
        "/api/v1/pods?&labelSelector=sandboxgateway.io%2Fsandbox-id&limit=500"
    );
    assert_eq!(
        log[1],
        "/api/v1/pods?&watch=true&timeoutSeconds=290&labelSelector=sandboxgateway.io%2Fsandbox-id\
         &allowWatchBookmarks=true&resourceVersion=2"
    );
}

#[tokio::test]
async fn raw_watch_replays_filters_and_bookmarks() {
    let s = server(Duration::from_millis(50)).await;
    let api: Api<Pod> = Api::all(s.client().unwrap());
    let first = s.apply(sandbox("a", "s1"));
    s.apply(sandbox("a", "s2"));
    let mut p = s.get("a", "s1").unwrap();
    set_label(&mut p, SANDBOX_ID_LABEL, None);
    let relabelled = s.apply(p);

    // Replay from s1's version with a selector: s2 ADDED, then s1 DELETED (it stopped matching)
    // carrying its last matching state at the relabel's resourceVersion.
    let rv = first["metadata"]["resourceVersion"].as_str().unwrap();
    let wp = WatchParams::default().labels(SANDBOX_ID_LABEL);
    let mut events = api.watch(&wp, rv).await.unwrap().boxed();
    let mut next_event = async || next_watch_event(&mut events).await;
    assert!(matches!(next_event().await, WatchEvent::Added(p) if p.name_any() == "s2"));
    match next_event().await {
        WatchEvent::Deleted(p) => {
            assert_eq!(p.name_any(), "s1");
            assert_eq!(
                p.labels().get(SANDBOX_ID_LABEL).map(String::as_str),
                Some("s1")
            );
            assert_eq!(
                p.resource_version(),
                relabelled["metadata"]["resourceVersion"]
                    .as_str()
                    .map(String::from)
            );
        }
        other => panic!("expected DELETED, got {other:?}"),
    }
    // Periodic bookmarks carry the current resourceVersion.
    match next_event().await {
        WatchEvent::Bookmark(b) => assert_eq!(
            b.metadata.resource_version,
            s.resource_version().to_string()
        ),
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
    // timeoutSeconds ends the stream cleanly.
    let wp = WatchParams::default().timeout(1).disable_bookmarks();
    let ended = api
        .watch(&wp, &s.resource_version().to_string())
        .await
        .unwrap()
        .count();
    assert_eq!(tokio::time::timeout(WAIT, ended).await.unwrap(), 0);
}

#[tokio::test]
async fn bookmarks_on_demand_and_watch_from_unset_version() {
    let s = server(Duration::ZERO).await;
    let api: Api<Pod> = Api::namespaced(s.client().unwrap(), "a");
    s.apply(sandbox("a", "s1"));
    s.apply(sandbox("other", "s9"));
    // resourceVersion "0": synthetic ADDED for the current state, then live events.
    let mut events = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    let mut next_event = async || next_watch_event(&mut events).await;
    assert!(matches!(next_event().await, WatchEvent::Added(p) if p.name_any() == "s1"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.send_bookmark();
    match next_event().await {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, "2"),
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
}

#[tokio::test]
async fn compaction_and_dropped_watch_make_the_watcher_relist() {
    let s = server(Duration::ZERO).await;
    s.apply(sandbox("a", "s1"));
    let mut w = pod_watcher(&s, watcher::Config::default().labels(SANDBOX_ID_LABEL));
    assert_eq!(
        next_ok(&mut w, 3).await.0,
        ["Init", "InitApply:a/s1", "InitDone"]
    );
    tokio::time::sleep(Duration::from_millis(50)).await; // let the watch open

    // History the watcher never saw (a pod outside its selector) is compacted away, then its
    // connection is cut: resuming from its old version gets 410 Expired, and it relists.
    s.apply(fake_pod("a", "plain", None, None, true));
    s.compact();
    s.drop_watches();
    let (events, errors) = next_ok(&mut w, 3).await;
    assert_eq!(events, ["Init", "InitApply:a/s1", "InitDone"]);
    // kube ends a watch stream cut mid-chunk quietly (it treats "unexpected EOF during chunk"
    // as resumable), so the only error the watcher reports is the 410.
    assert!(errors >= 1, "the 410 is reported, got {errors} errors");
    let counts = s.request_counts();
    assert_eq!((counts.lists, counts.expired), (2, 1));

    // And it is watching again.
    s.apply(sandbox("a", "s2"));
    assert_eq!(next(&mut w).await, "Apply:a/s2");

    // A raw watch from before the compaction point gets the ERROR event the API server sends.
    let api: Api<Pod> = Api::all(s.client().unwrap());
    let mut raw = api
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, raw.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn dropped_watch_is_cut_without_the_chunked_terminator() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server(Duration::ZERO).await;
    s.apply(sandbox("a", "s1"));
    let mut tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let req = "GET /api/v1/pods?watch=1&resourceVersion=0 HTTP/1.1\r\nhost: x\r\n\r\n";
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"ADDED\"") {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    s.drop_watches();
    let rest = tokio::time::timeout(WAIT, async {
        let mut rest = Vec::new();
        while let Ok(n @ 1..) = tcp.read(&mut buf).await {
            rest.extend_from_slice(&buf[..n]);
        }
        rest
    });
    let text = String::from_utf8_lossy(&seen).into_owned()
        + &String::from_utf8_lossy(&rest.await.unwrap());
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a cut stream has no last chunk: {text:?}"
    );
}

#[tokio::test]
async fn stopped_server_is_unreachable_and_restart_resumes_without_relist() {
    let s = server(Duration::from_millis(100)).await;
    s.apply(sandbox("a", "s1"));
    let mut w = pod_watcher(&s, watcher::Config::default().labels(SANDBOX_ID_LABEL));
    assert_eq!(
        next_ok(&mut w, 3).await.0,
        ["Init", "InitApply:a/s1", "InitDone"]
    );

    s.stop().await;
    assert_eq!(next(&mut w).await, "Err");
    assert_eq!(next(&mut w).await, "Err", "still unreachable");
    assert!(s.client().unwrap().apiserver_version().await.is_err());

    // Changes while the server is down are replayed to the resumed watch.
    s.apply(sandbox("a", "s2"));
    s.delete("a", "s1");
    s.restart().await.unwrap();
    let (events, _) = next_ok(&mut w, 2).await;
    assert_eq!(events, ["Apply:a/s2", "Delete:a/s1"]);
    assert_eq!(
        s.request_counts().lists,
        1,
        "resumed from its resourceVersion, no relist"
    );
}

#[tokio::test]
async fn streaming_list_watcher_is_served_too() {
    let s = server(Duration::from_millis(100)).await;
    s.apply(sandbox("a", "s1"));
    let mut w = pod_watcher(
        &s,
        watcher::Config::default()
            .labels(SANDBOX_ID_LABEL)
            .streaming_lists(),
    );
    assert_eq!(
        next_ok(&mut w, 3).await.0,
        ["Init", "InitApply:a/s1", "InitDone"]
    );
    s.apply(sandbox("a", "s2"));
    assert_eq!(next(&mut w).await, "Apply:a/s2");
    assert_eq!(s.request_counts().lists, 0);
}

#[tokio::test]
async fn kubeconfig_points_kube_at_the_server() {
    let s = server(Duration::ZERO).await;
    s.apply(sandbox("default", "s1"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    s.kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let opts = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &opts)
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let api: Api<Pod> = Api::default_namespaced(kube::Client::try_from(config).unwrap());
    assert_eq!(
        names(&api.list(&ListParams::default()).await.unwrap().items),
        ["s1"]
    );
}

/// The status code of a raw `GET path`.
async fn raw_status(s: &FakeApiServer, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn paged(limit: u32, token: Option<&str>) -> ListParams {
    let lp = ListParams::default().labels(SANDBOX_ID_LABEL).limit(limit);
    match token {
        Some(t) => lp.continue_token(t),
        None => lp,
    }
}

#[tokio::test]
async fn paged_list_pages_one_snapshot() {
    let s = server(Duration::ZERO).await;
    for i in 0..7 {
        s.apply(sandbox("a", &format!("s{i}")));
        // Pods the selector leaves out sit between the matching ones.
        s.apply(fake_pod("a", &format!("t{i}"), None, None, true));
    }
    let api: Api<Pod> = Api::all(s.client().unwrap());
    let first = api.list(&paged(3, None)).await.unwrap();
    assert_eq!(names(&first.items), ["s0", "s1", "s2"]);
    let rv = first.metadata.resource_version.clone();
    assert_eq!(rv, Some(s.resource_version().to_string()));
    let token = first.metadata.continue_.clone().expect("a continue token");

    // Changes between pages do not show: the rest comes from the first page's snapshot.
    s.delete("a", "s4");
    s.apply(sandbox("a", "s10"));
    let mut p = s.get("a", "s5").unwrap();
    set_annotation(&mut p, PORT_ANNOTATION, Some("9000"));
    s.apply(p);
    let second = api.list(&paged(3, Some(&token))).await.unwrap();
    assert_eq!(names(&second.items), ["s3", "s4", "s5"]);
    assert_eq!(second.metadata.resource_version, rv);
    assert!(second.items[2].annotations().get(PORT_ANNOTATION).is_none());
    let token = second.metadata.continue_.clone().expect("a continue token");
    let last = api.list(&paged(3, Some(&token))).await.unwrap();
    assert_eq!(names(&last.items), ["s6"]);
    assert_eq!(last.metadata.resource_version, rv);
    assert_eq!(last.metadata.continue_, None, "the last page has no token");
    // A token can be sent again (until compaction), for the same page; a new list sees the
    // changes.
    let again = api.list(&paged(3, Some(&token))).await.unwrap();
    assert_eq!(names(&again.items), ["s6"]);
    let now = api
        .list(&ListParams::default().labels(SANDBOX_ID_LABEL))
        .await
        .unwrap();
    assert_eq!(
        names(&now.items),
        ["s0", "s1", "s10", "s2", "s3", "s5", "s6"]
    );
    // An exact fit has no next page.
    let exact = api.list(&paged(7, None)).await.unwrap();
    assert_eq!((exact.items.len(), exact.metadata.continue_), (7, None));
    assert_eq!(s.request_counts().lists, 6);
}

#[tokio::test]
async fn bad_and_expired_continue_tokens_are_refused() {
    let s = server(Duration::ZERO).await;
    for i in 0..3 {
        s.apply(sandbox("a", &format!("s{i}")));
    }
    let api: Api<Pod> = Api::all(s.client().unwrap());
    let status = |r: kube::Result<kube::core::ObjectList<Pod>>| match r {
        Err(kube::Error::Api(status)) => (status.code, status.reason),
        Ok(l) => panic!("want an error, got {} items", l.items.len()),
        Err(e) => panic!("want an API error, got {e}"),
    };
    assert_eq!(
        status(api.list(&paged(1, Some("not-ours"))).await),
        (400, "BadRequest".to_string())
    );
    let token = api
        .list(&paged(1, None))
        .await
        .unwrap()
        .metadata
        .continue_
        .unwrap();
    // A continue token carries its own resourceVersion: asking for another one is an error
    // (kube never sends both, so this one is raw).
    let both = format!("/api/v1/pods?limit=1&resourceVersion=1&continue={token}");
    assert_eq!(raw_status(&s, &both).await, 400);
    // Compaction past the list's snapshot expires its token, as etcd's does.
    s.apply(sandbox("a", "s9"));
    s.compact();
    assert_eq!(
        status(api.list(&paged(1, Some(&token))).await),
        (410, "Expired".to_string())
    );
    // So does being one of too many lists in flight.
    let oldest = api
        .list(&paged(1, None))
        .await
        .unwrap()
        .metadata
        .continue_
        .unwrap();
    for _ in 0..MAX_LIST_SNAPSHOTS {
        api.list(&paged(1, None)).await.unwrap();
    }
    assert_eq!(status(api.list(&paged(1, Some(&oldest))).await).0, 410);
    let counts = s.request_counts();
    assert_eq!((counts.expired, counts.rejected), (2, 4));
}

#[tokio::test]
async fn watcher_lists_in_pages_then_watches_from_the_list() {
    let s = server(Duration::ZERO).await;
    for i in 0..5 {
        s.apply(sandbox("a", &format!("s{i}")));
    }
    s.apply_all((5..7).map(|i| sandbox("b", &format!("s{i}"))));
    let list_rv = s.resource_version();
    let cfg = watcher::Config::default()
        .labels(SANDBOX_ID_LABEL)
        .page_size(2);
    let mut w = pod_watcher(&s, cfg);
    let (events, errors) = next_ok(&mut w, 9).await;
    assert_eq!(errors, 0);
    assert_eq!(
        events,
        [
            "Init",
            "InitApply:a/s0",
            "InitApply:a/s1",
            "InitApply:a/s2",
            "InitApply:a/s3",
            "InitApply:a/s4",
            "InitApply:b/s5",
            "InitApply:b/s6",
            "InitDone"
        ]
    );
    s.apply(sandbox("a", "s7"));
    assert_eq!(next(&mut w).await, "Apply:a/s7");
    let log = s.request_log();
    assert_eq!(log.len(), 5, "{log:?}");
    assert!(
        log[0].ends_with("&limit=2") && !log[0].contains("continue"),
        "{}",
        log[0]
    );
    for page in &log[1..4] {
        assert!(page.contains("&limit=2&continue=fake-"), "{page}");
    }
    assert!(
        log[4].contains("watch=true") && log[4].ends_with(&format!("resourceVersion={list_rv}")),
        "{}",
        log[4]
    );
}

#[tokio::test]
async fn many_pods_at_once() {
    let s = server(Duration::ZERO).await;
    let rv = s.apply_all(pods::ready_sandbox_pods("bulk", "sb", 1000));
    assert_eq!(rv, 1000);
    let api: Api<Pod> = Api::namespaced(s.client().unwrap(), "bulk");
    let all = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(all.items.len(), 1000);
    let ips: std::collections::HashSet<_> = all
        .items
        .iter()
        .map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap())
        .collect();
    assert_eq!(ips.len(), 1000, "every pod has its own IP");
    let uids: std::collections::HashSet<_> = all.items.iter().map(|p| p.uid().unwrap()).collect();
    assert_eq!(uids.len(), 1000);
    let p = s.get("bulk", "sb7").unwrap();
    assert_eq!(p["metadata"]["labels"][SANDBOX_ID_LABEL], "sb7");
    assert_eq!(p["status"]["podIP"], "10.0.0.7");
}
