//! Shared helpers for the benchmark binaries in `src/bin/`.

pub mod stack;
