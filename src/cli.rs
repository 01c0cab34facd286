//! placeholder: cli
