//! Integration tests of resync against the real test bed (zfs-fuse pools,
//! sshd hosts in network namespaces) that `scripts/testbed.sh up` builds
//! and `scripts/test.sh` brings up around `cargo test`. `bed` is the
//! harness; the other modules are scenarios.

mod bed;
mod bwlimit;
mod chunk;
mod chunked;
mod compress;
mod direct;
mod force_delete;
mod holds;
mod json;
mod openzfs;
mod openzfs_delegation;
mod replication;
mod restart;
mod scale;
mod smoke;
mod stall;
mod sudo;
mod syncoid_options;
