//! The WakeService (`sandboxgateway.v1`, proto/sandboxgateway/v1/wake.proto): a gateway holding
//! a request for a paused sandbox asks for it to be resumed. Every replica serves it; only the
//! leader acts (a standby answers UNAVAILABLE, so the gateway asks every replica's address).
//!
//! A wake is one status write: `Paused` → `Resuming` under the Sandbox's resourceVersion. That
//! makes it durable (a new leader continues it) and deduplicated across gateways (the next wake
//! finds `Resuming` and writes nothing). A wake for a sandbox still `Pausing` is remembered and
//! the pause ends in `Resuming`. Which sandbox has the ID is read from the API server, never
//! from the cache alone.

use std::sync::Arc;

use kube::api::Api;
use kube::ResourceExt;
use routing::bearer::{BearerToken, AUTHORIZATION};
use sandbox_gateway_proto::v1::wake_response::Result as WakeResult;
use sandbox_gateway_proto::v1::wake_service_server::{WakeService, WakeServiceServer};
use sandbox_gateway_proto::v1::{WakeRequest, WakeResponse};
use tonic::{Request, Response, Status};

use crate::context::Context;
use crate::crd::{PauseReason, Phase, Sandbox};
use crate::error::{is_not_found, namespace_of};

/// The service, over the shared reconcile context.
pub struct Waker {
    ctx: Arc<Context>,
    token: Option<BearerToken>,
}

impl Waker {
    pub fn new(ctx: Arc<Context>, token: Option<BearerToken>) -> Self {
        Waker { ctx, token }
    }

    /// As a tonic service.
    pub fn into_service(self) -> WakeServiceServer<Self> {
        WakeServiceServer::new(self)
    }

    fn count(&self, result: &str) {
        self.ctx.metrics.wakes.with_label_values(&[result]).inc();
    }

    fn authorized<T>(&self, req: &Request<T>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        req.metadata()
            .get(AUTHORIZATION)
            .is_some_and(|v| token.accepts(v.as_bytes()))
    }

    /// The Sandbox whose status names `id`, as the API server has it now.
    async fn find(&self, id: &str) -> Result<Option<Sandbox>, Status> {
        let cached = self
            .ctx
            .sandboxes
            .find(|s| s.status.as_ref().and_then(|st| st.sandbox_id.as_deref()) == Some(id));
        let Some(cached) = cached else {
            return Ok(None);
        };
        let ns = namespace_of(&*cached).map_err(|e| Status::internal(e.to_string()))?;
        let api: Api<Sandbox> = Api::namespaced(self.ctx.client.clone(), &ns);
        match api.get(&cached.name_any()).await {
            Ok(s) if s.uid() == cached.uid() => Ok(Some(s)),
            Ok(_) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Status::unavailable(format!("reading the Sandbox: {e}"))),
        }
    }

    async fn wake(&self, id: &str, token_sha256: &str) -> Result<(WakeResult, String), Status> {
        // Two tries: a conflict means the sandbox changed between the read and the write.
        for _ in 0..2 {
            let Some(sbx) = self.find(id).await? else {
                return Ok((WakeResult::NotFound, String::new()));
            };
            let name = format!("{}/{}", sbx.namespace().unwrap_or_default(), sbx.name_any());
            let st = sbx.status.clone().unwrap_or_default();
            let by_spec =
                sbx.spec.paused == Some(true) || st.pause_reason == Some(PauseReason::Spec);
            if sbx.metadata.deletion_timestamp.is_some() {
                return Ok((WakeResult::NotFound, name));
            }
            // The gateway checked the request's token against the marker it watches; it must be
            // this sandbox's own marker (a forged marker on another object proves nothing).
            let theirs = sbx
                .annotations()
                .get(routing::contract::TOKEN_SHA256_ANNOTATION)
                .map_or("", String::as_str);
            let marked = sbx.labels().contains_key(crate::crd::PAUSED_LABEL);
            if marked && theirs != token_sha256 {
                tracing::warn!(sandbox = %name, sandbox_id = %id,
                    "wake refused: the token hash the gateway checked is not this sandbox's");
                return Ok((WakeResult::NotFound, name));
            }
            let uid = sbx.uid().unwrap_or_default();
            let result = match st.phase {
                Phase::Ready | Phase::Pending => WakeResult::Running,
                Phase::Resuming => WakeResult::Accepted,
                Phase::Released | Phase::Releasing | Phase::Failed => WakeResult::NotFound,
                Phase::Pausing | Phase::Paused if by_spec => WakeResult::PausedBySpec,
                Phase::Pausing => {
                    self.ctx.request_wake_after_pause(&uid);
                    self.ctx.note_wake_started(&uid);
                    WakeResult::Accepted
                }
                Phase::Paused => {
                    self.ctx.leader.check().map_err(not_leader)?;
                    let written =
                        crate::pause::mark_resuming(&self.ctx, &sbx, serde_json::json!({}))
                            .await
                            .map_err(|e| Status::unavailable(e.to_string()))?;
                    if !written {
                        continue;
                    }
                    self.ctx.note_wake_started(&uid);
                    tracing::info!(sandbox = %name, sandbox_id = %id, "wake: resuming");
                    self.ctx.event(
                        &sbx,
                        false,
                        "Resuming",
                        "Wake",
                        "a request for the sandbox woke it".into(),
                    );
                    WakeResult::Accepted
                }
            };
            return Ok((result, name));
        }
        Err(Status::aborted("the sandbox kept changing; ask again"))
    }
}

fn not_leader(_: crate::error::Error) -> Status {
    Status::unavailable("not the leader")
}

#[tonic::async_trait]
impl WakeService for Waker {
    async fn wake(&self, req: Request<WakeRequest>) -> Result<Response<WakeResponse>, Status> {
        if !self.authorized(&req) {
            self.count("unauthenticated");
            return Err(Status::unauthenticated(
                "WakeService requires `authorization: Bearer <token>` metadata",
            ));
        }
        if !self.ctx.leader.is_leader() {
            self.count("not_leader");
            return Err(Status::unavailable("not the leader"));
        }
        if !self.ctx.metrics.is_ready() {
            // Before the caches sync a sandbox cannot be found: ask again, do not say NOT_FOUND.
            self.count("not_ready");
            return Err(Status::unavailable("caches are not synced yet"));
        }
        let r = req.into_inner();
        if routing::key::validate_id(r.sandbox_id.as_bytes()).is_err() {
            self.count("invalid");
            return Err(Status::invalid_argument("not a valid sandbox ID"));
        }
        let (result, sandbox) = match self.wake(&r.sandbox_id, &r.token_sha256).await {
            Ok(x) => x,
            Err(s) => {
                self.count("error");
                return Err(s);
            }
        };
        let label = match result {
            WakeResult::Accepted => "accepted",
            WakeResult::Running => "running",
            WakeResult::NotFound => "not_found",
            WakeResult::PausedBySpec => "paused_by_spec",
            WakeResult::Unspecified => "error",
        };
        self.count(label);
        tracing::debug!(sandbox_id = %r.sandbox_id, requester = %r.requester, result = label, "wake");
        Ok(Response::new(WakeResponse {
            result: result as i32,
            sandbox,
        }))
    }
}

/// Serves the WakeService on `listener` until the task is dropped.
pub async fn serve(
    listener: std::net::TcpListener,
    ctx: Arc<Context>,
    token: Option<BearerToken>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(Waker::new(ctx, token).into_service())
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
