//! The Envoy 1.40 dynamic-module binding: raw ABI (`abi`), the safe handles the filter logic
//! uses (`handle`), and the exported hooks (`hooks`). All `unsafe` code of the crate is here.

mod abi;
pub mod handle;
mod hooks;

pub use handle::{FilterConfigHandle, Header, MetricId, RequestHeaders, Stream};
