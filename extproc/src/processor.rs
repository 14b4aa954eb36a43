//! `envoy.service.ext_proc.v3.ExternalProcessor`: the module's request-path rules
//! (`routing::decide`) for Envoys that run the ext_proc filter instead of the module.
//!
//! Only request headers are processed. A routed request gets dynamic metadata
//! `sandbox_gateway.upstream = "ip:port"`; Envoy's set_filter_state filter copies it into the
//! ORIGINAL_DST filter state (see envoy/extproc.yaml.tmpl). Clients cannot write dynamic metadata,
//! so they cannot choose the upstream. Refused requests get an immediate JSON reply.

use crate::activity::Activity;
use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
    processing_mode::HeaderSendMode, ProcessingMode,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_server::ExternalProcessor, processing_request, processing_response,
    BodyResponse, CommonResponse, GrpcStatus, HeaderMutation, HeadersResponse, HttpHeaders,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use routing::activity::now_ms;
use routing::activity::StreamSlot;
use routing::decide::{
    decide, decide_after_hold, decide_after_wake, open_stream, Decision, ErrorReply, FinalDecision,
    Forward, HeaderChange, Ready, ReplyCode, SandboxId, FORWARDED_HOST_HEADER,
    FORWARDED_PREFIX_HEADER, ORIGINAL_DST_HEADER,
};
use routing::holds::{ClientKey, HoldBook};
use routing::reply::is_grpc_content_type;
use routing::wake::{WakeEnd, Waker};
use routing::{GatewayConfig, KeyError, RequestView, TargetBuf};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Dynamic-metadata namespace and key the Envoy bootstrap reads the upstream from.
pub const METADATA_NAMESPACE: &str = "sandbox_gateway";
pub const METADATA_UPSTREAM_KEY: &str = "upstream";

#[derive(Clone)]
pub struct Processor {
    pub cfg: Arc<GatewayConfig>,
    pub activity: Arc<Activity>,
    /// Requests held on a miss: at most `max_held_misses`, shared fairly (routing::holds).
    pub holds: Arc<HoldBook>,
    /// Wakes paused sandboxes (`wake` configured), else None.
    pub waker: Option<Arc<Waker>>,
}

/// Where an interim answer goes: the request's ext_proc stream.
pub type Interim = tokio::sync::mpsc::Sender<Result<ProcessingResponse, Status>>;

/// Extra time Envoy waits beyond the wake bound for the final answer.
const WAKE_MESSAGE_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The ext_proc filter's attribute namespace, and the attribute the bootstrap asks for
/// (`request_attributes`): the downstream address, by which held misses are shared.
const ATTRIBUTES_NAMESPACE: &str = "envoy.filters.http.ext_proc";
const SOURCE_ADDRESS: &str = "source.address";

/// The client a request came from, from the attributes Envoy sent with it.
fn client_of(attributes: &HashMap<String, Struct>) -> ClientKey {
    let addr = attributes
        .get(ATTRIBUTES_NAMESPACE)
        .and_then(|s| s.fields.get(SOURCE_ADDRESS))
        .and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.as_bytes()),
            _ => None,
        });
    addr.map_or(ClientKey::Unknown, ClientKey::from_source)
}

/// ext_proc's header list as a `RequestView`. Envoy sends one entry per value, so a header sent
/// twice appears twice (→ `DuplicateHeader`, as in the module).
struct Headers<'a>(&'a [HeaderValue]);

fn value(h: &HeaderValue) -> &[u8] {
    // Envoy sends `raw_value` (bytes may be non-UTF-8); older senders used `value`.
    if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    }
}

impl RequestView for Headers<'_> {
    fn header(&self, name: &str) -> Result<Option<&[u8]>, KeyError> {
        let mut found = None;
        for h in self.0.iter().filter(|h| h.key == name) {
            if found.is_some() {
                return Err(KeyError::DuplicateHeader);
            }
            found = Some(value(h));
        }
        Ok(found)
    }
    fn authority(&self) -> Option<&[u8]> {
        self.header(":authority").ok().flatten()
    }
    fn path(&self) -> Option<&[u8]> {
        self.header(":path").ok().flatten()
    }
}

