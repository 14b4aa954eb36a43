//! Local replies: every answer the gateway gives itself is JSON
//! `{"error": "<code>", "message": "...", "sandbox_id": "..."}`, with the status, code and message
//! that `routing::reply::ReplyCode` owns (the same in ext_proc mode).

use crate::ffi::Stream;
use routing::decide::ErrorReply;

/// Sends `r` on `stream`; Envoy ends the stream with it.
pub fn send<S: Stream>(stream: &mut S, r: &ErrorReply) {
    let body = r.body();
    let retry;
    let mut headers: [(&str, &[u8]); 2] = [("content-type", b"application/json"), ("", b"")];
    let n = match r.retry_after_secs {
        Some(s) => {
            retry = s.to_string();
            headers[1] = ("retry-after", retry.as_bytes());
            2
        }
        None => 1,
    };
    stream.send_response(r.status(), &headers[..n], body.as_bytes(), r.code.code());
}
