//! Checks of the Kubernetes manifests under `deploy/` (no cluster is reachable here):
//! - every YAML document parses, and the kustomization lists exactly the manifests that exist;
//! - RBAC grants exactly get/list/watch on pods, to the ServiceAccount the Deployment uses;
//! - the Envoy bootstrap in the ConfigMap keeps the listener/HTTP settings of
//!   `envoy/gateway.yaml.tmpl`, and its module config is a `kubernetes` route source the
//!   gateway's own config parser accepts;
//! - the Deployment wiring (module path, probes, drain, security) is consistent;
//! - the bootstrap itself runs in the real Envoy 1.40 with the module, against the in-test
//!   Kubernetes API server: a labelled pod is routed, the ops listener exposes only /ready and
//!   /stats/prometheus.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use routing::config::{GatewayConfig, RouteSourceConfig};
use sandbox_gateway_apiserver::{
    fake_pod, set_annotation, set_ready, FakeApiServer, PORT_ANNOTATION,
};
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::envoy::{admin_get, render, repo_root, Envoy, EnvoyOptions};
use sandbox_gateway_harness::sandbox::SandboxServer;
use serde_json::{json, Value};

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

fn parse_docs(text: &str, what: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Every document under deploy/, with the file it came from.
fn all_docs() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    assert!(
        !files.is_empty(),
        "no manifests under {}",
        deploy_dir().display()
    );
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for d in parse_docs(&text, &f.display().to_string()) {
            out.push((f.clone(), d));
        }
    }
    out
}

fn find(kind: &str, name: &str) -> Value {
    let hits: Vec<Value> = all_docs()
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(hits.len(), 1, "expected exactly one {kind} {name}");
    hits.into_iter().next().unwrap()
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    let items = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"));
    items
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no {name:?} in {list}"))
}

fn bootstrap() -> Value {
    let cm = find("ConfigMap", "sandbox-gateway-envoy");
    let text = cm["data"]["envoy.yaml"].as_str().expect("data.envoy.yaml");
    let mut docs = parse_docs(text, "ConfigMap envoy.yaml");
    assert_eq!(docs.len(), 1);
    docs.remove(0)
}

/// The HTTP connection manager config of a listener.
fn hcm<'a>(bootstrap: &'a Value, listener: &str) -> &'a Value {
    let l = named(&bootstrap["static_resources"]["listeners"], listener);
    &l["filter_chains"][0]["filters"][0]["typed_config"]
}

fn hcm_mut<'a>(bootstrap: &'a mut Value, listener: &str) -> &'a mut Value {
    let listeners = bootstrap["static_resources"]["listeners"]
        .as_array_mut()
        .unwrap();
    let l = listeners
        .iter_mut()
        .find(|l| l["name"] == listener)
        .unwrap();
    &mut l["filter_chains"][0]["filters"][0]["typed_config"]
}

fn module_config_mut(bootstrap: &mut Value) -> &mut Value {
    let filters = hcm_mut(bootstrap, "sandboxes")["http_filters"]
        .as_array_mut()
        .unwrap();
    let f = filters
        .iter_mut()
        .find(|f| f["name"] == "sandbox_gateway")
        .unwrap();
    &mut f["typed_config"]["filter_config"]["value"]
}

fn module_config(bootstrap: &Value) -> Value {
    let f = named(
        &hcm(bootstrap, "sandboxes")["http_filters"],
        "sandbox_gateway",
    );
    let text = f["typed_config"]["filter_config"]["value"]
        .as_str()
        .expect("a JSON string");
    serde_json::from_str(text).unwrap_or_else(|e| panic!("module config is not JSON: {e}: {text}"))
}

fn address(v: &Value) -> String {
    let sa = &v["address"]["socket_address"];
    format!("{}:{}", sa["address"].as_str().unwrap(), sa["port_value"])
}

