//! placeholder: replicate
