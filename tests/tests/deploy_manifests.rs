//! Checks of the Kubernetes manifests under `deploy/` (no cluster is reachable here):
//! - every YAML document parses into the typed `k8s-openapi` struct of its kind (the examples
//!   into the controller's own `SandboxPool`/`Sandbox`), with no field that kind does not know,
//!   and the kustomizations (the base, the CRDs it includes) list exactly the manifests there are;
//! - the base renders with the real `kubectl kustomize` (kubectl must be installed): the expected
//!   objects, all in `sandbox-gateway`, the generated token Secret's hashed name in every
//!   Deployment; the docs apply it server-side (the SandboxPool CRD is too large for client-side
//!   apply);
//! - the gateway's RBAC grants exactly get/list/watch on pods, to the ServiceAccount the
//!   Deployment uses; the controller's grants exactly the calls it makes, each verb explained;
//! - the controller's Deployment: its ServiceAccount, leader election with 2 replicas, its
//!   --activity-service naming the headless extproc Service and its port, the token, probes,
//!   security, and pod labels the NetworkPolicy admits;
//! - the example pool resolves with the controller's own settings parser;
//! - the Envoy bootstrap in the ConfigMap is what `make deploy-bootstrap` generates from
//!   `envoy/gateway.yaml.tmpl` and `deploy/base/envoy-configmap.yaml.tmpl`, keeps the
//!   listener/HTTP settings of the former, and its module config is a `kubernetes` route source
//!   the gateway's own config parser accepts (the bootstrap is Envoy's schema: untyped here);
//! - the Deployment wiring (module path, probes, drain, security) is consistent;
//! - the bootstrap itself runs in the real Envoy 1.40 with the module, against the in-test
//!   Kubernetes API server: a labelled pod is routed; the ops listener exposes only the readiness
//!   probe (through the sandbox listener to the module; 503 once Envoy's health check is failed,
//!   as the preStop hook does), /ready and /stats/prometheus;
//! - sandbox-extproc is reachable only from the gateway and controller pods (NetworkPolicy), and
//!   the ActivityService token Secret is mounted where both the module config and sandbox-extproc
//!   read it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Secret, Service, ServiceAccount, VolumeMount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::{ClusterResourceScope, Metadata, NamespaceResourceScope, Resource};
use routing::config::{GatewayConfig, RouteSourceConfig};
use routing::contract::PORT_ANNOTATION;
use routing::decide::READY_PATH;
use sandbox_controller::crd::{Sandbox, SandboxPool};
use sandbox_controller::spec::{PoolSettings, SandboxSettings};
use sandbox_gateway_apiserver::{fake_pod, set_annotation, set_ready, FakeApiServer};
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::envoy::{
    admin_get, admin_post, render, repo_root, Envoy, EnvoyOptions,
};
use sandbox_gateway_harness::sandbox::SandboxServer;
use serde::de::DeserializeOwned;
use serde::Serialize;
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

/// Whether objects of a `k8s-openapi` scope live in a namespace.
trait Scope {
    const NAMESPACED: bool;
}
impl Scope for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}
impl Scope for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// A Kubernetes kind the manifests may use.
trait Kind: Resource<Scope: Scope> + Metadata<Ty = ObjectMeta> + DeserializeOwned + Serialize {}
impl<K> Kind for K where
    K: Resource<Scope: Scope> + Metadata<Ty = ObjectMeta> + DeserializeOwned + Serialize
{
}

/// The first path where two JSON values differ.
fn difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        // Each key once (not once per side: that doubles the work at every level, and the
        // SandboxPool CRD's schema is deep).
        (Value::Object(x), Value::Object(y)) => x
            .keys()
            .chain(y.keys().filter(|k| !x.contains_key(*k)))
            .find_map(|k| {
                let (a, b) = (x.get(k), y.get(k));
                let null = &Value::Null;
                difference(a.unwrap_or(null), b.unwrap_or(null), &format!("{path}.{k}"))
            }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (x, y))| difference(x, y, &format!("{path}[{i}]"))),
        // The same number: kustomize writes a float schema bound (`maximum: 65535.0`) as an
        // integer.
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        _ => (a != b).then(|| format!("{path}: {a} vs {b}")),
    }
}

/// `doc` (from `file`) as the typed object `K`. Fails naming the file when it is not a valid `K`
/// (wrong apiVersion or kind, a field of the wrong type) or has a field `K` does not know (which
/// serde would otherwise drop silently, like a misspelt key): the typed object must serialize
/// back to exactly the document.
fn typed<K: Kind>(file: &Path, doc: &Value) -> K {
    let what = format!("{}: {} {}", file.display(), K::API_VERSION, K::KIND);
    round_trip(&what, doc)
}

/// `doc` as `T`, which must serialize back to exactly `doc` (see [`typed`]); `what` names it.
fn round_trip<T: DeserializeOwned + Serialize>(what: &str, doc: &Value) -> T {
    let k: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: does not parse: {e}\n{doc}"));
    let back = serde_json::to_value(&k).unwrap();
    if let Some(d) = difference(doc, &back, "") {
        panic!("{what}: the manifest and its typed form differ (a field the schema lacks?) at {d}");
    }
    k
}

/// `doc` (from `file`) as one of the controller's own kinds (kube's CustomResource derive, not
/// k8s-openapi): the same check as [`typed`]. The derive writes `apiVersion` and `kind` from
/// the type, so a wrong one is a difference too.
fn typed_custom<T: DeserializeOwned + Serialize>(file: &Path, doc: &Value) -> T {
    let what = format!(
        "{}: {} {}",
        file.display(),
        doc["apiVersion"].as_str().unwrap_or("?"),
        doc["kind"].as_str().unwrap_or("?")
    );
    round_trip(&what, doc)
}

fn check_pool(file: &Path, doc: &Value) -> (ObjectMeta, bool) {
    (typed_custom::<SandboxPool>(file, doc).metadata, true)
}

fn check_sandbox(file: &Path, doc: &Value) -> (ObjectMeta, bool) {
    (typed_custom::<Sandbox>(file, doc).metadata, true)
}

/// Parses `doc` as `K`; returns its metadata and whether `K` is namespaced.
fn check_kind<K: Kind>(file: &Path, doc: &Value) -> (ObjectMeta, bool) {
    let k = typed::<K>(file, doc);
    (k.metadata().clone(), <K::Scope as Scope>::NAMESPACED)
}

/// Parses a document as one kind: [`check_kind`] for that kind.
type Check = fn(&Path, &Value) -> (ObjectMeta, bool);

/// Every Kubernetes kind under deploy/ (the kustomization is kustomize's, not an API object).
const KINDS: &[(&str, Check)] = &[
    (Namespace::KIND, check_kind::<Namespace>),
    (ServiceAccount::KIND, check_kind::<ServiceAccount>),
    (ClusterRole::KIND, check_kind::<ClusterRole>),
    (ClusterRoleBinding::KIND, check_kind::<ClusterRoleBinding>),
    (Role::KIND, check_kind::<Role>),
    (RoleBinding::KIND, check_kind::<RoleBinding>),
    (ConfigMap::KIND, check_kind::<ConfigMap>),
    (Deployment::KIND, check_kind::<Deployment>),
    (Service::KIND, check_kind::<Service>),
    (PodDisruptionBudget::KIND, check_kind::<PodDisruptionBudget>),
    (
        CustomResourceDefinition::KIND,
        check_kind::<CustomResourceDefinition>,
    ),
    (NetworkPolicy::KIND, check_kind::<NetworkPolicy>),
    // Only in the rendered base (the secretGenerator's output).
    (Secret::KIND, check_kind::<Secret>),
    // The controller's own kinds: the examples.
    ("SandboxPool", check_pool),
    ("Sandbox", check_sandbox),
];

