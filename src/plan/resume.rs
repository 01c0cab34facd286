//! The resume decision: whether the `receive_resume_token` a target holds
//! may be handed to `zfs send -t` for the transfer being planned, or must be
//! discarded ([`Refusal`] says why). Decoding the token is `zfs::token`'s
//! job; this module compares the decoded token with both sides' listings.
//!
//! Pure: a token and the listings in, `Ok` or a [`Refusal`] out. A forged,
//! misplaced or stale token is never sent: it could make the sender stream
//! another dataset (or a re-created snapshot) into this target.

use std::fmt;

use crate::plan::SourceState;
use crate::zfs::token::{decode, ResumeToken, TokenError};
use crate::zfs::Snapshot;

/// Why a resume token must not be sent. Every refusal ends the same way
/// (`zfs receive -A` on the target, then plan again); the message says why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Corrupt(TokenError),
    /// The token names a snapshot of another dataset than the one planned.
    OtherDataset {
        toname: String,
        source: String,
    },
    /// The token's snapshot is gone from the source (stale token).
    Gone {
        toname: String,
        toguid: u64,
    },
    /// A snapshot of that name exists on the source, but it is another one
    /// (destroyed and re-created after the interrupted receive).
    Replaced {
        toname: String,
        toguid: u64,
        source_guid: u64,
    },
    /// The incremental base is no longer a snapshot of the source.
    BaseNotOnSource {
        fromguid: u64,
    },
    /// The incremental base is not on the target.
    BaseNotOnTarget {
        fromguid: u64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Corrupt(e) => write!(f, "is corrupt ({e})"),
            Refusal::OtherDataset { toname, source } => write!(f, "names {toname}, not {source}"),
            Refusal::Gone { toname, toguid } => write!(
                f,
                "names {toname} (guid {toguid}), which no longer exists on the source"
            ),
            Refusal::Replaced {
                toname,
                toguid,
                source_guid,
            } => write!(
                f,
                "names {toname} with guid {toguid}, but the source's snapshot of that name \
                 has guid {source_guid} (destroyed and re-created)"
            ),
            Refusal::BaseNotOnSource { fromguid } => write!(
                f,
                "starts from the snapshot with guid {fromguid}, which the source no longer has"
            ),
            Refusal::BaseNotOnTarget { fromguid } => write!(
                f,
                "starts from the snapshot with guid {fromguid}, which the target does not have"
            ),
        }
    }
}

/// May `zfs send -t` send this token for `source.dataset`? The token must
/// name a snapshot of that dataset which the source still has under the
/// token's GUID (`zfs send -t` looks it up by GUID, so a rename is fine),
/// and an incremental's base must be a snapshot or bookmark of the source
/// whose snapshot the target holds too (matched by GUID). A forged or
/// misplaced token could otherwise make the sender stream another dataset
/// into this target.
pub fn vet(token: &ResumeToken, source: &SourceState, target: &[Snapshot]) -> Result<(), Refusal> {
    if token.dataset() != source.dataset {
        return Err(Refusal::OtherDataset {
            toname: token.toname.clone(),
            source: source.dataset.clone(),
        });
    }
    if !source.snapshots.iter().any(|s| s.guid == token.toguid) {
        let same_name = source
            .snapshots
            .iter()
            .find(|s| Some(s.name.as_str()) == token.snapshot());
        return Err(match same_name {
            Some(s) => Refusal::Replaced {
                toname: token.toname.clone(),
                toguid: token.toguid,
                source_guid: s.guid,
            },
            None => Refusal::Gone {
                toname: token.toname.clone(),
                toguid: token.toguid,
            },
        });
    }
    if let Some(fromguid) = token.fromguid {
        let on_source = source.snapshots.iter().chain(&source.bookmarks);
        if !on_source.into_iter().any(|s| s.guid == fromguid) {
            return Err(Refusal::BaseNotOnSource { fromguid });
        }
        if !target.iter().any(|s| s.guid == fromguid) {
            return Err(Refusal::BaseNotOnTarget { fromguid });
        }
    }
    Ok(())
}

