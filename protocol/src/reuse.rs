//! Memory reuse, sans I/O: a backup that keeps an older image of the VM
//! offers it, and the primary sends only the pages that differ.
//!
//! 1. The hello carries [`CAP_REUSE`]: the primary will wait for an offer.
//! 2. The backup answers on the control stream with [`Message::Reuse`] — its
//!    image's per-page generation runs, or `pages == 0` and why there is none
//!    — then, with an image, [`Message::Digests`] chunks: an xxh3-64 digest of
//!    every page ([`offer`], [`no_offer`]).
//! 3. The primary assembles it ([`Assembler`]) and, paused, [`plan`]s the
//!    first checkpoint: every page whose generation differs from its own (or
//!    is unknown), and every page whose generation is equal but whose digest
//!    is not (changed after its last generation was recorded, or behind
//!    castor's back). Pages it skips are equal by digest: the pair counts as
//!    protected only once that first checkpoint is committed.
//!
//! With a disk (the hello's `disk_bytes`), the answer goes on with
//! [`Message::DiskDigests`] chunks, a digest of every block of the backup's
//! disk ([`disk_offer`]), whatever the memory's answer was: the backup's disk
//! is always kept, and the first checkpoint carries only the blocks whose
//! digest differs from the primary's.

use crate::message::{Message, CAP_REUSE, MAX_DIGESTS_CHUNK, MAX_RUNS};

/// The messages offering the backup's disk, one digest per block.
pub fn disk_offer(session: u64, digests: &[u64]) -> Vec<Message> {
    digests
        .chunks(MAX_DIGESTS_CHUNK)
        .enumerate()
        .map(|(i, c)| Message::DiskDigests {
            session,
            first: (i * MAX_DIGESTS_CHUNK) as u64,
            digests: c.to_vec(),
        })
        .collect()
}

/// An image a backup offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Its pages' generation tags (`None`: unknown; digests decide alone).
    pub tags: Option<Vec<u64>>,
    /// Its pages' digests.
    pub digests: Vec<u64>,
}

/// The messages offering an image of `digests.len()` pages with generation
/// `runs` (empty: unknown, or more runs than one message carries).
pub fn offer(session: u64, runs: Vec<(u64, u64)>, digests: &[u64]) -> Vec<Message> {
    let runs = if runs.len() > MAX_RUNS {
        Vec::new()
    } else {
        runs
    };
    let mut out = vec![Message::Reuse {
        session,
        pages: digests.len() as u64,
        reason: String::new(),
        runs,
    }];
    for (i, c) in digests.chunks(MAX_DIGESTS_CHUNK).enumerate() {
        out.push(Message::Digests {
            session,
            first: (i * MAX_DIGESTS_CHUNK) as u64,
            digests: c.to_vec(),
        });
    }
    out
}

/// The message saying there is no image to offer, and why.
pub fn no_offer(session: u64, reason: &str) -> Message {
    Message::Reuse {
        session,
        pages: 0,
        reason: reason.to_string(),
        runs: Vec::new(),
    }
}

/// What an [`Assembler`] has once the offer is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// An image to reuse.
    Image(Offer),
    /// None: a full resync, for this reason.
    None(String),
}

/// Collects a backup's answer to a hello with [`CAP_REUSE`] on the primary,
/// checking every message against the session and the memory size: a
/// malformed offer is refused, never half-used.
#[derive(Debug)]
pub struct Assembler {
    session: u64,
    pages: u64,
    tags: Option<Option<Vec<u64>>>,
    digests: Vec<u64>,
    /// The memory's answer, once complete, while the disk's is awaited.
    memory: Option<Answer>,
    disk_blocks: u64,
    disk: Vec<u64>,
}

impl Assembler {
    /// For the session `session` of a guest of `pages` pages and a disk of
    /// `disk_blocks` blocks (0: none).
    pub fn new(session: u64, pages: u64, disk_blocks: u64) -> Self {
        Assembler {
            session,
            pages,
            tags: None,
            digests: Vec::new(),
            memory: None,
            disk_blocks,
            disk: Vec::new(),
        }
    }

    /// The backup's disk digests, once the answer is complete (and `None`
    /// without a disk, or before).
    pub fn take_disk(&mut self) -> Option<Vec<u64>> {
        (self.disk_blocks > 0 && self.disk.len() as u64 == self.disk_blocks)
            .then(|| std::mem::take(&mut self.disk))
    }

    /// Takes one message of the offer. `Ok(Some(answer))` once complete:
    /// the memory's answer and, with a disk, every block's digest
    /// ([`Assembler::take_disk`]).
    pub fn on(&mut self, m: Message) -> Result<Option<Answer>, String> {
        if let Message::DiskDigests {
            session,
            first,
            digests,
        } = m
        {
            if session != self.session || self.memory.is_none() {
                return Err("disk digests before the memory's reuse answer of this session".into());
            }
            if first != self.disk.len() as u64 || first + digests.len() as u64 > self.disk_blocks {
                return Err(format!(
                    "disk digests from block {first} ({} of them): expected block {} of {}",
                    digests.len(),
                    self.disk.len(),
                    self.disk_blocks
                ));
            }
            self.disk.extend_from_slice(&digests);
            return Ok(if self.disk.len() as u64 == self.disk_blocks {
                self.memory.take()
            } else {
                None
            });
        }
        if self.memory.is_some() {
            return Err(format!("{} after the memory's reuse answer", m.name()));
        }
        match self.memory_part(m)? {
            Some(a) if self.disk_blocks > 0 => {
                self.memory = Some(a);
                Ok(None)
            }
            other => Ok(other),
        }
    }