/// Every object of kind `K` under deploy/, typed.
fn all_of<K: Kind>() -> Vec<K> {
    all_docs()
        .iter()
        .filter(|(_, d)| d["kind"] == K::KIND)
        .map(|(f, d)| typed::<K>(f, d))
        .collect()
}

fn find<K: Kind>(name: &str) -> K {
    let mut hits: Vec<K> = all_of::<K>()
        .into_iter()
        .filter(|k| k.metadata().name.as_deref() == Some(name))
        .collect();
    assert_eq!(hits.len(), 1, "expected exactly one {} {name}", K::KIND);
    hits.remove(0)
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

fn container<'a>(list: Option<&'a [Container]>, name: &str) -> &'a Container {
    list.unwrap_or_default()
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name:?}"))
}

fn mount_path<'a>(c: &'a Container, volume: &str) -> &'a str {
    let mounts: &[VolumeMount] = c.volume_mounts.as_deref().unwrap_or_default();
    let m = mounts.iter().find(|m| m.name == volume);
    let m = m.unwrap_or_else(|| panic!("container {} does not mount {volume:?}", c.name));
    &m.mount_path
}

fn bootstrap() -> Value {
    let cm: ConfigMap = find("sandbox-gateway-envoy");
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("envoy.yaml"))
        .expect("data.envoy.yaml");
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

const KUSTOMIZATION: (&str, &str) = ("kustomize.config.k8s.io/v1beta1", "Kustomization");

/// Checks one API object with the [`KINDS`] entry of its kind: its metadata and whether the kind
/// is namespaced.
fn check_doc(f: &Path, d: &Value) -> (String, ObjectMeta, bool) {
    let Some(kind) = d["kind"].as_str() else {
        panic!("{}: a document without kind: {d}", f.display());
    };
    let check = KINDS.iter().find(|(k, _)| *k == kind);
    let (_, check) =
        check.unwrap_or_else(|| panic!("{}: kind {kind} is not checked here", f.display()));
    let (meta, namespaced) = check(f, d);
    (kind.to_string(), meta, namespaced)
}

/// The namespace of the examples (deploy/examples/namespace.yaml); everything else is in
/// `sandbox-gateway`.
const EXAMPLES_NAMESPACE: &str = "sandboxes";

/// A kustomization's `resources`, split into files and directories (other kustomizations).
fn kustomization_resources(dir: &Path) -> (Vec<String>, Vec<String>) {
    let file = dir.join("kustomization.yaml");
    let k = parse_docs(
        &std::fs::read_to_string(&file).unwrap(),
        &file.display().to_string(),
    );
    let (mut files, mut dirs): (Vec<String>, Vec<String>) = k[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .partition(|r| r.ends_with(".yaml") || r.ends_with(".yml"));
    files.sort();
    dirs.sort();
    (files, dirs)
}

/// The YAML files directly under `dir`, but its kustomization.
fn manifests_in(dir: &Path) -> Vec<String> {
    let mut present = Vec::new();
    yaml_files(dir, &mut present);
    let mut present: Vec<String> = present
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    present.sort();
    present
}

#[test]
fn every_manifest_parses_and_the_kustomization_lists_them() {
    let docs = all_docs();
    let mut kustomizations = Vec::new();
    let examples = deploy_dir().join("examples");
    for (f, d) in &docs {
        let (Some(api_version), Some(kind)) = (d["apiVersion"].as_str(), d["kind"].as_str()) else {
            panic!(
                "{}: a document without apiVersion and kind: {d}",
                f.display()
            );
        };
        if (api_version, kind) == KUSTOMIZATION {
            kustomizations.push(f.parent().unwrap().to_path_buf());
            continue;
        }
        let (kind, meta, namespaced) = check_doc(f, d);
        let ns = meta.namespace.as_deref();
        if namespaced {
            let want = if f.starts_with(&examples) {
                EXAMPLES_NAMESPACE
            } else {
                "sandbox-gateway"
            };
            assert_eq!(ns, Some(want), "{}: {kind}", f.display());
        } else {
            assert_eq!(ns, None, "{}: {kind} is cluster-scoped", f.display());
        }
    }
    // The base, and the CRDs it includes. The examples are applied on their own (not a
    // kustomization): they need the CRDs to be established first.
    kustomizations.sort();
    let (base, crds) = (deploy_dir().join("base"), deploy_dir().join("crds"));
    assert_eq!(kustomizations, [base.clone(), crds.clone()]);
    let (files, dirs) = kustomization_resources(&base);
    assert_eq!(
        files,
        manifests_in(&base),
        "kustomization resources vs files in deploy/base"
    );
    assert_eq!(
        dirs,
        ["../crds"],
        "the base includes the CRDs' kustomization"
    );
    let (files, dirs) = kustomization_resources(&crds);
    assert_eq!(
        files,
        manifests_in(&crds),
        "kustomization resources vs files in deploy/crds"
    );
    assert!(dirs.is_empty());
    let crd_kinds: Vec<String> = all_of::<CustomResourceDefinition>()
        .iter()
        .map(|c| c.spec.names.kind.clone())
        .collect();
    assert_eq!(crd_kinds, ["SandboxPool", "Sandbox"]);
}

#[test]
fn committed_bootstrap_is_what_the_generator_makes() {
    use sandbox_gateway_deploy_gen::{generate_in, DEPLOY_TEMPLATE, OUTPUT, SHARED_TEMPLATE};
    let root = repo_root();
    let fresh = generate_in(&root).unwrap_or_else(|e| panic!("{e}"));
    let committed = std::fs::read_to_string(root.join(OUTPUT)).unwrap();
    if fresh != committed {
        let line = fresh
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(fresh.lines().count().min(committed.lines().count()));
        panic!(
            "{OUTPUT} is not what {SHARED_TEMPLATE} and {DEPLOY_TEMPLATE} make (first difference \
             at line {}): run `make deploy-bootstrap`",
            line + 1
        );
    }
}

fn assert_read_only_pods(rules: Option<&[PolicyRule]>, what: &str) {
    let read = |group: &str, resource: &str| PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(vec![resource.into()]),
        verbs: vec!["get".into(), "list".into(), "watch".into()],
        ..Default::default()
    };
    // Pods (the routes) and Sandboxes (the paused markers, for `wake`): read-only.
    let expected = [read("", "pods"), read("sandboxgateway.io", "sandboxes")];
    assert_eq!(
        rules,
        Some(&expected[..]),
        "{what} must grant exactly get/list/watch on pods and sandboxes"
    );
}

