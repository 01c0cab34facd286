//! Integration tests (placeholder until the test bed lands).