    fn memory_part(&mut self, m: Message) -> Result<Option<Answer>, String> {
        match m {
            Message::Reuse {
                session,
                pages,
                reason,
                runs,
            } => {
                if session != self.session {
                    return Err(format!(
                        "reuse offer for session {session}, this is {}",
                        self.session
                    ));
                }
                if self.tags.is_some() {
                    return Err("two reuse offers".into());
                }
                if pages == 0 {
                    return Ok(Some(Answer::None(reason)));
                }
                if pages != self.pages {
                    return Err(format!(
                        "reuse offer of {pages} pages for a guest of {}",
                        self.pages
                    ));
                }
                let tags = if runs.is_empty() {
                    None
                } else {
                    Some(unrun(&runs, pages)?)
                };
                self.tags = Some(tags);
                self.digests.reserve(pages as usize);
                Ok(None)
            }
            Message::Digests {
                session,
                first,
                digests,
            } => {
                if session != self.session || self.tags.is_none() {
                    return Err("page digests without a reuse offer of this session".into());
                }
                if first != self.digests.len() as u64 || first + digests.len() as u64 > self.pages {
                    return Err(format!(
                        "page digests from page {first} ({} of them): expected page {} of {}",
                        digests.len(),
                        self.digests.len(),
                        self.pages
                    ));
                }
                self.digests.extend_from_slice(&digests);
                if self.digests.len() as u64 == self.pages {
                    let tags = self.tags.take().flatten();
                    self.tags = Some(None);
                    return Ok(Some(Answer::Image(Offer {
                        tags,
                        digests: std::mem::take(&mut self.digests),
                    })));
                }
                Ok(None)
            }
            other => Err(format!(
                "{} while waiting for the reuse offer",
                other.name()
            )),
        }
    }
}

/// The first checkpoint of a session over an offered image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Pages to send, ascending.
    pub send: Vec<u64>,
    /// Of those, pages whose generation differs (or is unknown).
    pub by_generation: u64,
    /// Pages whose generation is equal but whose digest is not: changed
    /// after their generation was recorded, or behind castor's back.
    pub stale: u64,
    /// Pages skipped: equal generation (if known) and equal digest.
    pub kept: u64,
}

/// Which pages to send: `mine` are this node's generation tags, `digest(p)`
/// the digest of its page `p` now (called only for pages the generations
/// would skip, or for every page when the offer's generations are unknown).
pub fn plan(mine: &[u64], offer: &Offer, mut digest: impl FnMut(u64) -> u64) -> Plan {
    let mut p = Plan::default();
    for (i, &theirs) in offer.digests.iter().enumerate() {
        let page = i as u64;
        let tag_equal = match &offer.tags {
            Some(t) => mine.get(i).is_some_and(|&m| m != 0 && m == t[i]),
            None => true,
        };
        if !tag_equal {
            p.by_generation += 1;
            p.send.push(page);
        } else if digest(page) != theirs {
            if offer.tags.is_some() {
                p.stale += 1;
            } else {
                p.by_generation += 1;
            }
            p.send.push(page);
        } else {
            p.kept += 1;
        }
    }
    p
}

/// Whether a hello asks for a reuse offer.
pub fn asks(capabilities: u64) -> bool {
    capabilities & CAP_REUSE != 0
}

/// Run-length encoding of a generation table's tags: `(tag, run)` pairs,
/// as a [`Message::Reuse`] carries them. A table after a full resync is one
/// run; each later checkpoint adds a few.
pub fn runs(tags: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &t in tags {
        match out.last_mut() {
            Some((last, n)) if *last == t => *n += 1,
            _ => out.push((t, 1)),
        }
    }
    out
}