#[test]
fn rbac_grants_exactly_read_on_pods() {
    // The gateway's and the controller's (controller_rbac_is_exactly_what_the_code_calls).
    let names = |v: Vec<ObjectMeta>| -> Vec<String> {
        let mut n: Vec<String> = v.into_iter().map(|m| m.name.unwrap()).collect();
        n.sort();
        n
    };
    let roles = all_of::<ClusterRole>();
    assert_eq!(
        names(roles.iter().map(|r| r.metadata.clone()).collect()),
        ["sandbox-controller", "sandbox-gateway-pod-reader"]
    );
    assert_eq!(
        names(all_of::<Role>().into_iter().map(|r| r.metadata).collect()),
        ["sandbox-controller"],
        "no Role but the controller's"
    );
    let role: ClusterRole = find("sandbox-gateway-pod-reader");
    assert_read_only_pods(role.rules.as_deref(), "the ClusterRole");

    let binding: ClusterRoleBinding = find("sandbox-gateway-pod-reader");
    assert_eq!(binding.role_ref.api_group, ClusterRole::GROUP);
    assert_eq!(binding.role_ref.kind, ClusterRole::KIND);
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let sa = [Subject {
        kind: ServiceAccount::KIND.into(),
        name: "sandbox-gateway".into(),
        namespace: Some("sandbox-gateway".into()),
        api_group: None,
    }];
    assert_eq!(binding.subjects.as_deref(), Some(&sa[..]));
    // Nothing else is bound to the gateway's ServiceAccount.
    assert_eq!(
        bound_rules("sandbox-gateway").len(),
        6,
        "get/list/watch pods and sandboxes"
    );
    let _: ServiceAccount = find("sandbox-gateway");
    let dep: Deployment = find("sandbox-gateway");
    let pod = dep.spec.and_then(|s| s.template.spec).expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("sandbox-gateway"));

    // The commented single-namespace alternative grants the same and nothing more.
    let file = deploy_dir().join("base/rbac.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
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
    let role: Role = typed(&file, &alt[0]);
    assert_read_only_pods(role.rules.as_deref(), "the commented Role");
    let binding: RoleBinding = typed(&file, &alt[1]);
    assert_eq!(
        (binding.role_ref.kind.as_str(), Some(&binding.role_ref.name)),
        (Role::KIND, role.metadata.name.as_ref())
    );
    assert_eq!(binding.metadata.namespace, role.metadata.namespace);
    assert_eq!(binding.subjects.as_deref(), Some(&sa[..]));
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

    // The ops listener exposes the module's readiness path (through the sandbox listener) and
    // exactly two admin paths, GET only.
    let ops = hcm(&b, "ops");
    let routes = ops["route_config"]["virtual_hosts"][0]["routes"]
        .as_array()
        .unwrap();
    let paths: Vec<(&str, &str)> = routes
        .iter()
        .map(|r| {
            let m = &r["match"];
            assert_eq!(m["headers"][0]["string_match"]["exact"], "GET", "{m}");
            (
                m["path"].as_str().unwrap(),
                r["route"]["cluster"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        paths,
        [
            (READY_PATH, "sandbox_listener"),
            ("/ready", "envoy_admin"),
            ("/stats/prometheus", "envoy_admin")
        ]
    );
    let endpoint = |cluster: &str| {
        let c = named(&b["static_resources"]["clusters"], cluster);
        address(&c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"])
    };
    assert_eq!(endpoint("envoy_admin"), "127.0.0.1:9901");
    assert_eq!(endpoint("sandbox_listener"), "127.0.0.1:8080");
    // In front of the router: Envoy's health check filter, passing the probe through unless the
    // health check has been failed, and for that path only.
    let filters = ops["http_filters"].as_array().unwrap();
    let names: Vec<&str> = filters
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "envoy.filters.http.health_check",
            "envoy.filters.http.router"
        ]
    );
    let hc = &filters[0]["typed_config"];
    assert_eq!(hc["pass_through_mode"], true);
    assert_eq!(
        hc["headers"],
        json!([{"name": ":path", "string_match": {"exact": READY_PATH}}])
    );
    // Never on the sandbox listener: it would run on every sandbox request.
    assert!(!hcm(&b, "sandboxes").to_string().contains("health_check"));

    let mut cfg = module_config(&b);
    assert_eq!(cfg["route_source"]["type"], "kubernetes");
    // The token file is the mounted Secret (checked in token_secret_is_wired_into_both_pods);
    // here a stand-in, since the parser reads it.
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "t").unwrap();
    cfg["activity_report"]["token_file"] = json!(token.path());
    cfg["wake"]["token_file"] = json!(token.path());
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
    let dep: Deployment = find("sandbox-gateway");
    let spec = dep.spec.as_ref().expect("Deployment spec");
    assert_eq!(spec.replicas, Some(2));
    let rolling = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    assert_eq!(
        rolling.and_then(|r| r.max_unavailable.as_ref()),
        Some(&IntOrString::Int(0))
    );
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    assert!(labels.is_some_and(|l| !l.is_empty()), "pod labels");
    assert_eq!(spec.selector.match_labels.as_ref(), labels);
    let pdb: PodDisruptionBudget = find("sandbox-gateway");
    let pdb_selector = pdb.spec.as_ref().and_then(|s| s.selector.as_ref());
    assert_eq!(pdb_selector.and_then(|s| s.match_labels.as_ref()), labels);
    let svc: Service = find("sandbox-gateway");
    let svc = svc.spec.as_ref().expect("Service spec");
    assert_eq!(svc.selector.as_ref(), labels);
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(
        pod.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root),
        Some(true)
    );

    let envoy = container(Some(&pod.containers), "envoy");
    assert_eq!(envoy.image.as_deref(), Some("envoyproxy/envoy:v1.40.0"));
    let env = envoy.env.as_deref().unwrap_or_default();
    let env = env
        .iter()
        .find(|e| e.name == "ENVOY_DYNAMIC_MODULES_SEARCH_PATH")
        .expect("ENVOY_DYNAMIC_MODULES_SEARCH_PATH");
    assert_eq!(Some(mount_path(envoy, "modules")), env.value.as_deref());
    let init = container(pod.init_containers.as_deref(), "module");
    assert_eq!(init.image.as_deref(), Some("sandbox-gateway-module"));
    let shared = mount_path(init, "modules");
    let cmd = init.command.as_deref().unwrap_or_default();
    assert!(
        cmd.iter().any(|c| c == "/modules/libsandbox_gateway.so")
            && cmd.last() == Some(&format!("{shared}/")),
        "{cmd:?}"
    );
    for c in [envoy, init] {
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_eq!(
            (sc.read_only_root_filesystem, sc.allow_privilege_escalation),
            (Some(true), Some(false)),
            "{}",
            c.name
        );
        let drop = sc.capabilities.as_ref().and_then(|c| c.drop.as_deref());
        assert_eq!(drop, Some(&["ALL".to_string()][..]), "{}", c.name);
    }
    let args = envoy.args.as_deref().unwrap_or_default();
    assert!(args
        .windows(2)
        .any(|w| w == ["--config-path", "/etc/envoy/envoy.yaml"]));
    assert_eq!(mount_path(envoy, "envoy-config"), "/etc/envoy");
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let config = volumes.iter().find(|v| v.name == "envoy-config");
    assert_eq!(
        config
            .and_then(|v| v.config_map.as_ref())
            .map(|c| c.name.as_str()),
        Some("sandbox-gateway-envoy"),
        "the envoy-config volume is the bootstrap ConfigMap"
    );

    // Readiness is the module's (synced routes), asked through the ops listener.
    let probe = envoy
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref());
    let probe = probe.expect("readinessProbe.httpGet");
    assert_eq!(probe.path.as_deref(), Some(READY_PATH));
    let IntOrString::String(probe_port) = &probe.port else {
        panic!("the readiness probe names its port: {:?}", probe.port);
    };
    let port = |name: &str| {
        let ports = envoy.ports.as_deref().unwrap_or_default();
        let p = ports.iter().find(|p| p.name.as_deref() == Some(name));
        p.unwrap_or_else(|| panic!("no container port {name:?}"))
            .container_port
    };
    let ops = bootstrap();
    let ops = named(&ops["static_resources"]["listeners"], "ops");
    assert_eq!(
        json!(port(probe_port)),
        ops["address"]["socket_address"]["port_value"]
    );
    assert_eq!(port("http"), 8080);
    // The Service sends client traffic to that port.
    let svc_ports = svc.ports.as_deref().unwrap_or_default();
    assert_eq!(
        svc_ports
            .iter()
            .map(|p| p.target_port.clone())
            .collect::<Vec<_>>(),
        [Some(IntOrString::String("http".into()))]
    );

    // The drain fits in the grace period: drain time < preStop sleep < grace period.
    let pre_stop = envoy
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.as_ref())
        .expect("preStop exec command")
        .join(" ");
    // The health check is failed first (the probe turns 503 at once), then the drain starts.
    let fail_at = pre_stop
        .find("/healthcheck/fail")
        .expect("preStop fails the health check");
    let drain_at = pre_stop
        .find("/drain_listeners?graceful")
        .expect("preStop drains the listeners");
    assert!(
        fail_at < drain_at && pre_stop.matches("--post-data").count() == 2,
        "{pre_stop}"
    );
    let sleep: i64 = pre_stop
        .split("sleep ")
        .nth(1)
        .unwrap()
        .trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap();
    let drain: i64 = args.windows(2).find(|w| w[0] == "--drain-time-s").unwrap()[1]
        .parse()
        .unwrap();
    let grace = pod.termination_grace_period_seconds.expect("grace period");
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
    // The admin API and the sandbox listener are also upstreams of the ops listener, so their
    // ports are chosen here; the ops listener's is Envoy's.
    let (admin_port, sandbox_port) = (free_port(), free_port());
    b["admin"]["address"]["socket_address"]["port_value"] = json!(admin_port);
    for l in b["static_resources"]["listeners"].as_array_mut().unwrap() {
        let port = if l["name"] == "sandboxes" {
            sandbox_port
        } else {
            0
        };
        l["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": port});
    }
    for (cluster, port) in [
        ("envoy_admin", admin_port),
        ("sandbox_listener", sandbox_port),
    ] {
        let clusters = b["static_resources"]["clusters"].as_array_mut().unwrap();
        let c = clusters.iter_mut().find(|c| c["name"] == cluster).unwrap();
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"]["port_value"] = json!(port);
    }
    let mut cfg = module_config(&b);
    cfg["route_source"]["kubeconfig"] = json!(kubeconfig);
    // No sandbox-extproc here: a token stand-in, and reports to a closed loopback port.
    let token = dir.path().join("activity-token");
    std::fs::write(&token, "t").unwrap();
    cfg["activity_report"] =
        json!({"endpoint": format!("http://127.0.0.1:{}", free_port()), "token_file": token});
    // No controller either: wakes go to a closed loopback port (nothing here is paused).
    cfg["wake"] =
        json!({"endpoint": format!("http://127.0.0.1:{}", free_port()), "token_file": token});
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
    // Only labelled objects are ever read: route pods, and (for `wake`) paused Sandboxes.
    let log = api.request_log();
    assert!(
        log.iter().all(|r| (r.starts_with("/api/v1/pods?")
            && r.contains("labelSelector=sandboxgateway.io%2Fsandbox-id"))
            || (r.starts_with("/apis/sandboxgateway.io/v1alpha1/sandboxes?")
                && r.contains("labelSelector=sandboxgateway.io%2Fpaused"))),
        "{log:?}"
    );

    // The ops listener: the readiness probe, answered by the module through the sandbox
    // listener (synced: the pod list is in).
    let ops = listener_addr(envoy.admin, "ops");
    let probe = client::get(ops, READY_PATH, &[]).await.unwrap();
    assert_eq!(probe.status, 200, "{}", probe.text());
    assert_eq!(probe.json(), json!({"ready": true, "routes": 1}));
    // Envoy's own state, and metrics, from the admin API; nothing else of it.
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

    // The preStop hook's first step: the probe turns 503 at once, Envoy's health-check filter
    // answering it, while sandbox traffic is still served (the drain has not even begun).
    let admin = envoy.admin;
    tokio::task::spawn_blocking(move || admin_post(admin, "/healthcheck/fail"))
        .await
        .unwrap()
        .unwrap();
    let probe = client::get(ops, READY_PATH, &[]).await.unwrap();
    assert_eq!(probe.status, 503, "{}", probe.text());
    assert_eq!(
        probe.header("x-envoy-immediate-health-check-fail"),
        Some("true")
    );
    let mut pod = api.get("sandboxes", "alpha-0").unwrap();
    set_ready(&mut pod, true);
    api.apply(pod);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client::get(gw, "/", &[("x-sandbox-id", "alpha")])
        .await
        .unwrap()
        .status
        != 200
    {
        assert!(Instant::now() < deadline, "not routed again while draining");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And back: the probe is the module's again.
    tokio::task::spawn_blocking(move || admin_post(admin, "/healthcheck/ok"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client::get(ops, READY_PATH, &[]).await.unwrap().status, 200);
}

fn pod_labels(dep: &Deployment) -> Value {
    let spec = dep.spec.as_ref().expect("Deployment spec");
    json!(spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref()))
}

