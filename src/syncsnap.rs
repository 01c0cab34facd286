//! placeholder: syncsnap
