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
    RoutingFailed,
    InternalError,
}

impl ReplyCode {
    pub const ALL: [ReplyCode; 11] = [
        ReplyCode::MissingSandboxId,
        ReplyCode::InvalidSandboxId,
        ReplyCode::InvalidSandboxPort,
        ReplyCode::DuplicateHeader,
        ReplyCode::MissingAccessToken,
        ReplyCode::InvalidAccessToken,
        ReplyCode::SandboxNotFound,
        ReplyCode::SandboxNotReady,
        ReplyCode::RoutesNotSynced,
        ReplyCode::RoutingFailed,
        ReplyCode::InternalError,
    ];

    pub fn status(self) -> u32 {
        use ReplyCode::*;
        match self {
            MissingSandboxId | InvalidSandboxId | InvalidSandboxPort | DuplicateHeader => 400,
            MissingAccessToken | InvalidAccessToken => 401,
            SandboxNotFound => 404,
            SandboxNotReady | RoutesNotSynced => 503,
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
            RoutingFailed => "Envoy rejected the upstream address",
            InternalError => "the gateway failed to process this request",
        }
    }

    /// Whether the reply carries `Retry-After` (the condition is expected to pass).
    pub fn retries(self) -> bool {
        matches!(
            self,
            ReplyCode::SandboxNotReady | ReplyCode::RoutesNotSynced
        )
    }
}