fn header(key: &str, raw: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            raw_value: raw.to_vec(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(s)),
    }
}

impl Processor {
    /// Decides one request: the module's rules, with the miss hold as an async wait. A routed
    /// request also gets its sandbox's stream slot, which the caller holds until the sandbox's
    /// response headers arrive (or the stream ends).
    pub async fn on_request_headers(
        &self,
        h: &HttpHeaders,
        attributes: &HashMap<String, Struct>,
        interim: &Interim,
    ) -> (ProcessingResponse, Option<StreamSlot>) {
        let started = Instant::now();
        let list = h
            .headers
            .as_ref()
            .map(|m| m.headers.as_slice())
            .unwrap_or(&[]);
        let view = Headers(list);
        let table = &self.activity.table;
        let resp = match decide(&self.cfg, table, &view) {
            Decision::Reply(r) => (self.reply(r, &view), None),
            Decision::Ready(r) => (self.ready(r), None),
            Decision::Forward(f) => self.forward(f, &view),
            Decision::Wake(id, hash) => self.wake(id, hash, &view, attributes, interim).await,
            Decision::Hold(id) => {
                self.activity.metrics.miss_holds.inc();
                // Always admitted; when full, the heaviest client's oldest hold gives way.
                let (hold, displaced) = self.holds.admit(client_of(attributes));
                if displaced {
                    self.activity.metrics.miss_holds_displaced.inc();
                }
                hold.wait(table, &id, self.cfg.miss_hold).await;
                drop(hold);
                match decide_after_hold(&self.cfg, table, &view) {
                    routing::decide::AfterHold::Reply(r) => (self.reply(r, &view), None),
                    routing::decide::AfterHold::Forward(f) => self.forward(f, &view),
                    routing::decide::AfterHold::Wake(id, hash) => {
                        self.wake(id, hash, &view, attributes, interim).await
                    }
                }
            }
        };
        self.activity
            .metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    /// Holds a request for a paused sandbox while it wakes (its token was checked). Envoy is
    /// told first to wait past `message_timeout` (`override_message_timeout`, allowed up to the
    /// bootstrap's `max_message_timeout`), then gets the decision.
    async fn wake(
        &self,
        id: SandboxId,
        hash: routing::decide::TokenHash,
        view: &Headers<'_>,
        attributes: &HashMap<String, Struct>,
        interim: &Interim,
    ) -> (ProcessingResponse, Option<StreamSlot>) {
        let table = &self.activity.table;
        let Some(waker) = &self.waker else {
            // No waker, no paused set: unreachable, answered as a wake that did not finish.
            let r = ErrorReply::about(ReplyCode::SandboxWaking, id, &self.cfg);
            return (self.reply(r, view), None);
        };
        // Always admitted; when `max_held` are held, the heaviest client's oldest gives way.
        let (place, displaced) = waker.admit(client_of(attributes));
        if displaced {
            self.activity
                .metrics
                .wake_holds
                .with_label_values(&["displaced_another"])
                .inc();
        }
        let wait = waker.timeout() + WAKE_MESSAGE_MARGIN;
        let extend = ProcessingResponse {
            override_message_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(wait.subsec_nanos()).unwrap_or(0),
            }),
            ..Default::default()
        };
        if interim.send(Ok(extend)).await.is_err() {
            // Envoy gave up on the request meanwhile: nothing to answer.
            return (ProcessingResponse::default(), None);
        }
        let end = tokio::select! {
            end = waker.hold(&place, &id, hash) => end,
            // Envoy ended the request (the client left): give its place back now.
            _ = interim.closed() => return (ProcessingResponse::default(), None),
        };
        drop(place);
        let label = match end {
            WakeEnd::Ready => "ready",
            WakeEnd::Unpaused => "unpaused",
            WakeEnd::Expired => "expired",
            WakeEnd::Displaced => "displaced",
        };
        self.activity
            .metrics
            .wake_holds
            .with_label_values(&[label])
            .inc();
        if end == WakeEnd::Displaced {
            // A lighter client's request took this one's place (unless it woke meanwhile).
            if let FinalDecision::Forward(f) = decide_after_wake(&self.cfg, table, view) {
                return self.forward(f, view);
            }
            let r = ErrorReply::about(ReplyCode::TooManyWakes, id, &self.cfg);
            return (self.reply(r, view), None);
        }
        match decide_after_wake(&self.cfg, table, view) {
            FinalDecision::Reply(r) => (self.reply(r, view), None),
            FinalDecision::Forward(f) => self.forward(f, view),
        }
    }

    fn forward(&self, f: Forward, view: &Headers<'_>) -> (ProcessingResponse, Option<StreamSlot>) {
        let slot = match open_stream(&self.cfg, &f) {
            Ok(slot) => slot,
            Err(busy) => return (self.reply(busy, view), None),
        };
        let mut buf = TargetBuf::new();
        let target = f.route.target(f.port, &mut buf).to_string();
        // Always removed, present or not: cheap, and no later hop can be steered by it.
        let mut remove_headers = vec![ORIGINAL_DST_HEADER.to_string()];
        if f.strip_token {
            // The token is for the gateway; a sandbox never sees it.
            remove_headers.push(self.cfg.access_token_header.clone());
        }
        let mut set_headers = Vec::new();
        if let Some(p) = &f.new_path {
            set_headers.push(header(":path", p));
        }
        let mut edit = |name: &str, change: &HeaderChange| match change {
            HeaderChange::Unchanged => {}
            HeaderChange::Remove => remove_headers.push(name.to_string()),
            // Overwrite, not append: every value the client sent is replaced.
            HeaderChange::Set(v) => set_headers.push(header(name, v)),
        };
        edit(FORWARDED_PREFIX_HEADER, &f.forwarded_prefix);
        if let Some(h) = &f.host {
            // Needs `allow_all_routing` in the ext_proc filter's mutation_rules
            // (envoy/extproc.yaml.tmpl); without it Envoy drops the change silently.
            edit(
                ":authority",
                &HeaderChange::Set(h.authority.as_bytes().to_vec()),
            );
            edit(FORWARDED_HOST_HEADER, &h.forwarded_host);
        }
        f.route.activity.touch(now_ms());
        self.activity
            .metrics
            .requests
            .with_label_values(&["routed"])
            .inc();
        tracing::debug!(sandbox_id = %f.route.spec.id, upstream = %target, "routed");
        let ours = Struct {
            fields: HashMap::from([(METADATA_UPSTREAM_KEY.to_string(), string_value(target))]),
        };
        let metadata = Struct {
            fields: HashMap::from([(
                METADATA_NAMESPACE.to_string(),
                Value {
                    kind: Some(Kind::StructValue(ours)),
                },
            )]),
        };
        let resp = ProcessingResponse {
            response: Some(processing_response::Response::RequestHeaders(
                HeadersResponse {
                    response: Some(CommonResponse {
                        header_mutation: Some(HeaderMutation {
                            set_headers,
                            remove_headers,
                        }),
                        // A rewritten path may match another route entry.
                        clear_route_cache: f.new_path.is_some(),
                        ..Default::default()
                    }),
                },
            )),
            dynamic_metadata: Some(metadata),
            // Tell us when the sandbox answers, to free the slot then (the bootstrap's
            // allow_mode_override); bodies and trailers stay with Envoy.
            mode_override: Some(ProcessingMode {
                response_header_mode: HeaderSendMode::Send as i32,
                request_trailer_mode: HeaderSendMode::Skip as i32,
                response_trailer_mode: HeaderSendMode::Skip as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        (resp, Some(slot))
    }

    /// The readiness probe, answered like the module answers it.
    fn ready(&self, r: Ready) -> ProcessingResponse {
        self.activity
            .metrics
            .requests
            .with_label_values(&["ready"])
            .inc();
        immediate(
            Ready::STATUS,
            vec![header("content-type", b"application/json")],
            r.body().into_bytes(),
            None,
            "sandbox_gateway_ready",
        )
    }

    /// A refusal: JSON for HTTP clients; for gRPC (Envoy's rule, `is_grpc_content_type`) the
    /// reply's gRPC status, which Envoy sends as a trailers-only response with the body as
    /// `grpc-message`.
    fn reply(&self, r: ErrorReply, view: &Headers<'_>) -> ProcessingResponse {
        let grpc = matches!(view.header("content-type"), Ok(Some(v)) if is_grpc_content_type(v));
        self.activity
            .metrics
            .requests
            .with_label_values(&[r.code.code()])
            .inc();
        tracing::debug!(
            status = r.status(),
            code = r.code.code(),
            sandbox_id = r.id.as_deref(),
            "local reply"
        );
        let mut set_headers = Vec::with_capacity(3);
        let (body, grpc_status) = if grpc {
            if let Some(s) = r.retry_after_secs {
                // gRPC's own retry pushback (gRFC A6).
                let ms = u64::from(s) * 1000;
                set_headers.push(header("grpc-retry-pushback-ms", ms.to_string().as_bytes()));
            }
            let status = GrpcStatus {
                status: r.code.grpc_status(),
            };
            (r.grpc_message().into_bytes(), Some(status))
        } else {
            set_headers.push(header("content-type", b"application/json"));
            (r.body().into_bytes(), None)
        };
        if let Some(s) = r.retry_after_secs {
            set_headers.push(header("retry-after", s.to_string().as_bytes()));
        }
        immediate(r.status(), set_headers, body, grpc_status, r.code.code())
    }
}

/// An answer Envoy sends itself instead of forwarding (`grpc_status` for gRPC requests).
fn immediate(
    status: u32,
    set_headers: Vec<HeaderValueOption>,
    body: Vec<u8>,
    grpc_status: Option<GrpcStatus>,
    details: &str,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: status as i32,
                }),
                headers: Some(HeaderMutation {
                    set_headers,
                    remove_headers: vec![],
                }),
                body,
                grpc_status,
                // Shows up as %RESPONSE_CODE_DETAILS% in Envoy's access log.
                details: details.into(),
            },
        )),
        ..Default::default()
    }
}

