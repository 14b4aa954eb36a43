//! The `claim`, `release`, `pause` and `resume` commands, for people and scripts. Waiting is watch-driven
//! (`kube::runtime::wait::await_condition`), never a poll loop.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::ResourceExt;
use serde_json::json;

use crate::claim::TOKEN_KEY;
use crate::crd::{Phase, Sandbox, SandboxSpec, RESUME_ANNOTATION};

#[derive(clap::Args, Debug)]
pub struct ClaimArgs {
    /// The SandboxPool to claim from.
    #[arg(long)]
    pub pool: String,
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Wait until the sandbox is Ready (or Failed) and print its ID, URL and token.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print JSON (`name`, `sandboxId`, `url`, `token`, `phase`).
    #[arg(long)]
    pub json: bool,
    /// Idle timeout override, e.g. `15m`.
    #[arg(long)]
    pub idle_timeout: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// The sandbox ID (or the Sandbox's name).
    pub id: String,
    /// Look only in this namespace (default: every namespace).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

/// Creates a Sandbox and (with `--wait`) waits for it.
pub async fn claim(a: ClaimArgs) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("Kubernetes credentials")?;
    let api: Api<Sandbox> = Api::namespaced(client.clone(), &a.namespace);
    let mut sbx = Sandbox::new(
        "",
        SandboxSpec {
            pool_ref: a.pool.clone(),
            idle_timeout: a.idle_timeout.clone(),
            max_lifetime: None,
            port: None,
            require_token: None,
            idle_policy: None,
            paused: None,
        },
    );
    sbx.metadata = ObjectMeta {
        generate_name: Some(format!("{}-", a.pool)),
        ..Default::default()
    };
    let created = api.create(&PostParams::default(), &sbx).await?;
    let name = created.name_any();
    if !a.wait {
        print_result(&a, &created, None);
        return Ok(());
    }
    let done = |s: Option<&Sandbox>| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| matches!(st.phase, Phase::Ready | Phase::Failed))
    };
    let got = tokio::time::timeout(a.timeout, await_condition(api.clone(), &name, done))
        .await
        .with_context(|| format!("{name} was not Ready within {:?}", a.timeout))??
        .context("the Sandbox was deleted while waiting")?;
    let st = got.status.clone().unwrap_or_default();
    if st.phase == Phase::Failed {
        let why: Vec<_> = st.conditions.iter().map(|c| c.message.clone()).collect();
        bail!("{name} failed: {}", why.join("; "));
    }
    let token = match &st.token_secret {
        Some(secret) => {
            let secrets: Api<Secret> = Api::namespaced(client, &a.namespace);
            let s = secrets.get(secret).await?;
            s.data
                .as_ref()
                .and_then(|d| d.get(TOKEN_KEY))
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        }
        None => None,
    };
    print_result(&a, &got, token);
    Ok(())
}

fn print_result(a: &ClaimArgs, s: &Sandbox, token: Option<String>) {
    let st = s.status.clone().unwrap_or_default();
    if a.json {
        println!(
            "{}",
            json!({
                "name": s.name_any(),
                "namespace": s.namespace(),
                "sandboxId": st.sandbox_id,
                "url": st.url,
                "token": token,
                "phase": st.phase,
            })
        );
    } else {
        println!("name:  {}", s.name_any());
        println!("phase: {:?}", st.phase);
        if let Some(id) = st.sandbox_id {
            println!("id:    {id}");
        }
        if let Some(url) = st.url {
            println!("url:   {url}");
        }
        if let Some(t) = token {
            println!("token: {t}");
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct PauseArgs {
    /// The sandbox ID (or the Sandbox's name).
    pub id: String,
    /// Look only in this namespace (default: every namespace).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Wait until it is Paused (`pause`) or Ready (`resume`).
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Pauses a sandbox (`spec.paused: true`): its pod goes, its ID, token and volumes stay, and
/// traffic does not wake it until `resume`.
pub async fn pause(a: PauseArgs) -> Result<()> {
    set_paused(a, true).await
}

/// Resumes a sandbox: clears `spec.paused` and sets the resume annotation, so a sandbox paused
/// for idleness resumes too.
pub async fn resume(a: PauseArgs) -> Result<()> {
    set_paused(a, false).await
}

async fn set_paused(a: PauseArgs, paused: bool) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("Kubernetes credentials")?;
    let sbx = find(&client, &a.id, a.namespace.as_deref()).await?;
    let ns = sbx.namespace().context("namespace")?;
    let api: Api<Sandbox> = Api::namespaced(client, &ns);
    let patch = if paused {
        json!({ "spec": { "paused": true } })
    } else {
        let at = jiff::Timestamp::now().to_string();
        json!({ "spec": { "paused": null }, "metadata": { "annotations": { RESUME_ANNOTATION: at } } })
    };
    let name = sbx.name_any();
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let verb = if paused { "pausing" } else { "resuming" };
    println!("{verb} {ns}/{name}");
    if !a.wait {
        return Ok(());
    }
    let want = if paused { Phase::Paused } else { Phase::Ready };
    let done = move |s: Option<&Sandbox>| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.phase == want)
    };
    tokio::time::timeout(a.timeout, await_condition(api, &name, done))
        .await
        .with_context(|| format!("{name} was not {want:?} within {:?}", a.timeout))??
        .context("the Sandbox was deleted while waiting")?;
    println!("{}/{name}: {want:?}", ns);
    Ok(())
}

/// The one Sandbox whose ID (or name) is `id`.
async fn find(client: &kube::Client, id: &str, namespace: Option<&str>) -> Result<Sandbox> {
    let all: Api<Sandbox> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut hits: Vec<Sandbox> = all
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|s| {
            s.status.as_ref().and_then(|st| st.sandbox_id.as_deref()) == Some(id)
                || s.name_any() == id
        })
        .collect();
    if hits.len() != 1 {
        bail!("{} sandboxes match {id:?}", hits.len());
    }
    Ok(hits.remove(0))
}

/// Deletes the Sandbox with this ID (or name); the controller takes its route away first.
pub async fn release(a: ReleaseArgs) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("Kubernetes credentials")?;
    let all: Api<Sandbox> = match &a.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let hits: Vec<Sandbox> = all
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|s| {
            s.status.as_ref().and_then(|st| st.sandbox_id.as_deref()) == Some(a.id.as_str())
                || s.name_any() == a.id
        })
        .collect();
    let [sbx] = hits.as_slice() else {
        bail!("{} sandboxes match {:?}", hits.len(), a.id);
    };
    let ns = sbx.namespace().context("namespace")?;
    let api: Api<Sandbox> = Api::namespaced(client, &ns);
    api.delete(&sbx.name_any(), &DeleteParams::default())
        .await?;
    println!("released {ns}/{}", sbx.name_any());
    Ok(())
}
