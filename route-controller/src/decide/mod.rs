//! The controller's decisions, as plain functions over plain data: which pods a pool creates and
//! deletes, which pod a claim takes, which sandboxes are idle or expired. No I/O, so every rule
//! that guards against a false release, a double allocation or over-creation is unit-tested
//! here; the reconcilers only gather inputs and carry out the result.

pub mod claim;
pub mod idle;
pub mod pool;
pub mod resume;