#[test]
fn every_manifest_parses_and_the_kustomization_lists_them() {
    let docs = all_docs();
    for (f, d) in &docs {
        assert!(
            d["apiVersion"].is_string() && d["kind"].is_string(),
            "{}: {d}",
            f.display()
        );
    }
    let base = deploy_dir().join("base");
    let k = parse_docs(
        &std::fs::read_to_string(base.join("kustomization.yaml")).unwrap(),
        "k",
    );
    let mut listed: Vec<String> = k[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    listed.sort();
    let mut present = Vec::new();
    yaml_files(&base, &mut present);
    let mut present: Vec<String> = present
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    present.sort();
    assert_eq!(
        listed, present,
        "kustomization resources vs files in deploy/base"
    );
    for (_, d) in &docs {
        let kind = d["kind"].as_str().unwrap();
        let cluster_scoped = [
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "Kustomization",
        ];
        if !cluster_scoped.contains(&kind) {
            assert_eq!(d["metadata"]["namespace"], "sandbox-gateway", "{kind}");
        }
    }
}

fn assert_read_only_pods(rules: &Value, what: &str) {
    let expected =
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]);
    assert_eq!(
        rules, &expected,
        "{what} must grant exactly get/list/watch on pods"
    );
}

#[test]
fn rbac_grants_exactly_read_on_pods() {
    let docs = all_docs();
    let roles: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .collect();
    assert_eq!(roles.len(), 1, "one ClusterRole and no other role");
    assert_read_only_pods(&roles[0]["rules"], "the ClusterRole");

    let binding = find("ClusterRoleBinding", "sandbox-gateway-pod-reader");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], roles[0]["metadata"]["name"]);
    let sa = json!([{"kind": "ServiceAccount", "name": "sandbox-gateway", "namespace": "sandbox-gateway"}]);
    assert_eq!(binding["subjects"], sa);
    find("ServiceAccount", "sandbox-gateway");
    let dep = find("Deployment", "sandbox-gateway");
    assert_eq!(
        dep["spec"]["template"]["spec"]["serviceAccountName"],
        "sandbox-gateway"
    );

    // The commented single-namespace alternative grants the same and nothing more.
    let text = std::fs::read_to_string(deploy_dir().join("base/rbac.yaml")).unwrap();
    let start = text.find("# ---\n").expect("commented Role/RoleBinding");
    let uncommented: String = text[start..]
        .lines()
        .map(|l| {
            l.strip_prefix("# ")
                .or_else(|| l.strip_prefix('#'))
                .unwrap_or(l)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let alt = parse_docs(&uncommented, "commented Role");
    assert_eq!(alt.len(), 2);
    assert_eq!(alt[0]["kind"], "Role");
    assert_read_only_pods(&alt[0]["rules"], "the commented Role");
    assert_eq!(alt[1]["kind"], "RoleBinding");
    assert_eq!(alt[1]["subjects"], sa);
}

#[test]
fn bootstrap_keeps_the_gateway_settings_and_uses_the_kubernetes_source() {
    let b = bootstrap();
    assert_eq!(address(&b["admin"]), "127.0.0.1:9901");
    let listeners = &b["static_resources"]["listeners"];
    assert_eq!(address(named(listeners, "sandboxes")), "0.0.0.0:8080");
    assert_eq!(address(named(listeners, "ops")), "0.0.0.0:9902");

    // Same HTTP settings and cluster as the tested module-mode template, apart from the module
    // config itself.
    let tmpl = std::fs::read_to_string(repo_root().join("envoy/gateway.yaml.tmpl")).unwrap();
    let vars = [
        ("ADMIN_PORT", "9901".into()),
        ("LISTEN_PORT", "8080".into()),
        ("FILTER_CONFIG", "\"{}\"".into()),
    ];
    let reference = parse_docs(&render(&tmpl, &vars).unwrap(), "gateway.yaml.tmpl").remove(0);
    let (mut ours, mut theirs) = (b.clone(), reference.clone());
    *module_config_mut(&mut ours) = Value::Null;
    *module_config_mut(&mut theirs) = Value::Null;
    assert_eq!(hcm(&ours, "sandboxes"), hcm(&theirs, "sandboxes"));
    let cluster =
        |b: &Value| named(&b["static_resources"]["clusters"], "sandbox_original_dst").clone();
    assert_eq!(cluster(&b), cluster(&reference));
    assert_eq!(
        cluster(&b)["original_dst_lb_config"]["use_http_header"],
        false
    );

    // The ops listener exposes exactly two admin paths, GET only.
    let routes = &hcm(&b, "ops")["route_config"]["virtual_hosts"][0]["routes"];
    let paths: Vec<&str> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["match"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/ready", "/stats/prometheus"]);
    let admin = named(&b["static_resources"]["clusters"], "envoy_admin");
    assert_eq!(
        address(&admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]),
        "127.0.0.1:9901"
    );

    let cfg = module_config(&b);
    assert_eq!(cfg["route_source"]["type"], "kubernetes");
    assert_eq!(cfg["route_source"]["label"], "sandboxgateway.io/sandbox-id");
    let parsed = GatewayConfig::from_json(cfg.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("the gateway rejects the deploy module config: {e}"));
    match parsed.routes {
        RouteSourceConfig::Kubernetes(k) => {
            assert!(
                k.namespaces.is_empty(),
                "all namespaces, as the ClusterRole allows"
            );
            assert_eq!(k.kubeconfig, None, "in-cluster credentials");
        }
        other => panic!("expected the kubernetes route source, got {other:?}"),
    }
}

#[test]
fn deployment_wiring_is_consistent() {
    let dep = find("Deployment", "sandbox-gateway");
    let spec = &dep["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &spec["template"]["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], labels);
    assert_eq!(
        &find("PodDisruptionBudget", "sandbox-gateway")["spec"]["selector"]["matchLabels"],
        labels
    );
    let svc = find("Service", "sandbox-gateway");
    assert_eq!(&svc["spec"]["selector"], labels);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    let envoy = named(&pod["containers"], "envoy");
    assert_eq!(envoy["image"], "envoyproxy/envoy:v1.40.0");
    let env = named(&envoy["env"], "ENVOY_DYNAMIC_MODULES_SEARCH_PATH");
    let mounts = &envoy["volumeMounts"];
    assert_eq!(named(mounts, "modules")["mountPath"], env["value"]);
    let init = named(&pod["initContainers"], "module");
    assert_eq!(init["image"], "sandbox-gateway-module");
    let shared = named(&init["volumeMounts"], "modules")["mountPath"]
        .as_str()
        .unwrap();
    let cmd: Vec<&str> = init["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        cmd.contains(&"/modules/libsandbox_gateway.so")
            && cmd.last() == Some(&format!("{shared}/").as_str())
    );
    for c in [envoy, init] {
        let sc = &c["securityContext"];
        assert_eq!(
            (
                sc["readOnlyRootFilesystem"].clone(),
                sc["allowPrivilegeEscalation"].clone()
            ),
            (json!(true), json!(false))
        );
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    }
    let args: Vec<&str> = envoy["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args
        .windows(2)
        .any(|w| w == ["--config-path", "/etc/envoy/envoy.yaml"]));
    assert_eq!(named(mounts, "envoy-config")["mountPath"], "/etc/envoy");

    // Readiness goes through the ops listener (the admin API listens on loopback only).
    let probe = &envoy["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/ready");
    let port = named(&envoy["ports"], probe["port"].as_str().unwrap())["containerPort"].clone();
    let ops = bootstrap();
    let ops = named(&ops["static_resources"]["listeners"], "ops");
    assert_eq!(port, ops["address"]["socket_address"]["port_value"]);
    assert_eq!(named(&envoy["ports"], "http")["containerPort"], 8080);

    // The drain fits in the grace period: drain time < preStop sleep < grace period.
    let pre_stop = envoy["lifecycle"]["preStop"]["exec"]["command"].to_string();
    assert!(
        pre_stop.contains("drain_listeners?graceful") && pre_stop.contains("--post-data"),
        "{pre_stop}"
    );
    let sleep: u64 = pre_stop
        .split("sleep ")
        .nth(1)
        .unwrap()
        .trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap();
    let drain: u64 = args.windows(2).find(|w| w[0] == "--drain-time-s").unwrap()[1]
        .parse()
        .unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        drain < sleep && sleep + 15 <= grace,
        "drain {drain}s, sleep {sleep}s, grace {grace}s"
    );
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn listener_addr(admin: SocketAddr, name: &str) -> SocketAddr {
    let v: Value =
        serde_json::from_str(&admin_get(admin, "/listeners?format=json").unwrap()).unwrap();
    let l = named(&v["listener_statuses"], name);
    // `local_address` is an Address (socket_address directly), not a wrapper with `address`.
    address(&json!({"address": l["local_address"]}))
        .parse()
        .unwrap()
}