/// The ports sandbox-extproc serves gRPC on (container ports named `grpc-*`).
fn extproc_grpc_ports(dep: &Deployment) -> Vec<i32> {
    let pod = dep.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    let c = container(pod.map(|p| &p.containers[..]), "extproc");
    let mut ports: Vec<i32> = c
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|p| p.name.as_deref().is_some_and(|n| n.starts_with("grpc-")))
        .map(|p| p.container_port)
        .collect();
    ports.sort();
    ports
}

#[test]
fn extproc_is_reachable_only_from_gateways_and_the_controller() {
    let extproc: Deployment = find("sandbox-extproc");
    let gateway: Deployment = find("sandbox-gateway");
    let np: NetworkPolicy = find("sandbox-extproc");
    let spec = np.spec.as_ref().expect("NetworkPolicy spec");
    let selector = spec.pod_selector.as_ref().expect("podSelector");
    assert_eq!(
        json!(selector.match_labels),
        pod_labels(&extproc),
        "selects the sandbox-extproc pods"
    );
    assert!(selector.match_expressions.is_none());
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_string()][..])
    );
    let rules = spec.ingress.as_deref().unwrap_or_default();
    assert_eq!(rules.len(), 1, "one rule: nothing else is admitted");
    let from = rules[0].from.as_deref().unwrap_or_default();
    let sources: Vec<Value> = from
        .iter()
        .map(|peer| {
            assert!(
                peer.namespace_selector.is_none() && peer.ip_block.is_none(),
                "pods of this namespace only: {peer:?}"
            );
            let sel = peer.pod_selector.as_ref().expect("a podSelector");
            assert!(sel.match_expressions.is_none());
            json!(sel.match_labels)
        })
        .collect();
    assert_eq!(
        sources,
        [
            pod_labels(&gateway),
            json!({"app.kubernetes.io/name": "sandbox-controller"})
        ],
        "exactly the gateway pods and the controller"
    );
    let mut ports: Vec<i32> = rules[0]
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| match &p.port {
            Some(IntOrString::Int(n)) => *n,
            other => panic!("numeric ports: {other:?}"),
        })
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        extproc_grpc_ports(&extproc),
        "the ext_proc and ActivityService ports"
    );
    // The headless Service the controller resolves (every replica) selects the same pods.
    let svc: Service = find("sandbox-extproc");
    let svc = svc.spec.as_ref().expect("Service spec");
    assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
    assert_eq!(json!(svc.selector), pod_labels(&extproc));
}

