//! Typed errors: every SPEC §14 code maps to an [`ErrorCode`] the app can
//! match on, with its class (connection / request / transient) and what the
//! SDK does about it.

use palaver_protocol::pb;

/// A server error code (SPEC §14). Codes this version does not know are
/// classified by their thousand, as SPEC §16 asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum ErrorCode {
    MalformedFrame,
    FrameTooLarge,
    UnsupportedVersion,
    Unauthenticated,
    TokenExpired,
    ProtocolViolation,
    HelloTimeout,
    HeartbeatTimeout,
    SlowConsumer,
    ServerFull,
    /// The account holds as many connections as the server allows (all
    /// devices, all nodes): close one elsewhere; the SDK retries slowly.
    TooManyConnections,
    InvalidArgument,
    RateLimited,
    NotFound,
    Forbidden,
    TooManyMembers,
    BodyTooLarge,
    /// A storage quota of the account or the conversation is used up.
    QuotaExceeded,
    Unavailable,
    Internal,
    /// An unknown 1xxx code: the server closed the connection.
    UnknownConnectionError,
    /// An unknown 2xxx code: the request failed for good.
    UnknownRequestError,
    /// An unknown 3xxx (or other) code: transient.
    UnknownTransientError,
}

impl ErrorCode {
    pub fn from_code(code: u32) -> ErrorCode {
        use pb::ErrorCode as P;
        let known = i32::try_from(code).ok().and_then(|c| P::try_from(c).ok());
        match known {
            Some(P::MalformedFrame) => ErrorCode::MalformedFrame,
            Some(P::FrameTooLarge) => ErrorCode::FrameTooLarge,
            Some(P::UnsupportedVersion) => ErrorCode::UnsupportedVersion,
            Some(P::Unauthenticated) => ErrorCode::Unauthenticated,
            Some(P::TokenExpired) => ErrorCode::TokenExpired,
            Some(P::ProtocolViolation) => ErrorCode::ProtocolViolation,
            Some(P::HelloTimeout) => ErrorCode::HelloTimeout,
            Some(P::HeartbeatTimeout) => ErrorCode::HeartbeatTimeout,
            Some(P::SlowConsumer) => ErrorCode::SlowConsumer,
            Some(P::ServerFull) => ErrorCode::ServerFull,
            Some(P::TooManyConnections) => ErrorCode::TooManyConnections,
            Some(P::InvalidArgument) => ErrorCode::InvalidArgument,
            Some(P::RateLimited) => ErrorCode::RateLimited,
            Some(P::NotFound) => ErrorCode::NotFound,
            Some(P::Forbidden) => ErrorCode::Forbidden,
            Some(P::TooManyMembers) => ErrorCode::TooManyMembers,
            Some(P::BodyTooLarge) => ErrorCode::BodyTooLarge,
            Some(P::QuotaExceeded) => ErrorCode::QuotaExceeded,
            Some(P::Unavailable) => ErrorCode::Unavailable,
            Some(P::Internal) => ErrorCode::Internal,
            _ if palaver_protocol::closes_connection(code) => ErrorCode::UnknownConnectionError,
            _ if palaver_protocol::is_request_error(code) => ErrorCode::UnknownRequestError,
            _ => ErrorCode::UnknownTransientError,
        }
    }

    /// 1xxx: the server closed the connection after this error.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorCode::MalformedFrame
                | ErrorCode::FrameTooLarge
                | ErrorCode::UnsupportedVersion
                | ErrorCode::Unauthenticated
                | ErrorCode::TokenExpired
                | ErrorCode::ProtocolViolation
                | ErrorCode::HelloTimeout
                | ErrorCode::HeartbeatTimeout
                | ErrorCode::SlowConsumer
                | ErrorCode::ServerFull
                | ErrorCode::TooManyConnections
                | ErrorCode::UnknownConnectionError
        )
    }

    /// Retrying the same request later may succeed (RATE_LIMITED, 3xxx).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::Unavailable
                | ErrorCode::Internal
                | ErrorCode::UnknownTransientError
        )
    }

    /// After this closing error the SDK does not reconnect on its own: the
    /// app must act (new credentials, an upgrade) and call `connect` again.
    pub fn stops_reconnecting(self) -> bool {
        matches!(
            self,
            ErrorCode::UnsupportedVersion | ErrorCode::Unauthenticated
        )
    }
}

