//! Shared helpers for the benchmark binaries in `src/bin/`.

pub mod chaos;
pub mod stack;
