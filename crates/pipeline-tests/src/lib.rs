//! Tests of the whole pipeline live in `tests/`; this crate has no code of its own. They sit
//! here, not in one stage's crate, because they need every stage at once.