/// Decodes and vets in one go (see [`decode`] and [`vet`]).
pub fn check(
    token: &str,
    source: &SourceState,
    target: &[Snapshot],
) -> Result<ResumeToken, Refusal> {
    let t = decode(token).map_err(Refusal::Corrupt)?;
    vet(&t, source, target)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zfs::tests::snap;
    use crate::zfs::token::tests::{FULL, INCREMENTAL, S1, S2};

    fn source(dataset: &str, snapshots: &[Snapshot]) -> SourceState {
        SourceState {
            dataset: dataset.into(),
            snapshots: snapshots.to_vec(),
            bookmarks: vec![],
        }
    }

    fn full_token() -> ResumeToken {
        decode(FULL).unwrap()
    }

    fn incr_token() -> ResumeToken {
        decode(INCREMENTAL).unwrap()
    }

    #[test]
    fn a_token_for_the_planned_snapshot_is_accepted() {
        let src = [snap("s1", S1, 10), snap("s2", S2, 20)];
        assert_eq!(vet(&full_token(), &source("ozs/tokfix", &src), &[]), Ok(()));
        let tgt = [snap("s1", S1, 5)];
        assert_eq!(
            vet(&incr_token(), &source("ozs/tokfix", &src), &tgt),
            Ok(())
        );
        // Renamed on the source: send -t finds it by GUID.
        let renamed = [snap("s1", S1, 10), snap("renamed", S2, 20)];
        assert_eq!(
            vet(&incr_token(), &source("ozs/tokfix", &renamed), &tgt),
            Ok(())
        );
    }

    #[test]
    fn a_token_naming_another_dataset_is_refused() {
        let src = [snap("s1", S1, 10)];
        for other in ["ozs/other", "ozs/tokfix/child", "ozs/tokfi", "ozs"] {
            assert_eq!(
                vet(&full_token(), &source(other, &src), &[]),
                Err(Refusal::OtherDataset {
                    toname: "ozs/tokfix@s1".into(),
                    source: other.into()
                })
            );
        }
        let msg = vet(&full_token(), &source("ozs/other", &src), &[])
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "names ozs/tokfix@s1, not ozs/other");
    }

    #[test]
    fn a_token_whose_snapshot_is_gone_is_stale() {
        let src = [snap("s2", S2, 20)];
        let got = vet(&full_token(), &source("ozs/tokfix", &src), &[]);
        assert_eq!(
            got,
            Err(Refusal::Gone {
                toname: "ozs/tokfix@s1".into(),
                toguid: S1
            })
        );
        assert!(got
            .unwrap_err()
            .to_string()
            .contains("no longer exists on the source"));
        assert!(matches!(
            vet(&full_token(), &source("ozs/tokfix", &[]), &[]),
            Err(Refusal::Gone { .. })
        ));
    }

    #[test]
    fn a_token_for_a_re_created_snapshot_is_refused() {
        let src = [snap("s1", 42, 30)];
        let got = vet(&full_token(), &source("ozs/tokfix", &src), &[]);
        assert_eq!(
            got,
            Err(Refusal::Replaced {
                toname: "ozs/tokfix@s1".into(),
                toguid: S1,
                source_guid: 42
            })
        );
        assert!(got.unwrap_err().to_string().contains("re-created"));
    }

    #[test]
    fn an_incremental_token_needs_its_base_on_both_sides() {
        let tgt = [snap("s1", S1, 5)];
        assert_eq!(
            vet(
                &incr_token(),
                &source("ozs/tokfix", &[snap("s2", S2, 20)]),
                &tgt
            ),
            Err(Refusal::BaseNotOnSource { fromguid: S1 })
        );
        let src = [snap("s1", S1, 10), snap("s2", S2, 20)];
        assert_eq!(
            vet(
                &incr_token(),
                &source("ozs/tokfix", &src),
                &[snap("s1", 99, 5)]
            ),
            Err(Refusal::BaseNotOnTarget { fromguid: S1 })
        );
    }

    #[test]
    fn an_incremental_token_may_start_from_a_source_bookmark() {
        // Sent from ozs/tokfix#s1 after @s1 was destroyed (--create-bookmark).
        let mut src = source("ozs/tokfix", &[snap("s2", S2, 20)]);
        src.bookmarks = vec![snap("s1", S1, 10)];
        assert_eq!(vet(&incr_token(), &src, &[snap("s1", S1, 5)]), Ok(()));
    }

    #[test]
    fn check_refuses_corrupt_tokens() {
        assert!(matches!(
            check("1-abc-def", &source("ozs/tokfix", &[]), &[]),
            Err(Refusal::Corrupt(TokenError::Format(_)))
        ));
        assert!(check("1-abc-def", &source("a", &[]), &[])
            .unwrap_err()
            .to_string()
            .starts_with("is corrupt ("));
        let src = [snap("s1", S1, 10)];
        assert_eq!(
            check(FULL, &source("ozs/tokfix", &src), &[]).unwrap().bytes,
            0xe1288
        );
    }
}
