//! placeholder: plan
