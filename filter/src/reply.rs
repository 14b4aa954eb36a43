//! Local replies: every error the gateway answers itself is JSON
//! `{"error": "<code>", "message": "...", "sandbox_id": "..."}`.

use crate::ffi::Stream;

pub struct Reply<'a> {
    pub status: u32,
    pub code: &'static str,
    pub message: &'a str,
    pub sandbox_id: Option<&'a str>,
    pub retry_after_secs: Option<u32>,
}

impl Reply<'_> {
    /// Same body as sandbox-extproc's replies (`routing::decide::error_body`).
    pub fn body(&self) -> String {
        routing::decide::error_body(self.code, self.message, self.sandbox_id)
    }

    pub fn send(&self, stream: &mut Stream<'_>) {
        let body = self.body();
        let retry;
        let mut headers: [(&str, &[u8]); 2] = [("content-type", b"application/json"), ("", b"")];
        let n = match self.retry_after_secs {
            Some(s) => {
                retry = s.to_string();
                headers[1] = ("retry-after", retry.as_bytes());
                2
            }
            None => 1,
        };
        stream.send_response(self.status, &headers[..n], body.as_bytes(), self.code);
    }
}

pub fn internal_error(stream: &mut Stream<'_>) {
    Reply {
        status: 500,
        code: "internal_error",
        message: "the gateway failed to process this request",
        sandbox_id: None,
        retry_after_secs: None,
    }
    .send(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let r = Reply {
            status: 404,
            code: "sandbox_not_found",
            message: "no route \"x\"",
            sandbox_id: Some("abc"),
            retry_after_secs: None,
        };
        let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
        assert_eq!(v["error"], "sandbox_not_found");
        assert_eq!(v["message"], "no route \"x\"");
        assert_eq!(v["sandbox_id"], "abc");
        let r = Reply {
            sandbox_id: None,
            ..r
        };
        let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
        assert!(v.get("sandbox_id").is_none());
    }
}