/// Answer for phases we did not ask for (a misconfigured processing_mode): continue unchanged.
fn passthrough(req: &processing_request::Request) -> Option<processing_response::Response> {
    use processing_request::Request as Rq;
    use processing_response::Response as Rs;
    let common = || Some(CommonResponse::default());
    Some(match req {
        Rq::RequestHeaders(_) => return None,
        Rq::ResponseHeaders(_) => Rs::ResponseHeaders(HeadersResponse { response: common() }),
        Rq::RequestBody(_) => Rs::RequestBody(BodyResponse { response: common() }),
        Rq::ResponseBody(_) => Rs::ResponseBody(BodyResponse { response: common() }),
        Rq::RequestTrailers(_) => Rs::RequestTrailers(TrailersResponse::default()),
        Rq::ResponseTrailers(_) => Rs::ResponseTrailers(TrailersResponse::default()),
    })
}

#[tonic::async_trait]
impl ExternalProcessor for Processor {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let this = self.clone();
        // One stream per HTTP request; Envoy closes it after the response headers (the last
        // phase the bootstrap asks for) or when the request ends first.
        tokio::spawn(async move {
            // The routed sandbox's stream slot: held while the sandbox has not answered, so a
            // hung sandbox can take at most `max_streams_per_sandbox` requests at once.
            let mut slot: Option<StreamSlot> = None;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "ext_proc stream ended");
                        return;
                    }
                };
                let Some(req) = msg.request else { continue };
                let resp = match &req {
                    processing_request::Request::RequestHeaders(h) => {
                        let (resp, s) = this.on_request_headers(h, &msg.attributes, &tx).await;
                        drop(std::mem::replace(&mut slot, s));
                        resp
                    }
                    processing_request::Request::ResponseHeaders(_) => {
                        drop(slot.take());
                        ProcessingResponse {
                            response: passthrough(&req),
                            ..Default::default()
                        }
                    }
                    other => ProcessingResponse {
                        response: passthrough(other),
                        ..Default::default()
                    },
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
