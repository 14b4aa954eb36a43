//! Local replies: every answer the gateway gives itself is JSON
//! `{"error": "<code>", "message": "...", "sandbox_id": "..."}`, with the status, code and message
//! that `routing::reply::ReplyCode` owns (the same in ext_proc mode). A gRPC request gets a gRPC
//! status instead (docs/design.md#grpc).

use crate::ffi::{Header, HeaderMap, Stream};
use arrayvec::ArrayVec;
use routing::decide::{ErrorReply, Ready};
use routing::reply::is_grpc_content_type;

/// Sends `r` on `stream`; Envoy ends the stream with it.
///
/// For gRPC, Envoy 1.40's `send_response` passes gRPC status 0 to `sendLocalReply`, so the
/// reply would say OK (a tonic client then fails with "Missing response message"); a
/// `grpc-status` header set here wins (Envoy only fills it in when absent), and Envoy turns the
/// body into the `grpc-message` of a trailers-only response.
pub fn send<S: Stream>(stream: &mut S, r: &ErrorReply) {
    let grpc = match stream.request_headers().get("content-type") {
        Header::One(v) => is_grpc_content_type(v),
        _ => false,
    };
    let (retry, pushback) = match r.retry_after_secs {
        Some(s) => (s.to_string(), (u64::from(s) * 1000).to_string()),
        None => (String::new(), String::new()),
    };
    let status;
    let body;
    // At most three headers; on the stack.
    let mut headers = ArrayVec::<(&str, &[u8]), 3>::new();
    if grpc {
        status = r.code.grpc_status().to_string();
        body = r.grpc_message();
        headers.push(("grpc-status", status.as_bytes()));
        if r.retry_after_secs.is_some() {
            // gRPC's own retry pushback (gRFC A6); Retry-After below is for proxies in between.
            headers.push(("grpc-retry-pushback-ms", pushback.as_bytes()));
        }
    } else {
        body = r.body();
        headers.push(("content-type", b"application/json"));
    }
    if r.retry_after_secs.is_some() {
        headers.push(("retry-after", retry.as_bytes()));
    }
    stream.send_response(r.status(), &headers, body.as_bytes(), r.code.code());
}

/// Answers the readiness probe (`routing::decide::READY_PATH`) with 200 and the route count.
pub fn send_ready<S: Stream>(stream: &mut S, r: &Ready) {
    let body = r.body();
    let headers: [(&str, &[u8]); 1] = [("content-type", b"application/json")];
    stream.send_response(
        Ready::STATUS,
        &headers,
        body.as_bytes(),
        "sandbox_gateway_ready",
    );
}
