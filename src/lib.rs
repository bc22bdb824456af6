//! Shared helpers for examples, tests and benches.
