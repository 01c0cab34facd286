//! placeholder: zfs
