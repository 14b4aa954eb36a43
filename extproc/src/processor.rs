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
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_server::ExternalProcessor, processing_request, processing_response,
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders, ImmediateResponse,
    ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use routing::activity::now_ms;
use routing::decide::{
    decide, decide_after_hold, Decision, ErrorReply, FinalDecision, Forward, ORIGINAL_DST_HEADER,
};
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
    /// Decides one request: the module's rules, with the miss hold as an async wait.
    pub async fn on_request_headers(&self, h: &HttpHeaders) -> ProcessingResponse {
        let started = Instant::now();
        let list = h
            .headers
            .as_ref()
            .map(|m| m.headers.as_slice())
            .unwrap_or(&[]);
        let view = Headers(list);
        let table = &self.activity.table;
        let resp = match decide(&self.cfg, table, &view) {
            Decision::Reply(r) => self.reply(r),
            Decision::Forward(f) => self.forward(f),
            Decision::Hold(id) => {
                self.activity.metrics.miss_holds.inc();
                table.wait_for(&id, self.cfg.miss_hold).await;
                match decide_after_hold(&self.cfg, table, &view) {
                    FinalDecision::Reply(r) => self.reply(r),
                    FinalDecision::Forward(f) => self.forward(f),
                }
            }
        };
        self.activity
            .metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    fn forward(&self, f: Forward) -> ProcessingResponse {
        let mut buf = TargetBuf::new();
        let target = f.route.target(f.port, &mut buf).to_string();
        // Always removed, present or not: cheap, and no later hop can be steered by it.
        let mut remove_headers = vec![ORIGINAL_DST_HEADER.to_string()];
        if f.strip_token {
            // The token is for the gateway; a sandbox never sees it.
            remove_headers.push(self.cfg.access_token_header.clone());
        }
        let set_headers = f
            .new_path
            .as_deref()
            .map(|p| vec![header(":path", p)])
            .unwrap_or_default();
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
        ProcessingResponse {
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
            ..Default::default()
        }
    }

    fn reply(&self, r: ErrorReply) -> ProcessingResponse {
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
        let mut set_headers = vec![header("content-type", b"application/json")];
        if let Some(s) = r.retry_after_secs {
            set_headers.push(header("retry-after", s.to_string().as_bytes()));
        }
        ProcessingResponse {
            response: Some(processing_response::Response::ImmediateResponse(
                ImmediateResponse {
                    status: Some(HttpStatus {
                        code: r.status() as i32,
                    }),
                    headers: Some(HeaderMutation {
                        set_headers,
                        remove_headers: vec![],
                    }),
                    body: r.body().into_bytes(),
                    // Shows up as %RESPONSE_CODE_DETAILS% in Envoy's access log.
                    details: r.code.code().into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
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
        // One stream per HTTP request; it ends when Envoy closes it.
        tokio::spawn(async move {
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
                        this.on_request_headers(h).await
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
