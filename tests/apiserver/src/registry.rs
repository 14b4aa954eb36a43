//! The resource table: which resources the fake API server serves (group, version, plural,
//! kind, scope, subresources), as a CRD or a built-in type registers them on a real server.

/// Where a `scale` subresource reads and writes its fields, as in a CRD's
/// `subresources.scale` (JSON paths like `.spec.replicas`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalePaths {
    /// `specReplicasPath`, e.g. `.spec.replicas`.
    pub spec_replicas: String,
    /// `statusReplicasPath`, e.g. `.status.replicas`.
    pub status_replicas: String,
    /// `labelSelectorPath`, e.g. `.status.selector` (a string selector).
    pub label_selector: Option<String>,
}

/// One served resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    pub version: String,
    /// Plural resource name, as in the URL (`sandboxes`).
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
    /// Whether it has a `status` subresource: writes to the object ignore `status`, writes to
    /// `/status` change only `status`.
    pub status: bool,
    /// Its `scale` subresource, if any.
    pub scale: Option<ScalePaths>,
    /// Short names discovery advertises (`kubectl get sbx`).
    pub short_names: Vec<String>,
}

impl ResourceType {
    /// A resource without subresources or short names.
    pub fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
            kind: kind.to_string(),
            namespaced,
            status: false,
            scale: None,
            short_names: Vec::new(),
        }
    }

    /// With a `status` subresource.
    pub fn with_status(mut self) -> Self {
        self.status = true;
        self
    }

    /// With a `scale` subresource.
    pub fn with_scale(mut self, spec: &str, status: &str, selector: Option<&str>) -> Self {
        self.scale = Some(ScalePaths {
            spec_replicas: spec.to_string(),
            status_replicas: status.to_string(),
            label_selector: selector.map(str::to_string),
        });
        self
    }

    /// With short names for discovery.
    pub fn with_short_names(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// `v1` or `group/version`: the objects' `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural` for the core group, `plural.group` otherwise: how kubectl names a resource
    /// unambiguously, and the key of [`super::FakeApiServer::write_counts`].
    pub fn name(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// The resources every server starts with.
pub fn builtin_resources() -> Vec<ResourceType> {
    let core = |plural: &str, kind: &str| ResourceType::new("", "v1", plural, kind, true);
    vec![
        core("pods", "Pod").with_status().with_short_names(&["po"]),
        core("secrets", "Secret"),
        core("events", "Event").with_short_names(&["ev"]),
        core("services", "Service")
            .with_status()
            .with_short_names(&["svc"]),
        core("configmaps", "ConfigMap").with_short_names(&["cm"]),
        // Per-sandbox volumes (a pool's volumeClaimTemplates); the test kubelet backs each
        // claim with a directory.
        core("persistentvolumeclaims", "PersistentVolumeClaim")
            .with_status()
            .with_short_names(&["pvc"]),
        ResourceType::new("", "v1", "namespaces", "Namespace", false)
            .with_status()
            .with_short_names(&["ns"]),
        ResourceType::new("coordination.k8s.io", "v1", "leases", "Lease", true),
        ResourceType::new(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
        ),
        ResourceType::new("events.k8s.io", "v1", "events", "Event", true).with_short_names(&["ev"]),
        ResourceType::new(
            "sandboxgateway.io",
            "v1alpha1",
            "sandboxpools",
            "SandboxPool",
            true,
        )
        .with_status()
        .with_scale(
            ".spec.replicas",
            ".status.replicas",
            Some(".status.selector"),
        )
        .with_short_names(&["sbp"]),
        ResourceType::new(
            "sandboxgateway.io",
            "v1alpha1",
            "sandboxes",
            "Sandbox",
            true,
        )
        .with_status()
        .with_short_names(&["sbx"]),
    ]
}

/// Index of a resource in the table.
pub(crate) type ResId = usize;

/// The table; resources are never removed, so a [`ResId`] stays valid.
#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) types: Vec<ResourceType>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            types: builtin_resources(),
        }
    }
}

impl Registry {
    /// Adds a resource, or replaces the one with the same group, version and plural.
    pub(crate) fn register(&mut self, rt: ResourceType) -> ResId {
        if let Some(id) = self.by_path(&rt.group, &rt.version, &rt.plural) {
            self.types[id] = rt;
            return id;
        }
        self.types.push(rt);
        self.types.len() - 1
    }

    /// The resource a URL names.
    pub(crate) fn by_path(&self, group: &str, version: &str, plural: &str) -> Option<ResId> {
        self.types
            .iter()
            .position(|t| t.group == group && t.version == version && t.plural == plural)
    }

    /// A resource by the name tests use: `plural.group` (or `plural` for core), or a bare
    /// plural (the core group's first when several groups share it, e.g. `events`).
    pub(crate) fn by_name(&self, name: &str) -> Option<ResId> {
        if let Some(id) = self.types.iter().position(|t| t.name() == name) {
            return Some(id);
        }
        let mut same = self
            .types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.plural == name);
        let first = same.next()?;
        let core = std::iter::once(first)
            .chain(same)
            .find(|(_, t)| t.group.is_empty());
        Some(core.unwrap_or(first).0)
    }

    pub(crate) fn get(&self, id: ResId) -> &ResourceType {
        &self.types[id]
    }
}