#[test]
fn token_secret_is_wired_into_both_pods() {
    let k = parse_docs(
        &std::fs::read_to_string(deploy_dir().join("base/kustomization.yaml")).unwrap(),
        "k",
    );
    let generated = named(&k[0]["secretGenerator"], "sandbox-activity-token");
    assert_eq!(generated["files"], json!(["token=activity-token"]));
    // The token itself is never committed.
    let ignore = std::fs::read_to_string(deploy_dir().join("base/.gitignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "activity-token"), "{ignore}");

    // (container, the file it reads) for both pods, from the Secret's `token` key.
    let token_path = |dep: &Deployment, cname: &str| -> String {
        let pod = dep
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .unwrap();
        let vols = pod.volumes.as_deref().unwrap_or_default();
        let v = vols
            .iter()
            .find(|v| v.name == "activity-token")
            .expect("activity-token volume");
        assert_eq!(
            v.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
            Some("sandbox-activity-token"),
            "{cname}: the generated Secret"
        );
        let c = container(Some(&pod.containers), cname);
        format!("{}/token", mount_path(c, "activity-token"))
    };
    let gateway: Deployment = find("sandbox-gateway");
    let module = module_config(&bootstrap());
    assert_eq!(
        module["activity_report"]["token_file"],
        json!(token_path(&gateway, "envoy")),
        "the module reads the mounted token"
    );
    let extproc: Deployment = find("sandbox-extproc");
    let pod = extproc
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .unwrap();
    let c = container(Some(&pod.containers), "extproc");
    let env = c.env.as_deref().unwrap_or_default();
    let env = env
        .iter()
        .find(|e| e.name == "SANDBOX_EXTPROC_ACTIVITY_TOKEN_FILE")
        .expect("SANDBOX_EXTPROC_ACTIVITY_TOKEN_FILE");
    assert_eq!(env.value, Some(token_path(&extproc, "extproc")));

    // The module reports to the extproc Service's ActivityService port.
    let svc: Service = find("sandbox-extproc");
    let port = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| {
            p.iter()
                .find(|p| p.name.as_deref() == Some("grpc-activity"))
        })
        .expect("grpc-activity port")
        .port;
    assert_eq!(
        module["activity_report"]["endpoint"],
        json!(format!("http://sandbox-extproc:{port}"))
    );

    // sandbox-extproc's own config is accepted by the gateway's parser, and mounted where
    // --config points.
    let cm: ConfigMap = find("sandbox-extproc");
    let cfg = cm
        .data
        .as_ref()
        .and_then(|d| d.get("config.json"))
        .expect("config.json");
    GatewayConfig::from_json(cfg.as_bytes())
        .unwrap_or_else(|e| panic!("sandbox-extproc rejects its config: {e}"));
    let args = c.args.as_deref().unwrap_or_default();
    let config_arg = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .expect("--config")[1]
        .clone();
    assert_eq!(
        config_arg,
        format!("{}/config.json", mount_path(c, "config"))
    );
    let vols = pod.volumes.as_deref().unwrap_or_default();
    let v = vols
        .iter()
        .find(|v| v.name == "config")
        .expect("config volume");
    assert_eq!(
        v.config_map.as_ref().map(|c| c.name.as_str()),
        Some("sandbox-extproc")
    );
}

/// One permission: (where: `*` cluster-wide or a namespace, API group, resource, resource
/// names, verb).
type Grant = (String, String, String, Vec<String>, String);

fn grants(scope: &str, rules: Option<&[PolicyRule]>) -> Vec<Grant> {
    let mut out = Vec::new();
    for r in rules.unwrap_or_default() {
        assert!(r.non_resource_urls.is_none(), "{r:?}");
        for g in r.api_groups.as_deref().unwrap_or_default() {
            for res in r.resources.as_deref().unwrap_or_default() {
                for v in &r.verbs {
                    let names = r.resource_names.clone().unwrap_or_default();
                    out.push((scope.into(), g.clone(), res.clone(), names, v.clone()));
                }
            }
        }
    }
    out
}

/// Everything bound to the ServiceAccount `sa` of `sandbox-gateway`, through any binding.
fn bound_rules(sa: &str) -> std::collections::BTreeSet<Grant> {
    let subject = Subject {
        kind: ServiceAccount::KIND.into(),
        name: sa.into(),
        namespace: Some("sandbox-gateway".into()),
        api_group: None,
    };
    let binds = |s: &Option<Vec<Subject>>| s.as_deref().unwrap_or_default().contains(&subject);
    let mut out = std::collections::BTreeSet::new();
    for b in all_of::<ClusterRoleBinding>() {
        if binds(&b.subjects) {
            assert_eq!(b.role_ref.kind, ClusterRole::KIND);
            let role: ClusterRole = find(&b.role_ref.name);
            out.extend(grants("*", role.rules.as_deref()));
        }
    }
    for b in all_of::<RoleBinding>() {
        if binds(&b.subjects) {
            let ns = b.metadata.namespace.clone().unwrap();
            let rules = if b.role_ref.kind == Role::KIND {
                let role: Role = find(&b.role_ref.name);
                assert_eq!(role.metadata.namespace.as_deref(), Some(&ns[..]));
                role.rules
            } else {
                find::<ClusterRole>(&b.role_ref.name).rules
            };
            out.extend(grants(&ns, rules.as_deref()));
        }
    }
    out
}

/// The controller's Deployment's pod spec and its container.
fn controller_pod() -> (Deployment, k8s_openapi::api::core::v1::PodSpec, Container) {
    let dep: Deployment = find("sandbox-controller");
    let pod = dep
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    let c = container(Some(&pod.containers), "controller").clone();
    (dep, pod, c)
}

/// The value after `flag` in `args` (`--flag value`).
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let w = args.windows(2).find(|w| w[0] == flag);
    &w.unwrap_or_else(|| panic!("no {flag} in {args:?}"))[1]
}

