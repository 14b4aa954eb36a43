//! The gateway's own answers: one enum owns each local reply's HTTP status, stable `error` code
//! and message, so the module, sandbox-extproc, metrics and the README cannot drift apart.

/// Every answer the gateway gives itself instead of the sandbox, in both modes. Each owns its
/// HTTP status, its stable `error` code and its message; the README's error table is kept equal
/// to [`ReplyCode::ALL`] by a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyCode {
    MissingSandboxId,
    InvalidSandboxId,
    InvalidSandboxPort,
    DuplicateHeader,
    MissingAccessToken,
    InvalidAccessToken,
    SandboxNotFound,
    SandboxNotReady,
    RoutesNotSynced,
    SandboxBusy,
    SandboxWaking,
    TooManyWakes,
    SandboxPaused,
    RoutingFailed,
    InternalError,
}

impl ReplyCode {
    pub const ALL: [ReplyCode; 15] = [
        ReplyCode::MissingSandboxId,
        ReplyCode::InvalidSandboxId,
        ReplyCode::InvalidSandboxPort,
        ReplyCode::DuplicateHeader,
        ReplyCode::MissingAccessToken,
        ReplyCode::InvalidAccessToken,
        ReplyCode::SandboxNotFound,
        ReplyCode::SandboxNotReady,
        ReplyCode::RoutesNotSynced,
        ReplyCode::SandboxBusy,
        ReplyCode::SandboxWaking,
        ReplyCode::TooManyWakes,
        ReplyCode::SandboxPaused,
        ReplyCode::RoutingFailed,
        ReplyCode::InternalError,
    ];

    pub fn status(self) -> u32 {
        use ReplyCode::*;
        match self {
            MissingSandboxId | InvalidSandboxId | InvalidSandboxPort | DuplicateHeader => 400,
            MissingAccessToken | InvalidAccessToken => 401,
            SandboxNotFound => 404,
            SandboxBusy | TooManyWakes => 429,
            SandboxPaused => 409,
            SandboxNotReady | RoutesNotSynced | SandboxWaking => 503,
            RoutingFailed | InternalError => 500,
        }
    }

    /// The `error` field of the body, a metric label and Envoy's response-code details.
    pub fn code(self) -> &'static str {
        use ReplyCode::*;
        match self {
            MissingSandboxId => "missing_sandbox_id",
            InvalidSandboxId => "invalid_sandbox_id",
            InvalidSandboxPort => "invalid_sandbox_port",
            DuplicateHeader => "duplicate_header",
            MissingAccessToken => "missing_access_token",
            InvalidAccessToken => "invalid_access_token",
            SandboxNotFound => "sandbox_not_found",
            SandboxNotReady => "sandbox_not_ready",
            RoutesNotSynced => "routes_not_synced",
            SandboxBusy => "sandbox_busy",
            SandboxWaking => "sandbox_waking",
            TooManyWakes => "too_many_wakes",
            SandboxPaused => "sandbox_paused",
            RoutingFailed => "routing_failed",
            InternalError => "internal_error",
        }
    }

    pub fn message(self) -> &'static str {
        use ReplyCode::*;
        match self {
            MissingSandboxId => "no sandbox id in the request (header, host or path)",
            InvalidSandboxId => "sandbox id is not a valid DNS label (1-63 chars of a-z, 0-9, '-')",
            InvalidSandboxPort => "sandbox port must be a decimal number from 1 to 65535",
            DuplicateHeader => "a sandbox routing header was sent more than once",
            MissingAccessToken => "this sandbox needs an access token",
            InvalidAccessToken => "the access token is not valid for this sandbox",
            SandboxNotFound => "no sandbox with this id is routable",
            SandboxNotReady => "the sandbox is not ready yet",
            RoutesNotSynced => "the gateway has not loaded its routes yet",
            SandboxBusy => "the sandbox has too many requests in flight at this gateway",
            SandboxWaking => "the sandbox is paused and waking up; retry shortly",
            TooManyWakes => "too many requests are waiting for sandboxes to wake at this gateway",
            SandboxPaused => {
                "the sandbox is paused by its owner (spec.paused); resume it to use it"
            }
            RoutingFailed => "Envoy rejected the upstream address",
            InternalError => "the gateway failed to process this request",
        }
    }

    /// Whether the reply carries `Retry-After` (the condition is expected to pass).
    pub fn retries(self) -> bool {
        matches!(
            self,
            ReplyCode::SandboxNotReady
                | ReplyCode::RoutesNotSynced
                | ReplyCode::SandboxBusy
                | ReplyCode::SandboxWaking
                | ReplyCode::TooManyWakes
        )
    }

    /// The gRPC status a gRPC client gets for this reply (grpc/grpc `doc/statuscodes.md`
    /// meanings): a bad key is the caller's argument, a refused token is authentication, a
    /// missing sandbox is not found, a busy one is exhausted, and what passes on its own is
    /// unavailable (retryable by gRPC's own retry policy).
    pub fn grpc_status(self) -> u32 {
        use ReplyCode::*;
        match self {
            MissingSandboxId | InvalidSandboxId | InvalidSandboxPort | DuplicateHeader => {
                GRPC_INVALID_ARGUMENT
            }
            MissingAccessToken | InvalidAccessToken => GRPC_UNAUTHENTICATED,
            SandboxNotFound => GRPC_NOT_FOUND,
            SandboxBusy | TooManyWakes => GRPC_RESOURCE_EXHAUSTED,
            SandboxPaused => GRPC_FAILED_PRECONDITION,
            SandboxNotReady | RoutesNotSynced | SandboxWaking => GRPC_UNAVAILABLE,
            RoutingFailed | InternalError => GRPC_INTERNAL,
        }
    }
}

pub const GRPC_INVALID_ARGUMENT: u32 = 3;
pub const GRPC_NOT_FOUND: u32 = 5;
pub const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
pub const GRPC_FAILED_PRECONDITION: u32 = 9;
pub const GRPC_INTERNAL: u32 = 13;
pub const GRPC_UNAVAILABLE: u32 = 14;
pub const GRPC_UNAUTHENTICATED: u32 = 16;

/// Whether a request is gRPC, by Envoy's own rule (its local replies become gRPC trailers-only
/// responses for exactly these): `content-type` is `application/grpc`, or that followed by `+`
/// (`application/grpc+proto`) or `;`. gRPC-Web (`application/grpc-web`) is not: it is plain
/// HTTP to Envoy and gets the JSON body.
pub fn is_grpc_content_type(content_type: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    match content_type.strip_prefix(GRPC) {
        Some(rest) => matches!(rest.first(), None | Some(b'+') | Some(b';')),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_follow_envoys_rule() {
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;x=1",
        ] {
            assert!(is_grpc_content_type(yes.as_bytes()), "{yes}");
        }
        for no in [
            "application/grpc-web",
            "application/json",
            "",
            "application/grpcx",
        ] {
            assert!(!is_grpc_content_type(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn every_code_has_a_non_ok_grpc_status() {
        for c in ReplyCode::ALL {
            assert_ne!(c.grpc_status(), 0, "{c:?}");
        }
    }
}