/// The deploy bootstrap as-is except: loopback addresses and free ports (no fixed ports on a
/// test machine), and a kubeconfig for the in-test API server instead of in-cluster credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_bootstrap_routes_pods_in_real_envoy() {
    let api = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig).unwrap();
    let sandbox = SandboxServer::start("alpha", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut pod = fake_pod(
        "sandboxes",
        "alpha-0",
        Some("alpha"),
        Some("127.0.0.1"),
        true,
    );
    set_annotation(
        &mut pod,
        PORT_ANNOTATION,
        Some(&sandbox.addr.port().to_string()),
    );
    api.apply(pod);

    let mut b = bootstrap();
    let admin_port = free_port();
    b["admin"]["address"]["socket_address"]["port_value"] = json!(admin_port);
    for l in b["static_resources"]["listeners"].as_array_mut().unwrap() {
        l["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": 0});
    }
    let admin_cluster = b["static_resources"]["clusters"].as_array_mut().unwrap();
    let admin_cluster = admin_cluster
        .iter_mut()
        .find(|c| c["name"] == "envoy_admin")
        .unwrap();
    admin_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"]["port_value"] = json!(admin_port);
    let mut cfg = module_config(&b);
    cfg["route_source"]["kubeconfig"] = json!(kubeconfig);
    *module_config_mut(&mut b) = json!(cfg.to_string());

    let opts = EnvoyOptions::sandboxes(b.to_string());
    let envoy = tokio::task::spawn_blocking(move || Envoy::start(opts))
        .await
        .unwrap()
        .unwrap();
    let gw = envoy.listener;

    // The pod is routed: by header (default port from the annotation) and by Host.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut r = client::get(gw, "/hello", &[("x-sandbox-id", "alpha")])
        .await
        .unwrap();
    while r.status != 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        r = client::get(gw, "/hello", &[("x-sandbox-id", "alpha")])
            .await
            .unwrap();
    }
    assert_eq!(r.status, 200, "{}\n{}", r.text(), envoy.log());
    let host = format!("{}-alpha.sandbox.example.com", sandbox.addr.port());
    assert_eq!(
        client::get(gw, "/", &[("host", &host)])
            .await
            .unwrap()
            .status,
        200
    );

    // Readiness lost: no longer routed (the watch delivers the change). Whether that is a 404
    // or a 503 is the route source's business, not the bootstrap's.
    let mut pod = api.get("sandboxes", "alpha-0").unwrap();
    set_ready(&mut pod, false);
    api.apply(pod);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client::get(gw, "/", &[("x-sandbox-id", "alpha")])
            .await
            .unwrap();
        if r.status != 200 {
            let error = r.json()["error"].as_str().unwrap_or_default().to_string();
            assert!(
                ["sandbox_not_found", "sandbox_not_ready"].contains(&error.as_str()),
                "{error}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still routed after readiness loss"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counts = api.request_counts();
    assert!(counts.lists >= 1 && counts.watches >= 1, "{counts:?}");
    let log = api.request_log();
    assert!(
        log.iter()
            .all(|r| r.contains("labelSelector=sandboxgateway.io%2Fsandbox-id")),
        "{log:?}"
    );

    // The ops listener: readiness and metrics from the admin API, nothing else of it.
    let ops = listener_addr(envoy.admin, "ops");
    let ready = client::get(ops, "/ready", &[]).await.unwrap();
    assert_eq!((ready.status, ready.text().trim()), (200, "LIVE"));
    let metrics = client::get(ops, "/stats/prometheus", &[]).await.unwrap();
    assert!(
        metrics.status == 200 && metrics.text().contains("envoy_server_live"),
        "{}",
        metrics.status
    );
    for path in ["/server_info", "/config_dump", "/ready/x"] {
        assert_eq!(
            client::get(ops, path, &[]).await.unwrap().status,
            404,
            "{path}"
        );
    }
    let post = b"POST /drain_listeners?graceful HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    assert_eq!(client::send_raw(ops, post).await.unwrap().status, 404);
    let post = b"POST /ready HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    assert_eq!(client::send_raw(ops, post).await.unwrap().status, 404);
}