/// The API calls route-controller/src makes (`sandbox-controller run`), as RBAC grants; see the
/// comments in deploy/base/controller-rbac.yaml for which call needs which verb. A new verb
/// here, in the manifest or in the code, must change all three.
#[test]
fn controller_rbac_is_exactly_what_the_code_calls() {
    let cluster = |group: &str, resource: &str, verbs: &[&str]| -> Vec<Grant> {
        verbs
            .iter()
            .map(|v| {
                let names = Vec::new();
                (
                    "*".into(),
                    group.into(),
                    resource.into(),
                    names,
                    v.to_string(),
                )
            })
            .collect()
    };
    let ns = |resource: (&str, &str), names: &[&str], verbs: &[&str]| -> Vec<Grant> {
        verbs
            .iter()
            .map(|v| {
                let names = names.iter().map(|n| n.to_string()).collect();
                let (g, r) = (resource.0.into(), resource.1.into());
                ("sandbox-gateway".into(), g, r, names, v.to_string())
            })
            .collect()
    };
    let sgw = "sandboxgateway.io";
    let want: std::collections::BTreeSet<Grant> = [
        cluster(
            "",
            "pods",
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        cluster("", "secrets", &["get", "list", "watch", "create"]),
        cluster(sgw, "sandboxes", &["get", "list", "watch", "patch"]),
        cluster(sgw, "sandboxes/status", &["patch"]),
        cluster(sgw, "sandboxes/finalizers", &["update"]),
        cluster(sgw, "sandboxpools", &["get", "list", "watch"]),
        cluster(sgw, "sandboxpools/status", &["patch"]),
        cluster(sgw, "sandboxpools/finalizers", &["update"]),
        cluster("events.k8s.io", "events", &["create", "patch"]),
        cluster("", "persistentvolumeclaims", &["create", "get"]),
        ns(
            ("coordination.k8s.io", "leases"),
            &["sandbox-controller"],
            &["get", "update"],
        ),
        ns(("coordination.k8s.io", "leases"), &[], &["create"]),
        ns(("discovery.k8s.io", "endpointslices"), &[], &["list"]),
    ]
    .into_iter()
    .flatten()
    .collect();
    let have = bound_rules("sandbox-controller");
    let extra: Vec<_> = have.difference(&want).collect();
    let missing: Vec<_> = want.difference(&have).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "sandbox-controller's RBAC: granted but not needed {extra:?}; needed but not granted \
         {missing:?}"
    );

    // The namespaced rules are where the Lease and the EndpointSlices are: the Deployment's
    // namespace (the Lease's, from POD_NAMESPACE) and the --activity-service namespace.
    let (dep, _, c) = controller_pod();
    let args = c.args.as_deref().unwrap_or_default();
    assert!(
        !args.iter().any(|a| a == "--lease-namespace"),
        "the Lease is in POD_NAMESPACE"
    );
    assert_eq!(dep.metadata.namespace.as_deref(), Some("sandbox-gateway"));
    assert_eq!(flag(args, "--lease-name"), "sandbox-controller");
    let service = flag(args, "--activity-service");
    assert!(service.starts_with("sandbox-gateway/"), "{service}");

    // Every rule says, in the comment right above it, why each of its verbs is needed
    // (`#   verb: why`, or `#   verb, verb: why`).
    let file = deploy_dir().join("base/controller-rbac.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let comments: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("- apiGroups:"))
        .map(|(i, _)| {
            let above = lines[..i].iter().rev().take_while(|l| l.starts_with('#'));
            above.map(|l| format!("{l}\n")).collect()
        })
        .collect();
    let mut rules: Vec<PolicyRule> = Vec::new();
    for d in parse_docs(&text, "controller-rbac.yaml") {
        match d["kind"].as_str() {
            Some("ClusterRole") => rules.extend(typed::<ClusterRole>(&file, &d).rules.unwrap()),
            Some("Role") => rules.extend(typed::<Role>(&file, &d).rules.unwrap()),
            _ => {}
        }
    }
    assert_eq!(comments.len(), rules.len());
    for (comment, rule) in comments.iter().zip(&rules) {
        for v in &rule.verbs {
            assert!(
                comment.contains(&format!(" {v}:")) || comment.contains(&format!(" {v}, ")),
                "the comment above the rule {:?} does not say why {v:?}:\n{comment}",
                rule.resources
            );
        }
    }
}

#[test]
fn controller_deployment_wiring_is_consistent() {
    let (dep, pod, c) = controller_pod();
    let _: ServiceAccount = find("sandbox-controller");
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("sandbox-controller")
    );
    let spec = dep.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2), "a leader and a warm standby");
    let args = c.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert!(args.iter().any(|a| a == "--leader-elect"), "{args:?}");
    assert_eq!(c.image.as_deref(), Some("sandbox-controller"));
    let k = parse_docs(
        &std::fs::read_to_string(deploy_dir().join("base/kustomization.yaml")).unwrap(),
        "k",
    );
    named(&k[0]["images"], "sandbox-controller");

    // The Lease identity and namespace from the downward API.
    let env = c.env.as_deref().unwrap_or_default();
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let e = env.iter().find(|e| e.name == name);
        let e = e.unwrap_or_else(|| panic!("no {name}"));
        let field = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
        assert_eq!(field.map(|f| f.field_path.as_str()), Some(path), "{name}");
    }

    // Its pods carry the labels the Deployment selects, the PDB covers and the NetworkPolicy
    // admits to sandbox-extproc.
    let labels = pod_labels(&dep);
    assert_eq!(json!(spec.selector.match_labels), labels);
    let pdb: PodDisruptionBudget = find("sandbox-controller");
    let pdb = pdb.spec.as_ref().unwrap();
    assert_eq!(json!(pdb.selector.as_ref().unwrap().match_labels), labels);
    assert_eq!(pdb.min_available, Some(IntOrString::Int(1)));
    let np: NetworkPolicy = find("sandbox-extproc");
    let np = np.spec.as_ref().unwrap();
    let rule = &np.ingress.as_deref().unwrap()[0];
    let admitted = rule.from.as_deref().unwrap().iter().any(|peer| {
        let sel = peer
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref());
        sel.is_some_and(|m| m.iter().all(|(k, v)| labels[k] == json!(v)))
    });
    assert!(
        admitted,
        "the NetworkPolicy does not admit the controller pods {labels}"
    );

    // --activity-service names the headless sandbox-extproc Service, on its ActivityService
    // port, which the NetworkPolicy admits and the extproc container serves.
    let service = flag(args, "--activity-service");
    let (ns, rest) = service.split_once('/').expect("namespace/name:port");
    let (name, port) = rest.rsplit_once(':').expect("namespace/name:port");
    let port: i32 = port.parse().unwrap();
    assert_eq!(ns, dep.metadata.namespace.as_deref().unwrap());
    let svc: Service = find(name);
    assert_eq!(svc.metadata.namespace.as_deref(), Some(ns));
    let svc = svc.spec.as_ref().unwrap();
    assert_eq!(
        svc.cluster_ip.as_deref(),
        Some("None"),
        "{name} is headless"
    );
    let sp = svc.ports.as_deref().unwrap_or_default();
    let sp = sp.iter().find(|p| p.port == port);
    let sp = sp.unwrap_or_else(|| panic!("{name} has no port {port}"));
    assert_eq!(sp.name.as_deref(), Some("grpc-activity"));
    let extproc: Deployment = find("sandbox-extproc");
    assert_eq!(json!(svc.selector), pod_labels(&extproc));
    let epod = extproc.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    let ec = container(epod.map(|p| &p.containers[..]), "extproc");
    let cp = ec.ports.as_deref().unwrap_or_default();
    let cp = cp
        .iter()
        .find(|p| p.name.as_deref() == Some("grpc-activity"));
    assert_eq!(
        cp.map(|p| p.container_port),
        Some(port),
        "the endpoints' port"
    );
    let np_ports = rule.ports.as_deref().unwrap_or_default();
    assert!(np_ports
        .iter()
        .any(|p| p.port == Some(IntOrString::Int(port))));

    // The token: the same generated Secret as the gateway and sandbox-extproc, at the file
    // --activity-token-file reads.
    let vols = pod.volumes.as_deref().unwrap_or_default();
    let v = vols.iter().find(|v| v.name == "activity-token");
    let secret = v
        .and_then(|v| v.secret.as_ref())
        .and_then(|s| s.secret_name.as_deref());
    assert_eq!(secret, Some("sandbox-activity-token"));
    assert_eq!(
        flag(args, "--activity-token-file"),
        format!("{}/token", mount_path(&c, "activity-token"))
    );

    // Two ports: `metrics`, where --metrics-bind-address listens (the probes use it), and
    // `grpc-wake`, where --wake-bind-address does.
    let bind: SocketAddr = flag(args, "--metrics-bind-address").parse().unwrap();
    let wake: SocketAddr = flag(args, "--wake-bind-address").parse().unwrap();
    let ports = c.ports.as_deref().unwrap_or_default();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0].name.as_deref(), Some("metrics"));
    assert_eq!(ports[0].container_port, i32::from(bind.port()));
    assert_eq!(ports[1].name.as_deref(), Some("grpc-wake"));
    assert_eq!(ports[1].container_port, i32::from(wake.port()));
    // The WakeService: the same token file as the ActivityService; a headless Service over
    // every controller pod on that port; the gateways' module config dials it; the
    // NetworkPolicy admits the gateway pods (and only them) to it.
    assert_eq!(
        flag(args, "--wake-token-file"),
        flag(args, "--activity-token-file")
    );
    let wsvc: Service = find("sandbox-controller-wake");
    let wspec = wsvc.spec.as_ref().unwrap();
    assert_eq!(wspec.cluster_ip.as_deref(), Some("None"), "headless");
    assert_eq!(json!(wspec.selector), labels);
    let wp = &wspec.ports.as_deref().unwrap_or_default()[0];
    assert_eq!(
        wp.target_port,
        Some(IntOrString::String("grpc-wake".into()))
    );
    let module = module_config(&bootstrap());
    assert_eq!(
        module["wake"]["endpoint"],
        json!(format!("http://sandbox-controller-wake:{}", wp.port))
    );
    assert_eq!(
        module["wake"]["token_file"],
        module["activity_report"]["token_file"]
    );
    let cnp: NetworkPolicy = find("sandbox-controller");
    let cnp = cnp.spec.as_ref().unwrap();
    assert_eq!(
        json!(cnp
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())),
        labels
    );
    let rules = cnp.ingress.as_deref().unwrap();
    let gateway: Deployment = find("sandbox-gateway");
    let gw_labels = pod_labels(&gateway);
    let wake_rule = rules
        .iter()
        .find(|r| {
            r.ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|p| p.port == Some(IntOrString::Int(i32::from(wake.port()))))
        })
        .expect("a rule for the WakeService port");
    let from = wake_rule
        .from
        .as_deref()
        .expect("the wake port is not open to all");
    assert_eq!(from.len(), 1);
    let sel = from[0]
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref());
    assert!(sel.is_some_and(|m| m.iter().all(|(k, v)| gw_labels[k] == json!(v))));
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref());
        let get = get.unwrap_or_else(|| panic!("no {path} probe"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("metrics".into()));
    }

    // The status URLs are the gateway's Host routing for its configured domain.
    let url = flag(args, "--url-template");
    let module = module_config(&bootstrap());
    let domain = module["host_domains"][0].as_str().expect("host_domains");
    assert!(
        url.ends_with(&format!("://{{port}}-{{id}}.{domain}")),
        "{url} vs {domain}"
    );

    // Hardened like the gateway's pods.
    let psc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(
        (sc.read_only_root_filesystem, sc.allow_privilege_escalation),
        (Some(true), Some(false))
    );
    let drop = sc.capabilities.as_ref().and_then(|c| c.drop.as_deref());
    assert_eq!(drop, Some(&["ALL".to_string()][..]));
    let res = c.resources.as_ref().expect("resources");
    assert!(
        res.requests.is_some()
            && res
                .limits
                .as_ref()
                .is_some_and(|l| l.contains_key("memory"))
    );
}