/// The tag list of [`runs`], which must cover exactly `pages` pages.
pub fn unrun(runs: &[(u64, u64)], pages: u64) -> Result<Vec<u64>, String> {
    let total = runs.iter().try_fold(0u64, |a, r| a.checked_add(r.1));
    if total != Some(pages) {
        return Err(format!(
            "reuse offer's generation runs cover {total:?} pages, not {pages}"
        ));
    }
    let mut out = Vec::with_capacity(pages as usize);
    for &(t, n) in runs {
        out.extend(std::iter::repeat_n(t, n as usize));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(ms: Vec<Message>) -> Vec<Message> {
        ms.into_iter()
            .map(|m| {
                let f = m.to_frame();
                Message::decode(&f[4..]).unwrap()
            })
            .collect()
    }

    #[test]
    fn an_offer_travels_and_plans_the_pages_that_differ() {
        let pages = 300_000u64; // three digest chunks
        let digests: Vec<u64> = (0..pages).map(|p| p * 7 + 1).collect();
        let runs = vec![(5, 100), (9, pages - 100)];
        let msgs = roundtrip(offer(42, runs, &digests));
        assert_eq!(msgs.len(), 4);
        let mut a = Assembler::new(42, pages, 0);
        let mut answer = None;
        for m in msgs {
            if let Some(x) = a.on(m).unwrap() {
                answer = Some(x);
            }
        }
        let Some(Answer::Image(o)) = answer else {
            panic!("no image")
        };
        // Mine: page 0..100 at another generation; page 200 equal in
        // generation but changed (stale); page 300 equal in both.
        let mut mine = vec![9u64; pages as usize];
        mine[..100].fill(6);
        let p = plan(&mine, &o, |pg| if pg == 200 { 0 } else { pg * 7 + 1 });
        assert_eq!(p.by_generation, 100);
        assert_eq!(p.stale, 1);
        assert_eq!(p.send.len(), 101);
        assert_eq!(p.send[100], 200);
        assert_eq!(p.kept, pages - 101);
    }

    #[test]
    fn unknown_generations_leave_the_digests_to_decide() {
        let o = Offer {
            tags: None,
            digests: vec![1, 2, 3],
        };
        let p = plan(&[0, 0, 0], &o, |pg| if pg == 1 { 9 } else { pg + 1 });
        assert_eq!(p.send, vec![1]);
        // A tag of 0 (unknown) on this side is never trusted.
        let o = Offer {
            tags: Some(vec![0, 4, 4]),
            digests: vec![1, 2, 3],
        };
        let p = plan(&[0, 4, 4], &o, |pg| pg + 1);
        assert_eq!(p.send, vec![0]);
    }

    #[test]
    fn malformed_offers_are_refused() {
        let mut a = Assembler::new(1, 10, 0);
        assert!(a.on(no_offer(2, "x")).is_err(), "another session");
        let mut a = Assembler::new(1, 10, 0);
        assert_eq!(
            a.on(no_offer(1, "no image")).unwrap(),
            Some(Answer::None("no image".into()))
        );
        let mut a = Assembler::new(1, 10, 0);
        let bad_runs = Message::Reuse {
            session: 1,
            pages: 10,
            reason: String::new(),
            runs: vec![(1, 9)],
        };
        assert!(a.on(bad_runs).is_err());
        let mut a = Assembler::new(1, 10, 0);
        assert!(a.on(offer(1, vec![], &[0; 11]).remove(0)).is_err(), "size");
        let mut a = Assembler::new(1, 10, 0);
        let mut m = offer(1, vec![], &[0; 10]);
        a.on(m.remove(0)).unwrap();
        let Message::Digests { digests, .. } = m.remove(0) else {
            panic!()
        };
        let gap = Message::Digests {
            session: 1,
            first: 3,
            digests,
        };
        assert!(a.on(gap).is_err(), "a gap");
        let mut a = Assembler::new(1, 10, 0);
        assert!(a.on(Message::Ack { epoch: 1 }).is_err());
    }

    #[test]
    fn tags_round_trip_through_runs() {
        let mut tags = vec![7u64; 4096];
        tags[5] = 99;
        let r = runs(&tags);
        assert_eq!(r, vec![(7, 5), (99, 1), (7, 4090)]);
        assert_eq!(unrun(&r, 4096).unwrap(), tags);
        assert!(unrun(&r, 4095).is_err());
    }

    #[test]
    fn a_disk_offer_follows_the_memory_answer_and_completes_it() {
        let mut a = Assembler::new(5, 4, 3);
        assert_eq!(a.on(no_offer(5, "no image")), Ok(None));
        let msgs = disk_offer(5, &[7, 8, 9]);
        assert_eq!(msgs.len(), 1);
        let got = a.on(msgs[0].clone()).unwrap();
        assert_eq!(got, Some(Answer::None("no image".into())));
        assert_eq!(a.take_disk(), Some(vec![7, 8, 9]));
        // Disk digests before the memory's answer, of another session, or
        // of the wrong size are refused.
        let mut b = Assembler::new(5, 4, 3);
        assert!(b.on(disk_offer(5, &[1, 2, 3])[0].clone()).is_err());
        let mut c = Assembler::new(5, 4, 3);
        c.on(no_offer(5, "x")).unwrap();
        assert!(c.on(disk_offer(6, &[1, 2, 3])[0].clone()).is_err());
        let mut d = Assembler::new(5, 4, 3);
        d.on(no_offer(5, "x")).unwrap();
        assert!(d.on(disk_offer(5, &[1, 2, 3, 4])[0].clone()).is_err());
        // Without a disk the memory's answer completes at once.
        let mut e = Assembler::new(5, 4, 0);
        assert_eq!(e.on(no_offer(5, "x")), Ok(Some(Answer::None("x".into()))));
        assert_eq!(e.take_disk(), None);
    }
}
