//! Discovery for the registered resources, in the legacy (unaggregated) form every client
//! falls back to: `/api` (APIVersions), `/api/v1` and `/apis/{group}/{version}`
//! (APIResourceList), `/apis` (APIGroupList), `/apis/{group}` (APIGroup), plus `/version`.
//! `/openapi/v2` and `/openapi/v3` are 404s (kubectl then works from discovery alone).

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::registry::{Registry, ResourceType};

const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// `/version`.
pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// The discovery document for `segments` (`["api"]`, `["api", "v1"]`, `["apis"]`,
/// `["apis", group]`, `["apis", group, version]`), or `None` for a group or version nothing
/// is registered under.
pub(crate) fn answer(reg: &Registry, segments: &[&str], addr: SocketAddr) -> Option<Value> {
    match segments {
        ["api"] => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
        })),
        ["api", "v1"] => resource_list(reg, "", "v1"),
        ["apis"] => {
            let groups: Vec<Value> = group_names(reg)
                .iter()
                .filter_map(|g| group(reg, g))
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["apis", g] => group(reg, g).map(|mut v| {
            v["kind"] = json!("APIGroup");
            v["apiVersion"] = json!("v1");
            v
        }),
        ["apis", g, v] if !g.is_empty() => resource_list(reg, g, v),
        _ => None,
    }
}

fn group_names(reg: &Registry) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for t in reg.types.iter().filter(|t| !t.group.is_empty()) {
        if !names.contains(&t.group) {
            names.push(t.group.clone());
        }
    }
    names
}

fn group(reg: &Registry, name: &str) -> Option<Value> {
    let mut versions: Vec<Value> = Vec::new();
    for t in reg
        .types
        .iter()
        .filter(|t| t.group == name && !name.is_empty())
    {
        let gv = json!({"groupVersion": t.api_version(), "version": t.version});
        if !versions.contains(&gv) {
            versions.push(gv);
        }
    }
    let preferred = versions.first()?.clone();
    Some(json!({"name": name, "versions": versions, "preferredVersion": preferred}))
}

fn entry(t: &ResourceType, name: String, kind: &str, group: &str, version: &str) -> Value {
    let mut e = json!({
        "name": name,
        "singularName": "",
        "namespaced": t.namespaced,
        "kind": kind,
        "verbs": VERBS,
    });
    if !group.is_empty() {
        e["group"] = json!(group);
        e["version"] = json!(version);
    }
    e
}

fn resource_list(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = reg
        .types
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for t in types {
        let mut main = entry(t, t.plural.clone(), &t.kind, "", "");
        main["singularName"] = json!(t.kind.to_lowercase());
        if !t.short_names.is_empty() {
            main["shortNames"] = json!(t.short_names);
        }
        resources.push(main);
        if t.status {
            let mut e = entry(t, format!("{}/status", t.plural), &t.kind, "", "");
            e["verbs"] = json!(["get", "patch", "update"]);
            resources.push(e);
        }
        if t.scale.is_some() {
            let mut e = entry(
                t,
                format!("{}/scale", t.plural),
                "Scale",
                "autoscaling",
                "v1",
            );
            e["verbs"] = json!(["get", "patch", "update"]);
            resources.push(e);
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}