/// An error the server sent, as the app sees it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ServerError {
    pub code: ErrorCode,
    /// The wire value (useful for codes newer than this SDK).
    pub raw_code: u32,
    /// Human readable; never parse it.
    pub message: String,
}

impl ServerError {
    pub fn from_pb(e: &pb::Error) -> ServerError {
        ServerError {
            code: ErrorCode::from_code(e.code),
            raw_code: e.code,
            message: e.message.clone(),
        }
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} ({}): {}", self.code, self.raw_code, self.message)
    }
}

/// What a call into the SDK can fail with. (Fields are not called
/// `message`: that would clash with `Throwable.message` in Kotlin.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum ClientError {
    /// The app passed something the protocol rules out (checked locally,
    /// before anything is sent).
    #[error("invalid argument: {detail}")]
    InvalidArgument { detail: String },
    /// The configuration cannot work (bad trust store PEM, bad address...).
    #[error("configuration: {detail}")]
    Config { detail: String },
    /// `shutdown()` was called; the client cannot be used any more.
    #[error("the client is closed")]
    Closed,
    /// The server refused the request (SPEC §14).
    #[error("server error {code:?} ({raw_code}): {detail}")]
    Server {
        code: ErrorCode,
        raw_code: u32,
        /// The server's human-readable message; never parse it.
        detail: String,
    },
    /// The connection was lost while a request that is not safe to repeat
    /// (creating a group) was awaiting its answer: it may or may not have
    /// been carried out.
    #[error("connection lost before the answer arrived")]
    ConnectionLost,
}

impl From<ServerError> for ClientError {
    fn from(e: ServerError) -> Self {
        ClientError::Server {
            code: e.code,
            raw_code: e.raw_code,
            detail: e.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_code_maps_to_its_own_variant() {
        let spec = [
            (1000, ErrorCode::MalformedFrame),
            (1001, ErrorCode::FrameTooLarge),
            (1002, ErrorCode::UnsupportedVersion),
            (1003, ErrorCode::Unauthenticated),
            (1004, ErrorCode::TokenExpired),
            (1005, ErrorCode::ProtocolViolation),
            (1006, ErrorCode::HelloTimeout),
            (1007, ErrorCode::HeartbeatTimeout),
            (1008, ErrorCode::SlowConsumer),
            (1009, ErrorCode::ServerFull),
            (1010, ErrorCode::TooManyConnections),
            (2000, ErrorCode::InvalidArgument),
            (2001, ErrorCode::RateLimited),
            (2002, ErrorCode::NotFound),
            (2003, ErrorCode::Forbidden),
            (2004, ErrorCode::TooManyMembers),
            (2005, ErrorCode::BodyTooLarge),
            (2006, ErrorCode::QuotaExceeded),
            (3000, ErrorCode::Unavailable),
            (3001, ErrorCode::Internal),
        ];
        for (code, want) in spec {
            let got = ErrorCode::from_code(code);
            assert_eq!(got, want, "{code}");
            assert_eq!(got.closes_connection(), (1000..2000).contains(&code));
        }
        assert_eq!(
            ErrorCode::from_code(1999),
            ErrorCode::UnknownConnectionError
        );
        assert_eq!(ErrorCode::from_code(2999), ErrorCode::UnknownRequestError);
        assert_eq!(ErrorCode::from_code(3999), ErrorCode::UnknownTransientError);
        assert_eq!(
            ErrorCode::from_code(u32::MAX),
            ErrorCode::UnknownTransientError
        );
        assert!(ErrorCode::UnknownConnectionError.closes_connection());
        assert!(ErrorCode::RateLimited.is_retryable());
        assert!(!ErrorCode::Forbidden.is_retryable());
    }
}