#[test]
fn examples_are_valid_for_the_controller() {
    let dir = deploy_dir().join("examples");
    let one = |file: &str| -> Value {
        let f = dir.join(file);
        let mut docs = parse_docs(&std::fs::read_to_string(&f).unwrap(), file);
        assert_eq!(docs.len(), 1, "{file}");
        docs.remove(0)
    };
    let pool: SandboxPool = typed_custom(&dir.join("pool.yaml"), &one("pool.yaml"));
    let settings = PoolSettings::resolve(&pool.spec)
        .unwrap_or_else(|e| panic!("the controller rejects the example pool: {e}"));
    assert_eq!(settings.replicas, 3);
    assert_eq!(settings.port, 8080);
    assert_eq!(settings.idle_timeout, Some(Duration::from_secs(15 * 60)));
    assert_eq!(settings.max_lifetime, Some(Duration::from_secs(8 * 3600)));
    let tmpl = pool.spec.template.spec.as_ref().unwrap();
    let c = container(Some(&tmpl.containers), "sandbox");
    assert_eq!(c.image.as_deref(), Some("python:3.12-slim"));
    let served = c.command.as_deref().unwrap_or_default().join(" ");
    assert!(served.starts_with("python -m http.server 8080"), "{served}");

    let sbx: Sandbox = typed_custom(&dir.join("sandbox.yaml"), &one("sandbox.yaml"));
    assert_eq!(Some(&sbx.spec.pool_ref), pool.metadata.name.as_ref());
    assert_eq!(sbx.metadata.namespace, pool.metadata.namespace);
    SandboxSettings::resolve(&sbx.spec, &settings)
        .unwrap_or_else(|e| panic!("the controller rejects the example sandbox: {e}"));
    let ns: Namespace = typed(&dir.join("namespace.yaml"), &one("namespace.yaml"));
    assert_eq!(ns.metadata.name.as_deref(), Some(EXAMPLES_NAMESPACE));
    assert_eq!(pool.metadata.namespace.as_deref(), Some(EXAMPLES_NAMESPACE));
}

