//! Generated code for sandbox-gateway's gRPC API, package `sandboxgateway.v1`.
//!
//! All timestamps are Unix milliseconds (`uint64`, 0 = never); see
//! `proto/sandboxgateway/v1/activity.proto`.

#![forbid(unsafe_code)]

/// `sandboxgateway.v1`: the ActivityService and the WakeService, their messages, clients and
/// servers.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sandboxgateway.v1");
}

/// Encoded `FileDescriptorSet` of `sandboxgateway.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("sandboxgateway_descriptor");
