//! placeholder: host