/// The SandboxPool CRD (the whole PodTemplateSpec schema) is larger than the 256 KiB
/// `kubectl.kubernetes.io/last-applied-configuration` annotation a client-side apply writes, so
/// every apply of the base the docs show is server-side.
#[test]
fn docs_apply_the_base_server_side() {
    let crds = std::fs::read_to_string(deploy_dir().join("crds/sandboxgateway.io.yaml")).unwrap();
    assert!(
        crds.len() > 256 * 1024,
        "the reason is gone: {} bytes",
        crds.len()
    );
    let readme = std::fs::read_to_string(deploy_dir().join("README.md")).unwrap();
    assert!(
        readme.contains("kubectl apply --server-side -k deploy/base"),
        "deploy/README.md must say to apply with `kubectl apply --server-side -k deploy/base`"
    );
    for file in [
        "README.md",
        "base/kustomization.yaml",
        "crds/kustomization.yaml",
    ] {
        let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
        for line in text.lines() {
            if line.contains("kubectl apply") && line.contains(" -k") {
                assert!(line.contains("--server-side"), "deploy/{file}: {line}");
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type().unwrap().is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// The base as the real kustomize (`kubectl kustomize`, kubectl 1.32 here) renders it: what
/// `kubectl apply --server-side -k deploy/base` would send.
#[test]
fn base_renders_with_kubectl_kustomize() {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let dir = tempfile::tempdir().unwrap();
    let deploy = dir.path().join("deploy");
    copy_dir(&deploy_dir(), &deploy);
    // The git-ignored token the secretGenerator reads: a stand-in.
    std::fs::write(deploy.join("base/activity-token"), "stand-in-token").unwrap();
    let out = std::process::Command::new(&kubectl)
        .arg("kustomize")
        .arg(deploy.join("base"))
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{kubectl}` not found: this test renders deploy/base with the real kustomize. \
             Install kubectl 1.32 (e.g. `curl -LO https://dl.k8s.io/release/v1.32.4/bin/linux/amd64/kubectl \
             && sudo install -m 0755 kubectl /usr/local/bin/kubectl`), or point KUBECTL at one"
        ),
        Err(e) => panic!("running {kubectl}: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl kustomize failed: {stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    let rendered = Path::new("kubectl kustomize deploy/base");
    let docs = parse_docs(&text, "the rendered base");

    let mut objects = Vec::new();
    let mut secret_name = None;
    for d in &docs {
        let (kind, meta, namespaced) = check_doc(rendered, d);
        let name = meta.name.clone().unwrap();
        if namespaced {
            assert_eq!(
                meta.namespace.as_deref(),
                Some("sandbox-gateway"),
                "{kind} {name}"
            );
        } else {
            assert_eq!(meta.namespace, None, "{kind} {name}");
        }
        let labels = meta.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("app.kubernetes.io/part-of").map(String::as_str),
            Some("sandbox-gateway"),
            "{kind} {name}"
        );
        let name = if kind == Secret::KIND {
            let hash = name.strip_prefix("sandbox-activity-token-");
            let hash = hash.unwrap_or_else(|| panic!("Secret {name}"));
            assert!(!hash.is_empty() && hash.chars().all(|c| c.is_ascii_alphanumeric()));
            let s: Secret = typed(rendered, d);
            let token = s.data.as_ref().and_then(|d| d.get("token")).expect("token");
            assert_eq!(token.0, b"stand-in-token");
            secret_name = Some(name.clone());
            "sandbox-activity-token-<hash>".into()
        } else {
            name
        };
        objects.push((kind, name));
    }
    objects.sort();
    let mut want: Vec<(String, String)> = [
        ("ClusterRole", "sandbox-controller"),
        ("ClusterRole", "sandbox-gateway-pod-reader"),
        ("ClusterRoleBinding", "sandbox-controller"),
        ("ClusterRoleBinding", "sandbox-gateway-pod-reader"),
        ("ConfigMap", "sandbox-extproc"),
        ("ConfigMap", "sandbox-gateway-envoy"),
        ("CustomResourceDefinition", "sandboxes.sandboxgateway.io"),
        ("CustomResourceDefinition", "sandboxpools.sandboxgateway.io"),
        ("Deployment", "sandbox-controller"),
        ("Deployment", "sandbox-extproc"),
        ("Deployment", "sandbox-gateway"),
        ("Namespace", "sandbox-gateway"),
        ("NetworkPolicy", "sandbox-controller"),
        ("NetworkPolicy", "sandbox-extproc"),
        ("PodDisruptionBudget", "sandbox-controller"),
        ("PodDisruptionBudget", "sandbox-gateway"),
        ("Role", "sandbox-controller"),
        ("RoleBinding", "sandbox-controller"),
        ("Secret", "sandbox-activity-token-<hash>"),
        ("Service", "sandbox-controller-wake"),
        ("Service", "sandbox-extproc"),
        ("Service", "sandbox-gateway"),
        ("ServiceAccount", "sandbox-controller"),
        ("ServiceAccount", "sandbox-gateway"),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    want.sort();
    assert_eq!(objects, want);

    // Every Deployment mounts the generated Secret by its hashed name, and nothing refers to the
    // unhashed one.
    let secret_name = secret_name.unwrap();
    let mut mounted = Vec::new();
    for d in docs.iter().filter(|d| d["kind"] == Deployment::KIND) {
        let dep: Deployment = typed(rendered, d);
        let pod = dep.spec.and_then(|s| s.template.spec).unwrap();
        let vols = pod.volumes.unwrap_or_default();
        let v = vols.iter().find(|v| v.name == "activity-token");
        let s = v
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone());
        assert_eq!(
            s.as_deref(),
            Some(&secret_name[..]),
            "{:?}",
            dep.metadata.name
        );
        mounted.push(dep.metadata.name.unwrap());
    }
    assert_eq!(mounted.len(), 3);
    assert_eq!(
        text.matches("sandbox-activity-token").count(),
        text.matches(&secret_name[..]).count(),
        "an unhashed reference to the Secret"
    );
    // The images are kustomize's (`images:`).
    for (dep, cname, image) in [
        (
            "sandbox-controller",
            "controller",
            "sandbox-controller:latest",
        ),
        ("sandbox-extproc", "extproc", "sandbox-extproc:latest"),
    ] {
        let d = docs
            .iter()
            .find(|d| d["kind"] == Deployment::KIND && d["metadata"]["name"] == dep)
            .unwrap();
        let dep: Deployment = typed(rendered, d);
        let pod = dep.spec.and_then(|s| s.template.spec).unwrap();
        assert_eq!(
            container(Some(&pod.containers), cname).image.as_deref(),
            Some(image)
        );
    }
    // The bindings' subjects are in the namespace the objects went to.
    for d in docs
        .iter()
        .filter(|d| d["kind"] == ClusterRoleBinding::KIND)
    {
        let b: ClusterRoleBinding = typed(rendered, d);
        for s in b.subjects.unwrap_or_default() {
            assert_eq!(s.namespace.as_deref(), Some("sandbox-gateway"));
        }
    }
}

/// Seconds of an Envoy duration string (`"300s"`, `"1.5s"`, `"0s"`).
fn secs(v: &Value) -> f64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a duration: {v}"));
    s.strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a duration in seconds: {s}"))
}

/// A request held for a paused sandbox waits up to `wake.timeout_ms` (at most
/// MAX_WAKE_TIMEOUT_MS): no stream, route, connection or ext_proc timeout on its path may end it
/// sooner, in any bootstrap we ship (module, ext_proc, and the Kubernetes deploy).
#[test]
fn no_timeout_on_the_path_is_shorter_than_the_wake_bound() {
    let bound = routing::config::MAX_WAKE_TIMEOUT_MS as f64 / 1000.0;
    let cfg = json!({"route_source": {"type": "kubernetes"}});
    let module: Value =
        serde_saphyr::from_str(&sandbox_gateway_harness::gateway::bootstrap(&cfg, 1, 2).unwrap())
            .unwrap();
    let extproc: Value = serde_saphyr::from_str(
        &sandbox_gateway_harness::extproc::extproc_bootstrap(
            1,
            2,
            "127.0.0.1:3".parse().unwrap(),
            Duration::from_millis(1500),
        )
        .unwrap(),
    )
    .unwrap();
    for (what, b) in [
        ("module", module),
        ("ext_proc", extproc.clone()),
        ("deploy", bootstrap()),
    ] {
        let h = hcm(&b, "sandboxes");
        // Off (0s) or longer than the bound.
        for key in ["stream_idle_timeout", "request_timeout"] {
            let t = secs(&h[key]);
            assert!(t == 0.0 || t > bound, "{what}: {key} {t}s");
        }
        let idle = secs(&h["common_http_protocol_options"]["idle_timeout"]);
        assert!(idle == 0.0 || idle > bound, "{what}: idle_timeout {idle}s");
        for r in h["route_config"]["virtual_hosts"][0]["routes"]
            .as_array()
            .unwrap()
        {
            assert_eq!(secs(&r["route"]["timeout"]), 0.0, "{what}: route {r}");
        }
    }
    // ext_proc: the processor may extend a held request's timer up to max_message_timeout, which
    // covers the bound plus the processor's margin.
    let filters = hcm(&extproc, "sandboxes")["http_filters"].clone();
    let ext = named(&filters, "envoy.filters.http.ext_proc");
    let max = secs(&ext["typed_config"]["max_message_timeout"]);
    assert!(max >= bound + 2.0, "max_message_timeout {max}s");
}
